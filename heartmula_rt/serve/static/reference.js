// Reference audio on the page (docs/reference-audio.md): a clip dropped or chosen, its waveform
// drawn with the part to use (From/To, seconds) shaded, embedded by POST /v1/references (the
// server keeps embeddings by the clip's hash and range), and a strength from 0 to 1. app.js's
// form adds `window.heartmulaReference.field()` to the body of POST /v1/songs:
// {"reference": {"embedding": [512 numbers], "strength": s}}, or nothing without a clip.
"use strict";

(() => {
  const MAX_BYTES = 16 * 1024 * 1024; // the server's MAX_CLIP_BYTES
  const MAX_RANGE = 60; // the server's MAX_RANGE_SECONDS
  const KEY = new URLSearchParams(location.search).get("key") || ""; // as app.js sends it
  const $ = (s) => document.querySelector(s);
  const drop = $("#ref-drop"), file = $("#ref-file"), wave = $("#ref-wave");
  const start = $("#ref-start"), end = $("#ref-end"), strength = $("#ref-strength");
  const status = $("#ref-status"), rangeRow = $("#ref-range-row");
  if (!drop) return;
  const state = { bytes: null, type: "", peaks: null, duration: 0, embedding: null, timer: 0 };

  const say = (text) => { status.textContent = text; };
  const showStrength = () => {
    $("#ref-strength-out").textContent = Number(strength.value).toFixed(2);
  };

  function draw() {
    const g = wave.getContext("2d"), w = wave.width, h = wave.height;
    g.clearRect(0, 0, w, h);
    if (!state.peaks) return;
    const a = Number(start.value) / state.duration, b = Number(end.value) / state.duration;
    g.fillStyle = "rgba(120, 160, 255, 0.25)";
    g.fillRect(a * w, 0, Math.max(1, (b - a) * w), h);
    g.fillStyle = "currentColor";
    state.peaks.forEach((p, i) => {
      const y = p * (h / 2);
      g.fillRect((i / state.peaks.length) * w, h / 2 - y, 1, Math.max(1, 2 * y));
    });
  }

  async function choose(f) {
    state.embedding = null;
    strength.disabled = true;
    if (!f) return;
    if (f.size > MAX_BYTES) return say(`The clip is over ${MAX_BYTES / 1048576} MiB.`);
    state.bytes = await f.arrayBuffer();
    state.type = f.type || "application/octet-stream";
    try {
      const ctx = new (window.AudioContext || window.webkitAudioContext)();
      const audio = await ctx.decodeAudioData(state.bytes.slice(0));
      ctx.close();
      const data = audio.getChannelData(0), n = 600, step = Math.max(1, Math.floor(data.length / n));
      state.peaks = Array.from({ length: n }, (_, i) => {
        let m = 0;
        for (let j = i * step; j < Math.min(data.length, (i + 1) * step); j++) m = Math.max(m, Math.abs(data[j]));
        return m;
      });
      state.duration = audio.duration;
    } catch {
      state.peaks = null; // the browser cannot decode it: the server says whether it can
      state.duration = 0;
    }
    start.value = "0";
    end.value = String(Math.min(30, state.duration || 30).toFixed(1));
    wave.hidden = !state.peaks;
    rangeRow.hidden = false;
    draw();
    embed();
  }

  async function embed() {
    if (!state.bytes) return;
    const a = Number(start.value), b = Number(end.value);
    if (!(a >= 0 && b > a && b - a <= MAX_RANGE)) {
      return say(`Choose a part from 1 to ${MAX_RANGE} s long.`);
    }
    say("Embedding the clip…");
    const query = `?start=${encodeURIComponent(a)}&end=${encodeURIComponent(b)}`;
    const headers = { "Content-Type": state.type };
    if (KEY) headers["X-API-Key"] = KEY;
    let res;
    try {
      res = await fetch(`/v1/references${query}`, {
        method: "POST", headers, body: state.bytes, cache: "no-store",
      });
    } catch {
      return say("The server cannot be reached.");
    }
    const got = await res.json().catch(() => ({}));
    if (!res.ok) {
      state.embedding = null;
      strength.disabled = true;
      return say(got.detail || `The clip was refused (${res.status}).`);
    }
    state.embedding = got.embedding;
    strength.disabled = false;
    say(`The song leans towards ${got.seconds[0]}–${got.seconds[1]} s of the clip.`);
  }

  function later() {
    draw();
    clearTimeout(state.timer);
    state.timer = setTimeout(embed, 600);
  }

  function clear() {
    Object.assign(state, { bytes: null, peaks: null, duration: 0, embedding: null });
    file.value = "";
    wave.hidden = rangeRow.hidden = true;
    strength.disabled = true;
    say("");
  }

  file.addEventListener("change", () => choose(file.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  start.addEventListener("input", later);
  end.addEventListener("input", later);
  strength.addEventListener("input", showStrength);
  $("#ref-clear").addEventListener("click", clear);
  showStrength();

  window.heartmulaReference = {
    field() {
      if (!state.embedding) return {};
      return { reference: { embedding: state.embedding, strength: Number(strength.value) } };
    },
  };
})();
