// heartmula-rt serve: the web page. Plain JS, no build step, no dependencies.
//
// The form makes the body of POST /v1/songs; the answer (a job view) is followed by its
// server-sent events and played while it is made from its live WAV URL; once done, the player
// switches to the finished file. The queue and the history come from GET /v1/songs. A finished
// song's waveform takes a selection (a mouse or a finger dragged across it): "Regenerate
// section" posts /v1/songs/ID/regen, "Extend" /v1/songs/ID/extend, and the new song is followed
// and played as a generated one is.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  // ---- constants ---------------------------------------------------------------------------

  const KEY = new URLSearchParams(location.search).get("key") || "";
  const LIVE = new Set(["queued", "running"]);
  const MARKERS = ["intro", "verse", "pre-chorus", "chorus", "bridge", "outro"];
  const TAG_GROUPS = [
    ["Genre", ["pop", "rock", "jazz", "electronic", "hip hop", "classical", "folk", "r&b",
      "country", "metal", "ambient", "blues", "reggae", "soul"]],
    ["Mood", ["happy", "sad", "energetic", "calm", "romantic", "dark", "uplifting",
      "melancholic", "dreamy", "epic"]],
    ["Instruments", ["piano", "guitar", "acoustic guitar", "drums", "strings", "synth", "bass",
      "violin", "saxophone", "cello"]],
    ["Vocals", ["male vocal", "female vocal", "choir", "duet", "instrumental"]],
  ];
  const FALLBACK_INFO = {
    version: "?", model: "", device: "", max_seconds: 240, songs_at_once: 1,
    formats: ["wav", "flac", "ogg", "mp3"],
    defaults: {
      tags: "", lyrics: "", seconds: null, seed: null, topk: 50, temperature: 1.0,
      cfg_scale: 1.5, num_steps: 10, guidance_scale: 1.25, format: "mp3",
    },
  };
  const ADVANCED = ["topk", "temperature", "cfg_scale", "num_steps", "guidance_scale"];
  const INTEGER_FIELDS = new Set(["topk", "num_steps"]);
  const REFRESH_MS = 3000;
  const FRAME_S = 0.08; // the LM's frames, 12.5 a second: an edit starts and ends on one
  const EDITABLE = new Set(["done", "cancelled", "interrupted"]); // ended songs, with codes

  // ---- state -------------------------------------------------------------------------------

  const state = {
    info: FALLBACK_INFO,
    tags: [],
    songs: [], // newest first, as GET /v1/songs gives them
    current: null, // the job view shown in the player card
    events: null, // EventSource following `current`
    poll: null, // fallback timer when server-sent events fail
    live: false, // the player plays the live WAV stream of `current`
    liveRetries: 0,
    refreshing: false,
    retryTimer: null,
  };

  const el = {
    form: $("#song-form"),
    tagsInput: $("#tags-input"),
    tagField: $("#tag-field"),
    selectedTags: $("#selected-tags"),
    tagGroups: $("#tag-groups"),
    tagsCount: $("#tags-count"),
    lyrics: $("#lyrics"),
    backdrop: $("#lyrics-backdrop"),
    outline: $("#lyrics-outline"),
    lyricsWarning: $("#lyrics-warning"),
    lyricsCount: $("#lyrics-count"),
    seconds: $("#seconds"),
    secondsRange: $("#seconds-range"),
    seed: $("#seed"),
    format: $("#format"),
    generate: $("#generate"),
    generateLabel: $("#generate-label"),
    error: $("#error"),
    errorText: $("#error-text"),
    player: $("#player"),
    playToggle: $("#play-toggle"),
    seek: $("#seek"),
    time: $("#time"),
    canvas: $("#waveform"),
    npTitle: $("#np-title"),
    npSub: $("#np-sub"),
    npState: $("#np-state"),
    npCover: $("#np-cover"),
    npDownload: $("#np-download"),
    progressBar: $("#progress-bar"),
    progressFill: $("#progress-fill"),
    progressText: $("#progress-text"),
    cancelCurrent: $("#cancel-current"),
    queue: $("#queue"),
    queueCard: $("#queue-card"),
    queueCount: $("#queue-count"),
    history: $("#history"),
    historyCount: $("#history-count"),
    historyEmpty: $("#history-empty"),
    toast: $("#toast"),
    editPanel: $("#edit-panel"),
    selectionText: $("#selection-text"),
    selectionClear: $("#selection-clear"),
    regen: $("#regen"),
    regenLabel: $("#regen-label"),
    regenToEnd: $("#regen-to-end"),
    extend: $("#extend"),
    extendLabel: $("#extend-label"),
    extendSeconds: $("#extend-seconds"),
    useForm: $("#edit-use-form"),
  };

  // ---- small helpers -----------------------------------------------------------------------

  function withKey(url) {
    if (!KEY) return url;
    return `${url}${url.includes("?") ? "&" : "?"}key=${encodeURIComponent(KEY)}`;
  }

  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "html") node.innerHTML = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  const escapeHtml = (s) =>
    s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

  function clamp(x, lo, hi) {
    return Math.min(hi, Math.max(lo, x));
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return "–";
    if (s < 10) return `${s.toFixed(2)} s`;
    if (s < 60) return `${s.toFixed(1)} s`;
    return fmtClock(s);
  }

  function fmtClock(s) {
    if (!Number.isFinite(s) || s < 0) s = 0;
    const m = Math.floor(s / 60);
    const sec = Math.floor(s % 60);
    return `${m}:${String(sec).padStart(2, "0")}`;
  }

  // m:ss.cc: a moment of an edit, to its 80 ms frame
  function fmtPrecise(s) {
    const cs = Math.max(0, Math.round((Number(s) || 0) * 100));
    const m = Math.floor(cs / 6000);
    const rest = cs - m * 6000;
    return `${m}:${String(Math.floor(rest / 100)).padStart(2, "0")}.${String(rest % 100).padStart(2, "0")}`;
  }

  const shortId = (id) => String(id || "").slice(0, 6);
  const secondsOf = (frames) => Math.round(frames * FRAME_S * 100) / 100;

  // What an edited song is, from its job's `edit`: "regen of 3fa2c1 0:32–0:34".
  function editLabel(job) {
    const e = job && job.edit;
    if (!e || !e.of) return null;
    const of = shortId(e.of);
    if (e.kind === "extend") return `extension of ${of}`;
    if (e.kind !== "regen") return `${e.kind} of ${of}`;
    const from = e.start * FRAME_S;
    const end = e.end === null || e.end === undefined ? null : e.end * FRAME_S;
    const length = (end ?? (Number(job.progress?.frames) || 0) * FRAME_S) - from;
    const at = length < 5 ? fmtPrecise : fmtClock; // a short section: to the frame
    return end === null ? `regen of ${of} from ${at(from)}` : `regen of ${of} ${at(from)}–${at(end)}`;
  }

  // The longest a job's song may be: its frames at most (an edit's request says less).
  function expectedSeconds(job) {
    const frames = Number(job.progress?.max_frames) || 0;
    if (frames) return frames * FRAME_S;
    return Number(job.request?.seconds) || Number(job.progress?.audio_seconds) || 1;
  }

  function fmtCreated(unix) {
    const d = new Date(unix * 1000);
    const now = new Date();
    const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (d.toDateString() === now.toDateString()) return time;
    return `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
  }

  function shortTags(job, most = 3) {
    const tags = splitTags(job.request?.tags || "");
    if (!tags.length) {
      const line = (job.request?.lyrics || "").split("\n").find((l) => l.trim() && !MARKER_LINE.test(l));
      return line ? `“${line.trim().slice(0, 40)}”` : "untitled";
    }
    return tags.slice(0, most).join(", ") + (tags.length > most ? ` +${tags.length - most}` : "");
  }

  function splitTags(text) {
    return text.split(",").map(normTag).filter(Boolean);
  }

  let toastTimer = null;
  function toast(message, ms = 2600) {
    el.toast.textContent = message;
    el.toast.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => (el.toast.hidden = true), ms);
  }

  // ---- the API -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail, retryAfter) {
      super(detail);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  function detailOf(data, status, text) {
    const detail = data && data.detail;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => (d && d.msg) || JSON.stringify(d)).join("; ");
    }
    return `the server answered ${status}${text ? `: ${text.slice(0, 200)}` : ""}`;
  }

  async function api(path, { method = "GET", json } = {}) {
    const headers = {};
    if (KEY) headers["X-API-Key"] = KEY;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body, cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "the server cannot be reached; is it running?");
    }
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!res.ok) {
      throw new ApiError(res.status, detailOf(data, res.status, text), res.headers.get("Retry-After"));
    }
    return data;
  }

  // ---- the error banner --------------------------------------------------------------------

  // An answer to what the user just did (Generate, an edit) is shown beside the button they
  // pressed, where they are looking: at the page's top it could be scrolled out of sight.
  // Other news (a song that failed, a server gone) goes to the top.
  const errorHome = el.error.previousElementSibling;

  function showError(message, near = null) {
    clearInterval(state.retryTimer);
    el.errorText.textContent = message;
    (near || errorHome).after(el.error);
    el.error.classList.toggle("banner-inline", Boolean(near));
    el.error.hidden = false;
    if (near) el.error.scrollIntoView({ block: "nearest" });
  }

  function hideError() {
    clearInterval(state.retryTimer);
    el.error.hidden = true;
    el.errorText.textContent = "";
  }

  function showApiError(err, what, near = null) {
    const detail = err instanceof ApiError ? err.message : String(err);
    const sentence = detail.charAt(0).toUpperCase() + detail.slice(1);
    if (err.status === 429) {
      const wait = parseRetryAfter(err.retryAfter);
      if (wait === null) {
        showError(`${sentence}.`.replace(/\.\.$/, "."), near);
        return;
      }
      const at = new Date(Date.now() + wait * 1000);
      const tick = () => {
        const left = Math.ceil((at - Date.now()) / 1000);
        el.errorText.textContent = left > 0
          ? `${sentence}. You can retry at ${at.toLocaleTimeString()} (in ${left} s).`
          : `${sentence}. You can retry now.`;
        if (left <= 0) clearInterval(state.retryTimer);
      };
      showError("", near);
      tick();
      state.retryTimer = setInterval(tick, 1000);
      return;
    }
    const prefix = err.status === 401 ? "Not allowed: " : what ? `${what}: ` : "";
    showError(`${prefix}${prefix ? detail : sentence}`, near);
  }

  function parseRetryAfter(value) {
    if (!value) return null;
    if (/^\d+$/.test(value.trim())) return Number(value);
    const when = Date.parse(value);
    return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
  }

  $("#error-close").addEventListener("click", hideError);

  // ---- tags --------------------------------------------------------------------------------

  function normTag(t) {
    return t.replace(/\s+/g, " ").trim();
  }

  const hasTag = (t) => state.tags.some((x) => x.toLowerCase() === t.toLowerCase());

  function addTag(t) {
    t = normTag(t);
    if (!t || hasTag(t)) return false;
    state.tags.push(t);
    renderTags();
    return true;
  }

  function removeTag(t) {
    state.tags = state.tags.filter((x) => x.toLowerCase() !== t.toLowerCase());
    renderTags();
  }

  function setTags(list) {
    state.tags = [];
    for (const t of list) if (normTag(t) && !hasTag(normTag(t))) state.tags.push(normTag(t));
    renderTags();
  }

  function commitTagInput() {
    const parts = el.tagsInput.value.split(",");
    el.tagsInput.value = "";
    parts.forEach(addTag);
  }

  function renderTags() {
    el.selectedTags.replaceChildren(
      ...state.tags.map((t) =>
        h("li", { class: "tag", dataset: { tag: t } },
          h("span", { text: t }),
          h("button", { type: "button", class: "tag-remove", "aria-label": `Remove ${t}`,
            dataset: { remove: t }, text: "×" })),
      ),
    );
    for (const chip of $$(".chip", el.tagGroups)) {
      chip.setAttribute("aria-pressed", String(hasTag(chip.dataset.tag)));
    }
    el.tagsCount.textContent = state.tags.length
      ? `${state.tags.length} tag${state.tags.length > 1 ? "s" : ""}`
      : "no tags";
  }

  function buildTagGroups() {
    el.tagGroups.replaceChildren(
      ...TAG_GROUPS.map(([name, tags]) =>
        h("div", { class: "tag-group", role: "group", "aria-label": name },
          h("div", { class: "tag-group-name", text: name }),
          h("div", { class: "tag-group-chips" },
            tags.map((t) => h("button", { type: "button", class: "chip", "aria-pressed": "false",
              dataset: { tag: t }, text: t })))),
      ),
    );
  }

  el.tagGroups.addEventListener("click", (e) => {
    const chip = e.target.closest(".chip");
    if (!chip) return;
    const t = chip.dataset.tag;
    if (hasTag(t)) removeTag(t);
    else addTag(t);
  });

  el.selectedTags.addEventListener("click", (e) => {
    const button = e.target.closest("[data-remove]");
    if (button) {
      removeTag(button.dataset.remove);
      el.tagsInput.focus();
    }
  });

  el.tagField.addEventListener("click", (e) => {
    if (e.target === el.tagField) el.tagsInput.focus();
  });

  el.tagsInput.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === ",") {
      e.preventDefault(); // Enter would submit the form
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        commitTagInput();
        el.form.requestSubmit();
        return;
      }
      commitTagInput();
    } else if (e.key === "Backspace" && !el.tagsInput.value && state.tags.length) {
      removeTag(state.tags[state.tags.length - 1]);
    }
  });

  el.tagsInput.addEventListener("input", () => {
    // a pasted "a, b, c": every part but the last becomes a chip
    if (el.tagsInput.value.includes(",")) {
      const parts = el.tagsInput.value.split(",");
      el.tagsInput.value = parts.pop().trimStart();
      parts.forEach(addTag);
    }
  });

  el.tagsInput.addEventListener("blur", commitTagInput);

  // ---- lyrics ------------------------------------------------------------------------------

  const MARKER_LINE = /^\s*\[([^\[\]\n]*)\]\s*$/;

  function markerKind(name) {
    const n = name.trim().toLowerCase().replace(/\s+/g, " ").replace(/\s*\d+$/, "");
    return MARKERS.includes(n) ? n : null;
  }

  function analyseLyrics(text) {
    const lines = text.split("\n");
    const sections = [];
    const unknown = [];
    let words = 0;
    lines.forEach((line, i) => {
      const m = MARKER_LINE.exec(line);
      if (m) {
        const kind = markerKind(m[1]);
        if (kind) sections.push({ kind, name: m[1].trim(), line: i, lines: 0 });
        else unknown.push({ name: m[1], line: i });
      } else if (/^\s*\[[^\]]*$/.test(line)) {
        unknown.push({ name: line.trim().slice(1), line: i, open: true });
      } else if (line.trim()) {
        words += 1;
        if (sections.length) sections[sections.length - 1].lines += 1;
      }
    });
    return { lines, sections, unknown, sung: words };
  }

  function renderLyrics() {
    const text = el.lyrics.value;
    const { lines, sections, unknown, sung } = analyseLyrics(text);

    // the highlight behind the text
    el.backdrop.innerHTML = lines
      .map((line) => {
        const m = MARKER_LINE.exec(line);
        if (!m) return escapeHtml(line);
        const kind = markerKind(m[1]);
        return `<mark class="m-${kind || "unknown"}">${escapeHtml(line)}</mark>`;
      })
      .join("\n") + "\n";

    // the outline
    if (sections.length) {
      el.outline.replaceChildren(
        ...sections.map((s) =>
          h("li", {},
            h("button", { type: "button", class: `m-${s.kind}`, dataset: { line: s.line },
              title: `line ${s.line + 1}` },
              h("span", { class: "sw" }),
              s.name,
              h("small", { text: `${s.lines} line${s.lines === 1 ? "" : "s"}` }))),
        ),
      );
    } else {
      el.outline.replaceChildren(
        h("li", { class: "empty", text: "none yet: add a marker such as [verse] above your lines" }));
    }

    // unknown markers
    if (unknown.length) {
      const first = unknown[0];
      const what = first.open
        ? `line ${first.line + 1} opens a marker “[${first.name}” without a closing “]”`
        : `line ${first.line + 1}: “[${first.name}]” is not a section marker the model knows`;
      const more = unknown.length > 1 ? ` (and ${unknown.length - 1} more)` : "";
      el.lyricsWarning.textContent =
        `${what}${more}. Known markers: ${MARKERS.map((m) => `[${m}]`).join(" ")}.`;
      el.lyricsWarning.hidden = false;
    } else {
      el.lyricsWarning.hidden = true;
      el.lyricsWarning.textContent = "";
    }

    el.lyricsCount.textContent = text.trim()
      ? `${sung} line${sung === 1 ? "" : "s"} · ${sections.length} section${sections.length === 1 ? "" : "s"}`
      : "empty";
    autoGrow();
  }

  function autoGrow() {
    const y = window.scrollY;
    el.lyrics.style.height = "auto";
    const border = el.lyrics.offsetHeight - el.lyrics.clientHeight;
    el.lyrics.style.height = `${el.lyrics.scrollHeight + border}px`;
    window.scrollTo(window.scrollX, y);
  }

  function insertMarker(kind) {
    const ta = el.lyrics;
    const value = ta.value;
    const start = ta.selectionStart ?? value.length;
    const end = ta.selectionEnd ?? start;
    const before = value.slice(0, start);
    const after = value.slice(end);
    let text = `${before === "" || before.endsWith("\n") ? "" : "\n"}[${kind}]`;
    let caretShift = 0;
    if (after.startsWith("\n")) caretShift = 1; // the line's own newline follows
    else text += "\n";
    ta.focus();
    ta.setSelectionRange(start, end);
    // execCommand keeps the browser's undo history; setRangeText where it is gone
    let done = false;
    try {
      done = document.execCommand("insertText", false, text);
    } catch {
      done = false;
    }
    if (!done || ta.value.slice(start, start + text.length) !== text) {
      ta.value = value;
      ta.setRangeText(text, start, end, "end");
    }
    const caret = start + text.length + caretShift;
    ta.setSelectionRange(caret, caret);
    renderLyrics();
  }

  $$(".marker-btn").forEach((b) => {
    b.addEventListener("mousedown", (e) => e.preventDefault()); // keep the textarea's caret
    b.addEventListener("click", () => insertMarker(b.dataset.marker));
  });

  el.lyrics.addEventListener("input", renderLyrics);
  el.lyrics.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      el.form.requestSubmit();
    }
  });

  el.outline.addEventListener("click", (e) => {
    const b = e.target.closest("button[data-line]");
    if (!b) return;
    const lines = el.lyrics.value.split("\n");
    const line = Number(b.dataset.line);
    let pos = 0;
    for (let i = 0; i < line && i < lines.length; i++) pos += lines[i].length + 1;
    const next = pos + (lines[line] || "").length + 1;
    el.lyrics.focus();
    el.lyrics.setSelectionRange(Math.min(next, el.lyrics.value.length), Math.min(next, el.lyrics.value.length));
    const top = el.lyrics.getBoundingClientRect().top + window.scrollY;
    const lineHeight = parseFloat(getComputedStyle(el.lyrics).lineHeight) || 22;
    window.scrollTo({ top: Math.max(0, top + line * lineHeight - 120), behavior: "smooth" });
  });

  window.addEventListener("resize", autoGrow);

  // ---- settings ----------------------------------------------------------------------------

  function secondsBounds() {
    const max = Number(el.secondsRange.max);
    const min = Number(el.secondsRange.min);
    return [min, max];
  }

  function setRangeFill(range) {
    const lo = Number(range.min);
    const hi = Number(range.max);
    const v = Number(range.value);
    range.style.setProperty("--fill", `${hi > lo ? ((v - lo) / (hi - lo)) * 100 : 0}%`);
  }

  function setSeconds(value) {
    const [min, max] = secondsBounds();
    const v = clamp(Number(value), min, max);
    if (!Number.isFinite(v)) return;
    el.seconds.value = String(Math.round(v * 100) / 100);
    el.secondsRange.value = String(v);
    setRangeFill(el.secondsRange);
  }

  el.secondsRange.addEventListener("input", () => {
    el.seconds.value = el.secondsRange.value;
    setRangeFill(el.secondsRange);
  });
  el.seconds.addEventListener("input", () => {
    const v = Number(el.seconds.value);
    if (el.seconds.value !== "" && Number.isFinite(v)) {
      el.secondsRange.value = String(v);
      setRangeFill(el.secondsRange);
    }
  });
  el.seconds.addEventListener("change", () => {
    if (el.seconds.value.trim() !== "") setSeconds(el.seconds.value); // empty: the slider's, on send
  });

  $("#seed-dice").addEventListener("click", () => {
    const seed = crypto.getRandomValues(new Uint32Array(1))[0] >>> 1; // 31 bits, as the server
    el.seed.value = String(seed);
  });
  $("#seed-clear").addEventListener("click", () => {
    el.seed.value = "";
    el.seed.focus();
  });

  function applyDefaults(defaults, only = null) {
    for (const name of only || ADVANCED) {
      if (defaults[name] !== undefined && defaults[name] !== null) $(`#${name}`).value = defaults[name];
    }
  }

  $("#reset-advanced").addEventListener("click", () => applyDefaults(state.info.defaults));

  // LoRA adapters the server serves per song (GET /v1/info's "lora"): a picker and a strength.
  const loraSelect = $("#lora");
  const loraScale = $("#lora_scale");
  function showLoraScale() {
    loraScale.disabled = !loraSelect.value;
    $("#lora-scale-out").textContent = Number(loraScale.value).toFixed(2);
  }
  loraSelect.addEventListener("change", showLoraScale);
  loraScale.addEventListener("input", showLoraScale);

  function applyLora(adapters) {
    const list = Array.isArray(adapters) ? adapters : [];
    $("#lora-row").hidden = list.length === 0;
    const chosen = loraSelect.value;
    loraSelect.replaceChildren(
      h("option", { value: "", text: "none" }),
      ...list.map((a) => h("option", { value: a.name, text: a.name })),
    );
    if (list.some((a) => a.name === chosen)) loraSelect.value = chosen;
    showLoraScale();
  }

  function applyInfo(info) {
    state.info = info;
    applyLora(info.lora);
    const max = Number(info.max_seconds) || 240;
    const min = Math.min(1, max);
    for (const input of [el.seconds, el.secondsRange]) {
      input.max = String(max);
      input.min = String(min);
    }
    el.secondsRange.step = max <= 20 ? "0.1" : "1";
    el.extendSeconds.max = String(max);
    el.extendSeconds.min = String(min);
    if (!el.extendSeconds.dataset.touched) el.extendSeconds.value = String(Math.min(30, max));
    const d = info.defaults || {};
    setSeconds(d.seconds ?? max);
    el.format.replaceChildren(...(info.formats || ["mp3"]).map((f) => h("option", { value: f, text: f })));
    el.format.value = d.format || info.formats?.[0] || "mp3";
    applyDefaults(d);
    if (d.seed !== null && d.seed !== undefined) el.seed.value = d.seed;
    if (d.tags && !state.tags.length) setTags(splitTags(d.tags));
    if (d.lyrics && !el.lyrics.value) {
      el.lyrics.value = d.lyrics;
      renderLyrics();
    }
    const model = String(info.model || "").split(/[\\/]/).filter(Boolean).pop() || "model";
    $("#server-text").textContent = `${model} · ${info.device} · v${info.version}`;
    $("#server-info").title =
      `model ${info.model}\ndevice ${info.device}\nversion ${info.version}\n` +
      `up to ${info.max_seconds} s a song, ${info.songs_at_once} at once`;
    $("#server-dot").className = "dot ok";
  }

  function readForm() {
    commitTagInput();
    const body = { tags: state.tags.join(","), lyrics: el.lyrics.value };
    const seconds = Number(el.seconds.value.trim() || el.secondsRange.value);
    if (Number.isFinite(seconds)) {
      const [min, max] = secondsBounds();
      body.seconds = clamp(seconds, min, max);
      setSeconds(body.seconds);
    }
    if (el.seed.value.trim() !== "") body.seed = Math.trunc(Number(el.seed.value));
    for (const name of ADVANCED) {
      const raw = $(`#${name}`).value.trim();
      const v = Number(raw);
      if (raw !== "" && Number.isFinite(v)) body[name] = INTEGER_FIELDS.has(name) ? Math.round(v) : v;
    }
    body.format = el.format.value;
    if (window.heartmulaReference) Object.assign(body, window.heartmulaReference.field());
    if (loraSelect.value) {
      body.lora = loraSelect.value;
      body.lora_scale = Number(loraScale.value);
    }
    return body;
  }

  function fillForm(job) {
    const r = job.request || {};
    setTags(splitTags(r.tags || ""));
    el.tagsInput.value = "";
    el.lyrics.value = r.lyrics || "";
    renderLyrics();
    // an edit's request holds its LM part's length: the whole song's is its frames
    const seconds = job.edit && job.progress?.max_frames
      ? secondsOf(job.progress.max_frames - 1)
      : r.seconds;
    if (seconds !== undefined && seconds !== null) setSeconds(seconds);
    const seed = r.seed ?? job.seed;
    el.seed.value = seed === null || seed === undefined ? "" : String(seed);
    for (const name of ADVANCED) if (r[name] !== undefined && r[name] !== null) $(`#${name}`).value = r[name];
    const format = r.format || job.format;
    if (format && [...el.format.options].some((o) => o.value === format)) el.format.value = format;
    const lora = r.lora || "";
    loraSelect.value = [...loraSelect.options].some((o) => o.value === lora) ? lora : "";
    loraScale.value = String(r.lora_scale ?? 1);
    showLoraScale();
  }

  // ---- generate ----------------------------------------------------------------------------

  el.form.addEventListener("submit", async (e) => {
    e.preventDefault();
    unlockAudio(); // inside the click: the gesture that lets audio play
    const body = readForm();
    el.generate.disabled = true;
    el.generateLabel.textContent = "Sending…";
    try {
      startJob(await api("/v1/songs", { method: "POST", json: body }));
    } catch (err) {
      showApiError(err, "The song was not queued", $(".generate-row"));
    } finally {
      el.generate.disabled = false;
      el.generateLabel.textContent = "Generate";
    }
  });

  // A job just queued (a new song or an edit): followed, and played while it is made.
  function startJob(job) {
    hideError();
    upsertSong(job);
    follow(job, { autoplay: true });
    if (window.matchMedia("(max-width: 700px)").matches) {
      $("#now-playing").scrollIntoView({ behavior: "smooth", block: "start" });
    }
    refreshSongs();
  }

  // ---- following a job: events, progress, the player ---------------------------------------

  function stopFollowing() {
    if (state.events) {
      state.events.close();
      state.events = null;
    }
    clearInterval(state.poll);
    state.poll = null;
  }

  function follow(job, { autoplay = false } = {}) {
    stopFollowing();
    state.current = job;
    state.liveRetries = 0;
    wave.reset(job);
    renderCurrent();
    if (LIVE.has(job.state)) {
      setSource(job.urls.audio, { live: true, autoplay });
      openEvents(job);
    } else if (job.audio) {
      setSource(job.urls.audio, { live: false, autoplay });
      wave.loadFile(job);
    } else {
      clearSource();
    }
    renderSongs();
  }

  function openEvents(job) {
    let es;
    try {
      es = new EventSource(withKey(job.urls.events));
    } catch {
      startPolling(job.id);
      return;
    }
    state.events = es;
    const onData = (e, ended) => {
      let view;
      try {
        view = JSON.parse(e.data);
      } catch {
        return;
      }
      update(view);
      if (ended || !LIVE.has(view.state)) {
        if (state.events === es) stopFollowing();
        es.close();
      }
    };
    es.addEventListener("progress", (e) => onData(e, false));
    es.addEventListener("end", (e) => onData(e, true));
    es.onerror = () => {
      // closed for good (401, 404, the server gone): poll instead; otherwise it reconnects
      if (es.readyState === EventSource.CLOSED && state.events === es) {
        state.events = null;
        startPolling(job.id);
      }
    };
  }

  function startPolling(id) {
    clearInterval(state.poll);
    state.poll = setInterval(async () => {
      try {
        const view = await api(`/v1/songs/${encodeURIComponent(id)}`);
        update(view);
        if (!LIVE.has(view.state)) {
          clearInterval(state.poll);
          state.poll = null;
        }
      } catch (err) {
        if (err.status === 401 || err.status === 404) {
          clearInterval(state.poll);
          state.poll = null;
          showApiError(err);
        }
      }
    }, 1000);
  }

  // A newer view of a job, from its events, a poll or the list.
  function update(view) {
    const previous = state.songs.find((s) => s.id === view.id);
    upsertSong(view);
    if (!state.current || state.current.id !== view.id) {
      renderSongs();
      return;
    }
    const wasLive = LIVE.has(state.current.state);
    state.current = view;
    renderCurrent();
    renderSongs();
    if (wasLive && !LIVE.has(view.state)) ended(view, previous);
  }

  function ended(view) {
    refreshSongs();
    if (view.state === "failed") {
      showError(`The song failed${view.error ? `: ${view.error}` : "."}`);
    }
    if (view.audio) wave.loadFile(view);
    maybeSwitchToFile();
  }

  function renderCurrent() {
    const job = state.current;
    if (!job) return;
    el.npTitle.textContent = shortTags(job, 5);
    el.npTitle.title = job.request?.tags || "";
    const bits = [editLabel(job), `seed ${job.seed}`, fmtCreated(job.created_at), job.request?.format]
      .filter(Boolean);
    el.npSub.textContent = bits.join(" · ");
    el.npState.hidden = false;
    el.npState.textContent = job.state;
    el.npState.className = `badge s-${job.state}`;
    el.npCover.classList.toggle("live", job.state === "running");
    if (!LIVE.has(job.state) && job.audio) {
      el.npDownload.hidden = false;
      el.npDownload.href = withKey(job.urls.audio);
      el.npDownload.setAttribute("download", `song-${job.id}.${job.request?.format || "audio"}`);
    } else {
      el.npDownload.hidden = true;
    }
    renderProgress(job);
    renderEditPanel();
  }

  function renderProgress(job) {
    const p = job.progress || {};
    const t = job.timings || {};
    const done = job.state === "done";
    const fraction = done ? 1 : clamp(Number(p.fraction) || 0, 0, 1);
    const pct = done ? 100 : Math.min(99, Math.floor(fraction * 100));
    el.progressFill.style.width = `${pct}%`;
    el.progressBar.setAttribute("aria-valuenow", String(pct));
    el.progressBar.dataset.state = job.state;
    const words = {
      queued: "queued · waiting for a free slot",
      running: "making",
      done: "done",
      failed: "failed",
      cancelled: "cancelled",
      interrupted: "interrupted (the server stopped)",
    };
    el.progressText.textContent = job.state === "queued"
      ? `0% · ${words.queued}`
      : `${pct}% · ${words[job.state] || job.state}`;
    el.cancelCurrent.hidden = !LIVE.has(job.state);
    $("#stat-frames").textContent = p.max_frames ? `${p.frames} / ${p.max_frames}` : "–";
    $("#stat-audio").textContent = fmtSeconds(p.audio_seconds);
    $("#stat-rtf").textContent = t.rtf === null || t.rtf === undefined ? "–" : t.rtf.toFixed(2);
    $("#stat-rtf").title = "seconds of work per second of audio; under 1 is faster than real time";
    $("#stat-wait").textContent = fmtSeconds(t.queue_wait_s);
    $("#stat-ttfa").textContent = fmtSeconds(t.time_to_first_audio_s);
    $("#stat-seed").textContent = job.seed ?? "–";
  }

  el.cancelCurrent.addEventListener("click", () => state.current && cancelSong(state.current.id));

  // ---- the player --------------------------------------------------------------------------

  const player = el.player;

  function setSource(url, { live, autoplay, resumeAt = 0 }) {
    state.live = live;
    player.src = withKey(url) + (live ? `${KEY ? "&" : "?"}t=${Date.now()}` : "");
    player.load();
    if (resumeAt > 0) {
      player.addEventListener("loadedmetadata", () => {
        try {
          player.currentTime = resumeAt;
        } catch {
          /* not seekable yet: from the start */
        }
      }, { once: true });
    }
    el.playToggle.disabled = false;
    if (autoplay) playNow();
    renderTime();
  }

  function clearSource() {
    state.live = false;
    player.removeAttribute("src");
    player.load();
    el.playToggle.disabled = true;
    renderTime();
  }

  function playNow() {
    unlockAudio();
    const p = player.play();
    if (p && p.catch) {
      p.catch((err) => {
        if (err && err.name === "NotAllowedError") toast("Press ▶ to listen: the browser blocked autoplay");
      });
    }
  }

  // Once the song is final, the live stream gives way to the finished file (seekable, its real
  // length) as soon as the live stream is not playing any more.
  function maybeSwitchToFile() {
    const job = state.current;
    if (!job || !state.live || LIVE.has(job.state)) return;
    if (!job.audio) return;
    const total = Number(job.progress?.audio_seconds) || 0;
    const atEnd = total > 0 && player.currentTime >= total - 0.05;
    const stuck = !player.paused && player.readyState < 3 && stuckSince && Date.now() - stuckSince > 1500;
    if (player.paused || player.ended || player.error || atEnd || stuck) {
      const playing = !player.paused && !player.ended && !atEnd;
      const resumeAt = atEnd || player.ended ? 0 : player.currentTime;
      setSource(job.urls.audio, { live: false, autoplay: playing, resumeAt });
    }
  }

  let stuckSince = 0;
  setInterval(() => {
    if (state.live && !player.paused && player.readyState < 3) stuckSince ||= Date.now();
    else stuckSince = 0;
    maybeSwitchToFile();
  }, 500);

  player.addEventListener("error", () => {
    const job = state.current;
    if (!job || !player.getAttribute("src")) return;
    if (state.live && LIVE.has(job.state) && state.liveRetries < 3) {
      state.liveRetries += 1; // the live stream broke: listen again, from its start
      setTimeout(() => {
        if (state.live && state.current === job) setSource(job.urls.audio, { live: true, autoplay: true });
      }, 1000);
    } else if (state.live) {
      maybeSwitchToFile();
    }
  });

  for (const ev of ["play", "pause", "ended", "playing"]) {
    player.addEventListener(ev, () => {
      const playing = !player.paused && !player.ended;
      el.playToggle.classList.toggle("playing", playing);
      el.playToggle.setAttribute("aria-label", playing ? "Pause" : "Play");
      if (ev === "play" && audioGraph.ctx && audioGraph.ctx.state === "suspended") {
        audioGraph.ctx.resume().catch(() => {});
      }
      if (ev === "ended") maybeSwitchToFile();
    });
  }
  for (const ev of ["timeupdate", "durationchange", "loadedmetadata", "emptied"]) {
    player.addEventListener(ev, renderTime);
  }

  function knownDuration() {
    if (state.live) {
      const job = state.current;
      return job && !LIVE.has(job.state) ? Number(job.progress?.audio_seconds) || null : null;
    }
    const d = player.duration;
    return Number.isFinite(d) && d > 0 ? d : null;
  }

  function renderTime() {
    const t = player.currentTime || 0;
    const d = knownDuration();
    el.seek.disabled = state.live || !d;
    if (!el.seek.matches(":active")) el.seek.value = d ? String(Math.round((t / d) * 1000)) : "0";
    setRangeFill(el.seek);
    const job = state.current;
    let html;
    if (state.live && job && LIVE.has(job.state)) {
      const made = Number(job.progress?.audio_seconds) || 0;
      html = `${fmtClock(t)} / ${fmtClock(made)} <span class="live">● LIVE</span>`;
    } else {
      html = d ? `${fmtClock(t)} / ${fmtClock(d)}` : fmtClock(t);
    }
    if (html !== lastTime) el.time.innerHTML = lastTime = html;
  }
  let lastTime = "";

  el.playToggle.addEventListener("click", () => {
    if (!player.getAttribute("src")) return;
    if (player.paused || player.ended) playNow();
    else player.pause();
  });

  el.seek.addEventListener("input", () => {
    const d = knownDuration();
    if (d && !state.live) player.currentTime = (Number(el.seek.value) / 1000) * d;
  });

  // ---- Web Audio: levels while playing (optional: playback never depends on it) -------------

  const audioGraph = { ctx: null, analyser: null, failed: false, buffer: null };

  function unlockAudio() {
    if (audioGraph.failed) return;
    try {
      if (!audioGraph.ctx) {
        const AC = window.AudioContext || window.webkitAudioContext;
        if (!AC) {
          audioGraph.failed = true;
          return;
        }
        const ctx = new AC();
        const source = ctx.createMediaElementSource(player);
        const analyser = ctx.createAnalyser();
        analyser.fftSize = 2048;
        analyser.smoothingTimeConstant = 0.6;
        source.connect(analyser);
        analyser.connect(ctx.destination);
        audioGraph.ctx = ctx;
        audioGraph.analyser = analyser;
        audioGraph.buffer = new Float32Array(analyser.fftSize);
      }
      if (audioGraph.ctx.state === "suspended") audioGraph.ctx.resume().catch(() => {});
    } catch {
      audioGraph.failed = true;
      audioGraph.analyser = null;
    }
  }

  function currentLevel() {
    const a = audioGraph.analyser;
    if (!a || !audioGraph.ctx || audioGraph.ctx.state !== "running") return null;
    a.getFloatTimeDomainData(audioGraph.buffer);
    let sum = 0;
    for (const x of audioGraph.buffer) sum += x * x;
    return Math.sqrt(sum / audioGraph.buffer.length);
  }

  // ---- the waveform ------------------------------------------------------------------------

  const BUCKETS = 480;
  const wave = {
    jobId: null,
    peaks: null, // the finished file's, decoded
    levels: new Float32Array(BUCKETS), // measured while playing the live stream
    lastBucket: -1,
    loading: null,

    reset(job) {
      this.jobId = job ? job.id : null;
      this.peaks = null;
      this.levels = new Float32Array(BUCKETS);
      this.lastBucket = -1;
      this.loading = null;
    },

    async loadFile(job) {
      if (this.loading === job.id || (this.peaks && this.jobId === job.id)) return;
      this.loading = job.id;
      try {
        const OAC = window.OfflineAudioContext || window.webkitOfflineAudioContext;
        if (!OAC) return;
        const headers = KEY ? { "X-API-Key": KEY } : {};
        const res = await fetch(withKey(job.urls.audio), { headers, cache: "no-store" });
        if (!res.ok) return;
        const data = await res.arrayBuffer();
        const decoded = await new OAC(1, 1, 48000).decodeAudioData(data);
        if (this.jobId !== job.id) return;
        this.peaks = peaksOf(decoded, BUCKETS);
      } catch {
        /* no waveform: the player still plays */
      } finally {
        if (this.loading === job.id) this.loading = null;
      }
    },
  };

  function peaksOf(buffer, n) {
    const channels = [];
    for (let c = 0; c < buffer.numberOfChannels; c++) channels.push(buffer.getChannelData(c));
    const len = buffer.length;
    const out = new Float32Array(n);
    let top = 0;
    for (let i = 0; i < n; i++) {
      const a = Math.floor((i * len) / n);
      const b = Math.max(a + 1, Math.floor(((i + 1) * len) / n));
      let sum = 0;
      let count = 0;
      for (const ch of channels) {
        for (let j = a; j < b && j < len; j += 4) {
          sum += ch[j] * ch[j];
          count += 1;
        }
      }
      out[i] = count ? Math.sqrt(sum / count) : 0;
      top = Math.max(top, out[i]);
    }
    if (top > 0) for (let i = 0; i < n; i++) out[i] /= top;
    return out;
  }

  function sizeCanvas() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(el.canvas.clientWidth * dpr));
    const hgt = Math.max(1, Math.round(el.canvas.clientHeight * dpr));
    if (el.canvas.width !== w || el.canvas.height !== hgt) {
      el.canvas.width = w;
      el.canvas.height = hgt;
    }
  }

  function drawWave() {
    sizeCanvas();
    const c = el.canvas;
    const g = c.getContext("2d");
    if (!g) return;
    const W = c.width;
    const H = c.height;
    const dpr = window.devicePixelRatio || 1;
    g.clearRect(0, 0, W, H);
    const mid = H / 2;
    const job = state.current;
    const bar = 3 * dpr;
    const gap = 2 * dpr;
    const n = Math.max(8, Math.floor(W / (bar + gap)));

    if (!job || !player.getAttribute("src")) {
      g.fillStyle = "#2b3043";
      for (let i = 0; i < n; i++) {
        const hh = (2 + 3 * Math.abs(Math.sin(i * 0.35))) * dpr;
        g.fillRect(i * (bar + gap), mid - hh / 2, bar, hh);
      }
      return;
    }

    const expected = expectedSeconds(job);
    const t = player.currentTime || 0;
    const making = LIVE.has(job.state);
    // Once the song has ended, one time axis for its waveform, playhead and selection: its length.
    const total = (!making && axisSeconds()) || knownDuration() || expected;
    const pos = making ? clamp(t / expected, 0, 1) : clamp(t / total, 0, 1);

    // while live: the level of what is heard, per bucket of the song's longest length
    if (state.live && making && !player.paused) {
      const level = currentLevel();
      if (level !== null) {
        const b = Math.min(BUCKETS - 1, Math.floor((t / expected) * BUCKETS));
        const from = wave.lastBucket < b ? wave.lastBucket + 1 : b;
        for (let i = Math.max(0, from); i <= b; i++) wave.levels[i] = Math.max(wave.levels[i], Math.min(1, level * 3.5));
        wave.lastBucket = b;
      }
    }

    let source;
    if (wave.peaks && !making) {
      source = wave.peaks; // the finished file's, even while its live stream still plays
    } else {
      source = wave.levels;
      // the part already made, ahead of the playhead
      const made = clamp((Number(job.progress?.audio_seconds) || 0) / expected, 0, 1);
      if (making && made > 0) {
        g.fillStyle = "rgba(141, 99, 255, 0.10)";
        g.fillRect(0, 0, made * W, H);
      }
    }
    const shows = source === wave.peaks ? "file" : "live"; // what the waveform is drawn from
    if (c.dataset.wave !== shows) c.dataset.wave = shows;
    const grad = g.createLinearGradient(0, 0, W, 0);
    grad.addColorStop(0, "#ff5a87");
    grad.addColorStop(1, "#8d63ff");
    for (let i = 0; i < n; i++) {
      const x = i * (bar + gap);
      const frac = i / n;
      const v = source[Math.min(source.length - 1, Math.floor(frac * source.length))] || 0;
      const hh = Math.max(2 * dpr, v * (H - 10 * dpr));
      g.fillStyle = frac <= pos ? grad : "#343a50";
      g.fillRect(x, mid - hh / 2, bar, hh);
    }
    // an edit's song: the part made anew, marked along the top
    const n0 = songFrames(job);
    if (job.edit && !making && n0 > 0) {
      const a = (job.edit.start / n0) * W;
      const b = ((job.edit.end ?? n0) / n0) * W;
      g.fillStyle = "rgba(141, 99, 255, 0.95)";
      g.fillRect(a, 0, Math.max(dpr, b - a), 3 * dpr);
    }
    drawSelection(g, W, H, dpr);
    // playhead
    g.fillStyle = "rgba(255, 255, 255, 0.85)";
    g.fillRect(Math.round(pos * W) - dpr, 0, 2 * dpr, H);
  }

  // The section to regenerate, over the waveform: a band, its edges with grips, its times.
  function drawSelection(g, W, H, dpr) {
    const job = state.current;
    const span = regenSpan();
    if (!span) return;
    const n = songFrames(job);
    const x0 = Math.round((span.start / n) * W);
    const toEnd = span.end === null;
    const x1 = Math.round(((toEnd ? n : span.end) / n) * W);
    g.fillStyle = "rgba(141, 99, 255, 0.26)";
    g.fillRect(x0, 0, x1 - x0, H);
    g.fillStyle = "rgba(255, 255, 255, 0.10)";
    g.fillRect(x0, 0, x1 - x0, 2 * dpr);
    g.fillRect(x0, H - 2 * dpr, x1 - x0, 2 * dpr);
    const edges = toEnd ? [x0] : [x0, x1];
    for (const x of edges) {
      g.fillStyle = "#ff5a87";
      g.fillRect(x - dpr, 0, 2 * dpr, H);
      if (!selection()) continue; // "from here": the playhead's, nothing to drag
      const gw = 8 * dpr;
      const gh = 26 * dpr;
      roundRect(g, x - gw / 2, H / 2 - gh / 2, gw, gh, 3 * dpr, "#ff5a87");
      g.fillStyle = "rgba(255, 255, 255, 0.85)";
      g.fillRect(x - 0.5 * dpr, H / 2 - gh / 4, dpr, gh / 2);
    }
    // times: the start's at the top, the end's at the bottom (they never collide)
    g.font = `600 ${11 * dpr}px ui-monospace, "DejaVu Sans Mono", Menlo, monospace`;
    g.textBaseline = "middle";
    const label = (text, x, y, after) => {
      const w = g.measureText(text).width + 10 * dpr;
      const h = 17 * dpr;
      let left = after ? x + 5 * dpr : x - 5 * dpr - w;
      if (left + w > W - 2 * dpr) left = x - 5 * dpr - w; // no room: the other side
      if (left < 2 * dpr) left = Math.min(x + 5 * dpr, W - w - 2 * dpr);
      roundRect(g, left, y, w, h, 5 * dpr, "rgba(14, 15, 20, 0.88)");
      g.fillStyle = "#eceef5";
      g.fillText(text, left + 5 * dpr, y + h / 2 + 0.5 * dpr);
    };
    label(fmtPrecise(secondsOf(span.start)), x0, 4 * dpr, true);
    if (!toEnd) label(fmtPrecise(secondsOf(span.end)), x1, H - 21 * dpr, false);
  }

  function roundRect(g, x, y, w, h, r, fill) {
    g.fillStyle = fill;
    g.beginPath();
    if (g.roundRect) g.roundRect(x, y, w, h, r);
    else g.rect(x, y, w, h);
    g.fill();
  }

  // ---- editing: select a section, regenerate it; extend ------------------------------------

  const selections = new Map(); // job id -> {start, end}: a section in frames, kept per song
  const edit = { busy: false, drag: null, shown: "" };

  function editable(job) {
    return !!job && EDITABLE.has(job.state) && !!job.audio && songFrames(job) > 1;
  }

  // The song's length in frames as its waveform shows it (the audio of a song cut short may
  // end before its last frames).
  function songFrames(job) {
    const frames = Number(job?.progress?.frames) || 0;
    const audio = Number(job?.progress?.audio_seconds) || 0;
    return audio > 0 ? Math.min(frames, Math.round(audio / FRAME_S)) : frames;
  }

  // The time axis of an ended song's waveform (seconds), or null.
  function axisSeconds() {
    const job = state.current;
    if (!job || LIVE.has(job.state)) return null;
    const n = songFrames(job);
    return n > 0 ? n * FRAME_S : null;
  }

  function selection() {
    const job = state.current;
    return editable(job) ? selections.get(job.id) || null : null;
  }

  function setSelection(start, end) {
    const job = state.current;
    const n = songFrames(job);
    // as the server takes it: from the second frame on, at least one frame, by the song's end
    const s = clamp(Math.round(start), 1, n - 1);
    selections.set(job.id, { start: s, end: clamp(Math.round(end), s + 1, n) });
  }

  function clearSelection() {
    if (state.current) selections.delete(state.current.id);
  }

  // What "Regenerate" would send, in frames: {start, end} or {start, end: null} (to the end:
  // from the selection's start, or from the playhead without one); null if nothing is chosen.
  function regenSpan() {
    const job = state.current;
    if (!editable(job)) return null;
    const sel = selection();
    if (el.regenToEnd.checked) {
      const n = songFrames(job);
      const here = Math.round((player.currentTime || 0) / FRAME_S);
      return { start: sel ? sel.start : clamp(here, 1, n - 1), end: null };
    }
    return sel ? { start: sel.start, end: sel.end } : null;
  }

  function renderEditPanel() {
    const job = state.current;
    const show = !!job && (LIVE.has(job.state) || (job.state !== "failed" && !!job.audio));
    const ok = show && editable(job);
    const span = ok ? regenSpan() : null;
    const key = [show, ok, edit.busy, span?.start, span?.end, !!selection(), job?.state].join("|");
    if (key === edit.shown) return;
    edit.shown = key;
    el.editPanel.hidden = !show;
    el.canvas.dataset.select = ok ? "on" : "off";
    el.canvas.title = ok ? "Click to play from there; drag across to select a section" : "";
    if (!show) return;
    el.regen.disabled = !span || edit.busy;
    el.extend.disabled = !ok || edit.busy;
    el.regenToEnd.disabled = !ok;
    el.selectionClear.hidden = !selection();
    el.regenLabel.textContent = el.regenToEnd.checked ? "Regenerate to the end" : "Regenerate section";
    const time = (id, frames) => h("span", { id, class: "sel-time", text: fmtPrecise(secondsOf(frames)) });
    let parts;
    if (!ok) {
      parts = [LIVE.has(job.state)
        ? "Once the song is made, select a section of it here"
        : "This song has nothing to edit"];
    } else if (!span) {
      parts = ["Drag across the waveform to select a section"];
    } else if (span.end === null) {
      const n = songFrames(job);
      parts = [selection() ? "From " : "From here, ", time("sel-start", span.start), " to the end ",
        h("span", { class: "sel-len", text: `· ${fmtSeconds(secondsOf(n - span.start))}` })];
    } else {
      parts = [time("sel-start", span.start), " – ", time("sel-end", span.end), " ",
        h("span", { class: "sel-len", text: `· ${fmtSeconds(secondsOf(span.end - span.start))}` })];
    }
    el.selectionText.replaceChildren(...parts);
    el.selectionText.classList.toggle("has-span", !!span);
  }

  // Dragging on the waveform: a new section, or an edge of the one there; a click seeks.
  const HANDLE_PX = { mouse: 8, pen: 12, touch: 20 };
  const DRAG_PX = 4;

  function waveX(clientX) {
    const r = el.canvas.getBoundingClientRect();
    const w = el.canvas.clientWidth || r.width;
    const px = clientX - r.left - el.canvas.clientLeft;
    return { px, w, frac: clamp(px / w, 0, 1) };
  }

  function handleAt(clientX, kind) {
    const sel = selection();
    if (!sel) return null;
    const n = songFrames(state.current);
    const at = waveX(clientX);
    const sx = (sel.start / n) * at.w;
    const ex = el.regenToEnd.checked ? Infinity : (sel.end / n) * at.w;
    const tol = HANDLE_PX[kind] || HANDLE_PX.mouse;
    const ds = Math.abs(at.px - sx);
    const de = Math.abs(at.px - ex);
    if (ds > tol && de > tol) return null;
    if (ds <= tol && de <= tol) return at.px < (sx + ex) / 2 ? "start" : "end";
    return ds <= tol ? "start" : "end";
  }

  function dragStart(clientX, clientY, kind) {
    const job = state.current;
    const ok = editable(job);
    edit.drag = {
      mode: (ok && handleAt(clientX, kind)) || "new",
      x0: clientX,
      y0: clientY,
      moved: false,
      ok,
      jobId: job && job.id,
      anchor: ok ? waveX(clientX).frac * songFrames(job) : 0,
    };
  }

  // True once the gesture is a drag of the selection (the page should not scroll for it).
  function dragMove(clientX, clientY) {
    const g = edit.drag;
    const job = state.current;
    if (!g || !g.ok || !job || job.id !== g.jobId) return false;
    if (!g.moved) {
      const dx = Math.abs(clientX - g.x0);
      if (dx < DRAG_PX) return false;
      if (Math.abs(clientY - g.y0) > dx) {
        edit.drag = null; // a scroll, not a selection
        return false;
      }
      g.moved = true;
    }
    const n = songFrames(job);
    const f = clamp(waveX(clientX).frac * n, 0, n);
    const sel = selections.get(job.id);
    let start;
    let end;
    if (g.mode === "new" || !sel) {
      start = Math.min(g.anchor, f);
      end = Math.max(g.anchor, f);
    } else if (g.mode === "start") {
      [start, end] = [f, sel.end];
      if (f >= sel.end && !el.regenToEnd.checked) [start, end, g.mode] = [sel.end, f, "end"];
    } else {
      [start, end] = [sel.start, f];
      if (f <= sel.start) [start, end, g.mode] = [f, sel.start, "start"];
    }
    setSelection(start, end);
    renderEditPanel();
    return true;
  }

  function dragEnd(clientX) {
    const g = edit.drag;
    edit.drag = null;
    if (!g || g.moved) return;
    // a click: seek there; a click outside the selection drops it
    const at = waveX(clientX);
    const sel = selection();
    if (sel) {
      const f = at.frac * songFrames(state.current);
      const end = el.regenToEnd.checked ? Infinity : sel.end;
      if (f < sel.start || f > end) clearSelection();
    }
    const d = axisSeconds() || knownDuration();
    if (d && !state.live) player.currentTime = at.frac * d;
    renderEditPanel();
  }

  function hover(clientX) {
    el.canvas.classList.toggle("at-edge", !!handleAt(clientX, "mouse"));
  }

  if (window.PointerEvent) {
    el.canvas.addEventListener("pointerdown", (e) => {
      if (!e.isPrimary || (e.pointerType === "mouse" && e.button !== 0)) return;
      dragStart(e.clientX, e.clientY, e.pointerType);
      try {
        el.canvas.setPointerCapture(e.pointerId);
      } catch {
        /* the drag ends at the canvas's edge */
      }
      if (e.pointerType === "mouse") e.preventDefault(); // no text selection
    });
    el.canvas.addEventListener("pointermove", (e) => {
      if (edit.drag) {
        if (e.isPrimary && dragMove(e.clientX, e.clientY)) e.preventDefault();
      } else if (e.pointerType === "mouse") {
        hover(e.clientX);
      }
    });
    el.canvas.addEventListener("pointerup", (e) => e.isPrimary && dragEnd(e.clientX));
    el.canvas.addEventListener("pointercancel", () => (edit.drag = null));
  } else {
    // browsers without pointer events: the mouse, and touch events
    el.canvas.addEventListener("mousedown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      dragStart(e.clientX, e.clientY, "mouse");
      const move = (ev) => dragMove(ev.clientX, ev.clientY);
      const up = (ev) => {
        window.removeEventListener("mousemove", move);
        window.removeEventListener("mouseup", up);
        dragEnd(ev.clientX);
      };
      window.addEventListener("mousemove", move);
      window.addEventListener("mouseup", up);
    });
    el.canvas.addEventListener("mousemove", (e) => !edit.drag && hover(e.clientX));
    el.canvas.addEventListener("touchstart", (e) => {
      if (e.touches.length !== 1) {
        edit.drag = null; // two fingers: a zoom, not a selection
        return;
      }
      dragStart(e.touches[0].clientX, e.touches[0].clientY, "touch");
    }, { passive: true });
    el.canvas.addEventListener("touchmove", (e) => {
      if (edit.drag && dragMove(e.touches[0].clientX, e.touches[0].clientY)) e.preventDefault();
    }, { passive: false });
    el.canvas.addEventListener("touchend", (e) => {
      if (!edit.drag) return;
      e.preventDefault(); // no mouse events made up after it
      dragEnd(e.changedTouches[0].clientX);
    });
    el.canvas.addEventListener("touchcancel", () => (edit.drag = null));
  }

  el.selectionClear.addEventListener("click", () => {
    clearSelection();
    renderEditPanel();
  });
  el.regenToEnd.addEventListener("change", () => {
    edit.shown = "";
    renderEditPanel();
  });
  el.extendSeconds.addEventListener("input", () => (el.extendSeconds.dataset.touched = "1"));

  async function postEdit(kind) {
    const job = state.current;
    if (!editable(job) || edit.busy) return;
    unlockAudio(); // inside the click: the gesture that lets audio play
    let body;
    if (kind === "regen") {
      const span = regenSpan();
      if (!span) return;
      body = { from: secondsOf(span.start) };
      if (span.end !== null) body.to = secondsOf(span.end);
    } else {
      const lo = Number(el.extendSeconds.min) || 1;
      const hi = Number(el.extendSeconds.max) || state.info.max_seconds;
      const raw = el.extendSeconds.value.trim();
      const v = raw === "" || !Number.isFinite(Number(raw)) ? Math.min(30, hi) : Number(raw);
      body = { seconds: clamp(v, lo, hi) };
      el.extendSeconds.value = String(body.seconds);
    }
    if (el.useForm.checked) {
      commitTagInput();
      body.tags = state.tags.join(",");
      body.lyrics = el.lyrics.value;
    }
    const [button, label, idle] = kind === "regen"
      ? [el.regen, el.regenLabel, el.regenLabel.textContent]
      : [el.extend, el.extendLabel, "Extend"];
    edit.busy = true;
    renderEditPanel();
    label.textContent = "Sending…";
    try {
      const view = await api(`/v1/songs/${encodeURIComponent(job.id)}/${kind}`, { method: "POST", json: body });
      startJob(view);
      toast(kind === "regen" ? `Making it again: ${editLabel(view)}` : `Making it longer: ${editLabel(view)}`);
    } catch (err) {
      const what = kind === "regen" ? "The section was not regenerated" : "The song was not extended";
      showApiError(err, what, button.closest(".edit-row"));
    } finally {
      edit.busy = false;
      label.textContent = idle;
      edit.shown = "";
      renderEditPanel();
      button.blur();
    }
  }

  el.regen.addEventListener("click", () => postEdit("regen"));
  el.extend.addEventListener("click", () => postEdit("extend"));

  (function loop() {
    drawWave();
    if (!player.paused) renderTime();
    renderEditPanel(); // "from here" follows the playhead
    requestAnimationFrame(loop);
  })();

  // ---- queue and history -------------------------------------------------------------------

  const itemCache = new Map(); // id -> {li, sig}

  function upsertSong(view) {
    const i = state.songs.findIndex((s) => s.id === view.id);
    if (i >= 0) state.songs[i] = view;
    else state.songs.unshift(view);
  }

  async function refreshSongs() {
    if (state.refreshing) return;
    state.refreshing = true;
    try {
      const data = await api("/v1/songs?limit=50");
      state.songs = data.songs || [];
      $("#server-dot").className = "dot ok";
      const mine = state.current && state.songs.find((s) => s.id === state.current.id);
      if (mine && !state.events && !state.poll) update(mine);
      renderSongs();
    } catch (err) {
      $("#server-dot").className = "dot bad";
      if (err.status === 401) showApiError(err);
    } finally {
      state.refreshing = false;
    }
  }

  function songSig(job) {
    const current = state.current && state.current.id === job.id;
    const p = job.progress || {};
    return [job.state, p.frames, p.audio_seconds, job.audio, job.error, current].join("|");
  }

  const ICONS = {
    play: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M8 5.5v13l11-6.5z"/></svg>',
    download: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 4v11m0 0-4.5-4.5M12 15l4.5-4.5M5 19.5h14" fill="none" stroke="currentColor" stroke-width="1.9" stroke-linecap="round" stroke-linejoin="round"/></svg>',
    cancel: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="6.5" y="6.5" width="11" height="11" rx="2"/></svg>',
    again: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4.5 12a7.5 7.5 0 0 1 13-5.1M19.5 12a7.5 7.5 0 0 1-13 5.1M17.5 3v4h-4M6.5 21v-4h4" fill="none" stroke="currentColor" stroke-width="1.9" stroke-linecap="round" stroke-linejoin="round"/></svg>',
    edit: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="6.5" cy="7" r="2.7" fill="none" stroke="currentColor" stroke-width="1.8"/><circle cx="6.5" cy="17" r="2.7" fill="none" stroke="currentColor" stroke-width="1.8"/><path d="M8.8 8.5 20 16.5M8.8 15.5 20 7.5" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linecap="round"/></svg>',
  };

  function songItem(job) {
    const live = LIVE.has(job.state);
    const p = job.progress || {};
    const r = job.request || {};
    const longest = job.edit ? expectedSeconds(job) : r.seconds; // an edit's request says less
    const length = job.state === "done" || (!live && p.audio_seconds)
      ? fmtSeconds(p.audio_seconds)
      : job.state === "running"
        ? `${fmtSeconds(p.audio_seconds)} of ≤ ${fmtSeconds(longest)}`
        : `≤ ${fmtSeconds(longest)}`;
    const meta = [length, `seed ${job.seed}`, fmtCreated(job.created_at)];
    const isCurrent = state.current && state.current.id === job.id;
    const actions = h("div", { class: "song-actions" });
    if (job.audio) {
      actions.append(h("button", { type: "button", class: "icon-btn act-play", title: "Play",
        "aria-label": "Play", dataset: { act: "play" }, html: ICONS.play }));
    }
    if (!live && job.audio) {
      actions.append(h("a", { class: "icon-btn act-download", title: "Download", "aria-label": "Download",
        href: withKey(job.urls.audio), download: `song-${job.id}.${r.format || "audio"}`,
        html: ICONS.download }));
    }
    if (editable(job)) {
      actions.append(h("button", { type: "button", class: "icon-btn act-edit",
        title: "Edit: regenerate a section, or extend", "aria-label": "Edit", dataset: { act: "edit" },
        html: ICONS.edit }));
    }
    if (live) {
      actions.append(h("button", { type: "button", class: "icon-btn act-cancel", title: "Cancel",
        "aria-label": "Cancel", dataset: { act: "cancel" }, html: ICONS.cancel }));
    }
    actions.append(h("button", { type: "button", class: "icon-btn act-again", title: "Same settings again",
      "aria-label": "Same settings again", dataset: { act: "again" }, html: ICONS.again }));

    const li = h("li", { class: `song${isCurrent ? " current" : ""}`, dataset: { id: job.id, state: job.state } },
      h("div", { class: "song-main" },
        h("div", { class: "song-title" },
          h("span", { class: "song-tags", title: r.tags || "", text: shortTags(job) }),
          h("span", { class: `badge s-${job.state}`, text: job.state })),
        job.edit && h("div", { class: `song-edit e-${job.edit.kind}`, title: `${job.edit.kind} of song ${job.edit.of}` },
          h("span", { class: "song-edit-mark", "aria-hidden": "true", text: job.edit.kind === "extend" ? "⟶" : "↻" }),
          h("span", { class: "song-edit-text", text: editLabel(job) })),
        h("div", { class: "song-meta", title: `${job.id} · ${new Date(job.created_at * 1000).toLocaleString()}` },
          meta.flatMap((m, i) => (i ? [h("span", { class: "sep", text: "·" }), m] : [m])))),
      actions,
    );
    if (job.state === "running") {
      const bar = h("div", { class: "song-progress" }, h("div"));
      bar.firstChild.style.width = `${Math.floor(clamp(p.fraction || 0, 0, 1) * 100)}%`;
      li.append(bar);
    }
    if (job.error) li.append(h("div", { class: "song-error", text: job.error }));
    return li;
  }

  function reconcile(list, jobs) {
    const nodes = jobs.map((job) => {
      const sig = songSig(job);
      let entry = itemCache.get(job.id);
      if (!entry || entry.sig !== sig) {
        entry = { li: songItem(job), sig };
        itemCache.set(job.id, entry);
      }
      return entry.li;
    });
    const kids = list.children;
    const same = nodes.length === kids.length && nodes.every((n, i) => kids[i] === n);
    if (!same) list.replaceChildren(...nodes);
  }

  function renderSongs() {
    const queued = state.songs.filter((s) => LIVE.has(s.state));
    const past = state.songs.filter((s) => !LIVE.has(s.state));
    const ids = new Set(state.songs.map((s) => s.id));
    for (const id of itemCache.keys()) if (!ids.has(id)) itemCache.delete(id);
    reconcile(el.queue, queued);
    reconcile(el.history, past);
    el.queueCard.hidden = !queued.length;
    const running = queued.filter((s) => s.state === "running").length;
    el.queueCount.textContent = `${running} making · ${queued.length - running} waiting`;
    el.historyCount.textContent = past.length ? `${past.length} song${past.length === 1 ? "" : "s"}` : "";
    el.historyEmpty.hidden = past.length > 0;
  }

  function onListClick(e) {
    const target = e.target.closest("[data-act]");
    if (!target) return;
    const li = target.closest("li.song");
    const job = li && state.songs.find((s) => s.id === li.dataset.id);
    if (!job) return;
    const act = target.dataset.act;
    if (act === "play") {
      unlockAudio();
      hideError();
      follow(job, { autoplay: true });
      if (window.matchMedia("(max-width: 700px)").matches) {
        $("#now-playing").scrollIntoView({ behavior: "smooth", block: "start" });
      }
    } else if (act === "edit") {
      hideError();
      if (!state.current || state.current.id !== job.id) follow(job, { autoplay: false });
      $("#now-playing").scrollIntoView({ behavior: "smooth", block: "nearest" });
      toast("Drag across the waveform to select a section, or extend the song");
    } else if (act === "cancel") {
      cancelSong(job.id, target);
    } else if (act === "again") {
      fillForm(job);
      toast(`Settings loaded · seed ${job.request?.seed ?? job.seed}`);
      el.form.scrollIntoView({ behavior: "smooth", block: "start" });
    }
  }

  el.queue.addEventListener("click", onListClick);
  el.history.addEventListener("click", onListClick);

  async function cancelSong(id, button) {
    if (button) button.disabled = true;
    toast("Cancelling…");
    try {
      const view = await api(`/v1/songs/${encodeURIComponent(id)}`, { method: "DELETE" });
      update(view);
      toast(`Song ${view.state}`);
    } catch (err) {
      showApiError(err, "Not cancelled");
    } finally {
      if (button) button.disabled = false;
      refreshSongs();
    }
  }

  // ---- start -------------------------------------------------------------------------------

  async function start() {
    buildTagGroups();
    renderTags();
    renderLyrics();
    try {
      applyInfo(await api("/v1/info"));
    } catch (err) {
      applyInfo(FALLBACK_INFO);
      $("#server-text").textContent = "server not answering";
      $("#server-dot").className = "dot bad";
      showApiError(err, "Cannot read the server's settings");
    }
    await refreshSongs();
    setInterval(() => {
      if (!document.hidden) refreshSongs();
    }, REFRESH_MS);
    document.body.dataset.ready = "true";
  }

  start();
})();
