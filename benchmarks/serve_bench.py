"""Load on `heartmula-rt serve`: N concurrent synthetic clients, each posting its songs one after
another and listening to each song's live audio to its end.

    python benchmarks/serve_bench.py --model-path DIR --batch 4 --clients 4 --songs-per-client 2 \\
        --seconds 4 --name serve-tiny
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --clients 8 --seconds 20

Without `--url` it starts the server itself (`python -m heartmula_rt.cli serve` on a free
loopback port, its jobs and log in a temporary folder) and stops it with SIGTERM at the end,
whatever happens; the server options after `--model-path` are passed through. Only loopback
servers are driven. Each client is a thread with its own `httpx.Client`; for each song it posts
`{"tags", "lyrics", "seconds", "seed", "format": "wav"}` (a 429 is retried after its Retry-After,
and counted), reads `GET urls.audio` to its end (client-side time to first audio: from the
accepted POST to the first audio bytes after the 44-byte WAV header), then reads the job until
it is final, for the server's timings. `--warmup` songs (made at once, not counted) come first:
kernel compilation, graph capture and the codec's first window happen there. `GET /metrics` is
sampled once a second throughout. Everything is bounded: every request has a timeout and the
whole run `--deadline-s`; songs still unfinished then count as failed (and are cancelled).

Random weights sample the audio EOS after a few frames: serve a random checkpoint made with
`tools/make_checkpoint.py --never-eos`, whose songs run to their length.

Prints a table and writes `{UTC date}_{device}_{name}.json` to `--out-dir` (fields:
benchmarks/README.md, "Load on the server").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # heartmula_rt from this checkout when it is not installed

from heartmula_rt.serve.process import ServerProcess  # noqa: E402

WAV_HEADER_BYTES = 44
BYTES_PER_SECOND = 48_000 * 2 * 2  # 16-bit stereo at 48 kHz, as the live stream sends it
FINAL = ("done", "failed", "cancelled", "interrupted")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
REQUEST_TIMEOUT_S = 30.0  # any request but the audio stream's reads
JOB_FINAL_WAIT_S = 60.0  # the stream ends as the song's file is written; its record follows
SONGS = [  # (tags, lyrics): a few prompts of different lengths, song i takes i % len
    ("piano,happy", "[verse]\nla la la\n[chorus]\noh oh oh\n"),
    ("rock,energetic,guitar", "[verse]\nwe run all night\nunder the city light\n"),
    ("jazz,calm,saxophone", "[intro]\n\n[verse]\nslow rain on the window\nslow coffee\n"),
    ("electronic,dance", "[verse]\nmove your feet\n[chorus]\nfeel the beat\nfeel the beat\n"),
]
# Server options passed through to `heartmula-rt serve` when it is started here.
SERVER_OPTIONS = {
    "--batch": int,
    "--max-queue": int,
    "--max-seconds": float,
    "--engine": str,
    "--device": str,
    "--threads": int,
    "--dtype": str,
    "--quant": str,
    "--codec-dtype": str,
}


# -- the server --------------------------------------------------------------------------------


def check_url(url: str) -> str:
    """The base URL, refused unless it is http on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in {h.strip("[]") for h in LOOPBACK}:
        raise SystemExit(f"--url must be http://127.0.0.1:PORT or http://localhost:PORT, not {url}")
    return f"http://{parts.netloc}"


# -- the clients -------------------------------------------------------------------------------


class Run:
    """What every client shares: the server, the deadline and the counts."""

    def __init__(self, url: str, seconds: float, deadline: float) -> None:
        self.url, self.seconds, self.deadline = url, seconds, deadline
        self.lock = threading.Lock()
        self.http_429 = 0
        self.unfinished: set[str] = set()  # job ids posted and not yet final

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, read: float = REQUEST_TIMEOUT_S) -> httpx.Timeout:
        """A request's timeouts, none past the deadline."""
        left = max(0.1, self.left())
        return httpx.Timeout(min(REQUEST_TIMEOUT_S, left), read=min(read, left))


def one_song(run: Run, client: httpx.Client, index: int, seed: int) -> dict[str, Any]:
    """Post song `index`, listen to its audio to the end, read its job; its timings (client side
    from `time.monotonic()`, server side from the job's view)."""
    tags, lyrics = SONGS[index % len(SONGS)]
    body = {"tags": tags, "lyrics": lyrics, "seconds": run.seconds, "seed": seed, "format": "wav"}
    song: dict[str, Any] = {"index": index, "seed": seed, "id": None, "http_429": 0}
    song["retry_after_s"], song["retry_wait_s"] = [], 0.0
    try:
        while True:
            posted = time.monotonic()
            r = client.post(f"{run.url}/v1/songs", json=body, timeout=run.timeout())
            if r.status_code != 429:
                break
            song["http_429"] += 1
            with run.lock:
                run.http_429 += 1
            wait = float(r.headers.get("retry-after", "1"))
            song["retry_after_s"].append(wait)
            if wait >= run.left():
                raise TimeoutError("the deadline passed while the queue was full")
            time.sleep(wait)
            song["retry_wait_s"] += time.monotonic() - posted
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/songs: {r.status_code} {r.text[:200]}")
        accepted = time.monotonic()
        job = r.json()
        song["id"] = job["id"]
        with run.lock:
            run.unfinished.add(job["id"])
        song["post_s"] = accepted - posted

        received, first = 0, None
        timeout = run.timeout(read=run.left())  # a queued song's stream is silent until it runs
        with client.stream("GET", run.url + job["urls"]["audio"], timeout=timeout) as audio:
            if audio.status_code != 200:
                raise RuntimeError(f"GET audio: {audio.status_code} {audio.read()[:200]!r}")
            song["live"] = "content-length" not in audio.headers
            for chunk in audio.iter_bytes():
                received += len(chunk)
                if first is None and received > WAV_HEADER_BYTES:
                    first = time.monotonic()
        ended = time.monotonic()
        song["client_ttfa_s"] = None if first is None else first - posted
        song["client_song_s"] = ended - posted
        song["stream_bytes"] = received
        song["stream_audio_s"] = max(0, received - WAV_HEADER_BYTES) / BYTES_PER_SECOND

        # The stream ends as the song's audio closes; its record is final a moment later.
        until = time.monotonic() + min(JOB_FINAL_WAIT_S, max(0.1, run.left()))
        while True:
            view = client.get(f"{run.url}/v1/songs/{job['id']}", timeout=run.timeout()).json()
            if view["state"] in FINAL or time.monotonic() > until:
                break
            time.sleep(0.05)
        song["job_final_wait_s"] = time.monotonic() - ended
        song.update(server_fields(view))
        if view["state"] in FINAL:
            with run.lock:
                run.unfinished.discard(job["id"])
    except (httpx.HTTPError, RuntimeError, TimeoutError, ValueError) as e:
        song["state"] = song.get("state") or "client-error"
        song["error"] = f"{type(e).__name__}: {e}"
    return song


def server_fields(view: dict[str, Any]) -> dict[str, Any]:
    """The job view's state and timings, flat."""
    timings, progress = view["timings"], view["progress"]
    created = view["created_at"]
    finished = created + timings["elapsed_s"] if view["state"] in FINAL else None
    return {
        "state": view["state"],
        "error": view["error"],
        "frames": progress["frames"],
        "max_frames": progress["max_frames"],
        "audio_seconds": progress["audio_seconds"],
        "queue_wait_s": timings["queue_wait_s"],
        "time_to_first_audio_s": timings["time_to_first_audio_s"],
        "elapsed_s": timings["elapsed_s"],
        "rtf": timings["rtf"],
        "created_at": created,
        "finished_at": finished,
    }


def client_thread(run: Run, songs: list[tuple[int, int]], out: list[dict[str, Any]]) -> None:
    with httpx.Client() as client:
        for index, seed in songs:
            if run.left() <= 0:
                out.append({"index": index, "seed": seed, "state": "not-posted"})
                continue
            out.append(one_song(run, client, index, seed))


def drive(run: Run, groups: list[list[tuple[int, int]]]) -> tuple[list[dict[str, Any]], float]:
    """Every group's songs one after another, the groups at once; the songs by index, and the
    wall seconds from the start to the last client's end."""
    results: list[list[dict[str, Any]]] = [[] for _ in groups]
    threads = [
        threading.Thread(target=client_thread, args=(run, g, out), daemon=True)
        for g, out in zip(groups, results, strict=True)
    ]
    begin = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, run.left()) + REQUEST_TIMEOUT_S)
    wall = time.monotonic() - begin
    songs = sorted((s for out in results for s in out), key=lambda s: s["index"])
    return songs, wall


class MetricsSampler:
    """GET /metrics once a second: the largest queue, songs running, rows and frames/s seen."""

    GAUGES = (
        "heartmula_queue_length",
        "heartmula_active_songs",
        "heartmula_lm_rows",
        "heartmula_frames_per_second",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[dict[str, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._begin = time.monotonic()

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    text = client.get(f"{self.url}/metrics").text
                except httpx.HTTPError:
                    self.errors += 1
                else:
                    sample = {"t_s": round(time.monotonic() - self._begin, 2)}
                    sample["procs_running"] = procs_running()
                    for line in text.splitlines():
                        name, _, value = line.partition(" ")
                        if name in self.GAUGES:
                            sample[name] = float(value)
                    self.samples.append(sample)
                self._stop.wait(1.0)

    def summary(self) -> dict[str, Any]:
        def peak(name: str) -> float | None:
            values = [s[name] for s in self.samples if name in s]
            return max(values) if values else None

        running = [s["procs_running"] for s in self.samples if s["procs_running"] is not None]
        return {
            "procs_running_mean": _round(sum(running) / len(running), 2) if running else None,
            "max_active_songs": peak("heartmula_active_songs"),
            "max_queue_length": peak("heartmula_queue_length"),
            "max_lm_rows": peak("heartmula_lm_rows"),
            "max_frames_per_second": peak("heartmula_frames_per_second"),
            "errors": self.errors,
            "samples": self.samples,
        }


# -- the figures -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0–100), linear between the closest ranks (numpy's default)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    rank = (len(values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def p50_p95(songs: list[dict[str, Any]], field: str) -> dict[str, float | None]:
    values = [s.get(field) for s in songs]
    return {"p50": _round(percentile(values, 50)), "p95": _round(percentile(values, 95))}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(songs: list[dict[str, Any]], wall_s: float, http_429: int) -> dict[str, Any]:
    """The run's figures over its songs (the warm-up excluded)."""
    done = [s for s in songs if s.get("state") == "done"]
    ended = [s for s in songs if s.get("finished_at") is not None]
    # The busy period, on the server's clock: the first song's arrival to the last one's end.
    busy_s = None
    if ended:
        busy_s = max(s["finished_at"] for s in ended) - min(s["created_at"] for s in ended)
    frames = sum(s.get("frames") or 0 for s in ended)
    audio = sum(s.get("audio_seconds") or 0 for s in ended)

    def per_s(x: float) -> float | None:
        return None if not busy_s else _round(x / busy_s, 3)

    return {
        "songs": len(songs),
        "done": len(done),
        "failed": len(songs) - len(done),
        "http_429": http_429,
        "wall_s": _round(wall_s, 3),
        "busy_s": _round(busy_s, 3),
        "songs_per_min": None if not busy_s else _round(60 * len(done) / busy_s, 3),
        "frames": frames,
        "lm_frames_per_s": per_s(frames),
        "audio_seconds": _round(audio, 3),
        "audio_s_per_s": per_s(audio),
        "ended_before_length": sum(s["frames"] < s["max_frames"] for s in done),
        "queue_wait_s": p50_p95(done, "queue_wait_s"),
        "ttfa_server_s": p50_p95(done, "time_to_first_audio_s"),
        "ttfa_client_s": p50_p95(done, "client_ttfa_s"),
        "rtf": p50_p95(done, "rtf"),
        "song_s": p50_p95(done, "elapsed_s"),
    }


def print_table(summary: dict[str, Any]) -> None:
    s = summary
    print(
        f"songs {s['songs']}: {s['done']} done, {s['failed']} failed, {s['http_429']} x 429; "
        f"wall {s['wall_s']} s, busy {s['busy_s']} s"
    )
    print(
        f"{s['songs_per_min']} songs/min, {s['lm_frames_per_s']} LM frames/s in all, "
        f"{s['audio_s_per_s']} audio s per s ({s['frames']} frames, {s['audio_seconds']} s)"
    )
    print(f"{'':24} {'p50':>9} {'p95':>9}")
    rows = [
        ("queue wait s", "queue_wait_s"),
        ("first audio s (server)", "ttfa_server_s"),
        ("first audio s (client)", "ttfa_client_s"),
        ("RTF", "rtf"),
        ("song s", "song_s"),
    ]
    for title, key in rows:
        p = s[key]
        cells = " ".join("        -" if p[q] is None else f"{p[q]:9.3f}" for q in ("p50", "p95"))
        print(f"{title:24} {cells}")


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's, as `heartmula-rt bench` names it (the server is on this
    machine: loopback only)."""
    import torch

    from heartmula_rt.bench import results as bench_results

    return bench_results.device_name(torch.device(device))


def procs_running() -> int | None:
    """The machine's runnable tasks now (Linux), this sampler's own included."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server (loopback only)")
    where.add_argument("--model-path", type=Path, help="start `heartmula-rt serve` on this")
    server = parser.add_argument_group("the server started here (passed to heartmula-rt serve)")
    for option, kind in SERVER_OPTIONS.items():
        server.add_argument(option, type=kind)
    server.add_argument("--folder", type=Path, help="its jobs and log (default: a temporary one)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (4)")
    parser.add_argument("--songs-per-client", type=int, default=1, help="each one's songs (1)")
    parser.add_argument("--seconds", type=float, default=4.0, help="each song's length (4)")
    parser.add_argument("--seed", type=int, default=0, help="song i's seed is SEED + i (0)")
    parser.add_argument("--warmup", type=int, default=1, help="songs at once first, uncounted")
    parser.add_argument("--deadline-s", type=float, default=600.0, help="the whole run (600)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", help="results file's name (default: serve-<model folder>)")
    args = parser.parse_args(argv)
    given = [o for o in [*SERVER_OPTIONS, "--folder"] if getattr(args, _dest(o)) is not None]
    if args.url is not None and given:
        parser.error(f"{given[0]} is for a server started here, not with --url")
    if args.clients < 1 or args.songs_per_client < 1 or args.warmup < 0:
        parser.error("--clients and --songs-per-client must be at least 1, --warmup at least 0")
    if not args.seconds > 0 or not args.deadline_s > 0:
        parser.error("--seconds and --deadline-s must be positive")
    if args.url is not None:
        args.url = check_url(args.url)
    return args


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (a timeout) must still stop the server: as Ctrl-C, through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = time.monotonic() + args.deadline_s
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    server = folder = None
    if args.url is None:
        folder = args.folder or Path(tempfile.mkdtemp(prefix="serve-bench-"))
        passed = []
        for option in SERVER_OPTIONS:
            value = getattr(args, _dest(option))
            if value is not None:
                passed += [option, str(value)]
        server = ServerProcess(args.model_path, folder, *passed)
    ok = False
    try:
        start_s = None
        if server is not None:
            print(f"starting: {shlex.join(server.command)}", flush=True)
            started = time.monotonic()
            server.start(timeout_s=deadline - started)
            start_s = time.monotonic() - started
            print(f"the server answers after {start_s:.1f} s", flush=True)
        url = args.url or server.url
        try:
            info = httpx.get(f"{url}/v1/info", timeout=REQUEST_TIMEOUT_S).raise_for_status().json()
        except httpx.HTTPError as e:
            raise SystemExit(f"no heartmula-rt server at {url} ({e})") from None
        run = Run(url, args.seconds, deadline)
        total = args.clients * args.songs_per_client

        warmup: list[dict[str, Any]] = []
        warmup_s = None
        if args.warmup:
            seeds = [(total + i, args.seed + total + i) for i in range(args.warmup)]
            warmup, warmup_s = drive(run, [[s] for s in seeds])
            print(f"warm-up: {args.warmup} song(s) in {warmup_s:.1f} s", flush=True)
        http_429_warmup = run.http_429

        n = args.songs_per_client  # client c posts songs c*n … c*n + n - 1, in turn
        groups = [
            [(i, args.seed + i) for i in range(c * n, c * n + n)] for c in range(args.clients)
        ]
        with MetricsSampler(url) as sampler:
            songs, wall_s = drive(run, groups)
        # Songs the deadline left unfinished: cancelled, so the server is left idle.
        for job_id in list(run.unfinished):
            with contextlib.suppress(httpx.HTTPError):
                httpx.delete(f"{url}/v1/songs/{job_id}", timeout=REQUEST_TIMEOUT_S)
        summary = summarize(songs, wall_s, run.http_429 - http_429_warmup)
        ok = summary["failed"] == 0
    finally:
        if server is not None:
            code = server.stop()
            print(f"the server stopped (exit {code})", flush=True)
            if not ok:  # its log goes with its temporary folder
                print(f"the server's log, to its end:\n{server.log()}", flush=True)
            if folder is not None and args.folder is None:
                shutil.rmtree(folder, ignore_errors=True)

    import torch

    from heartmula_rt.bench import results as bench_results

    model = str(args.model_path) if args.model_path else info.get("model")
    result = {
        "device": device_name(info["device"]),
        "torch": torch.__version__,
        "triton": bench_results.triton_version(),
        "commit": bench_results.commit(),
        "command": shlex.join(["python", *sys.argv]),
        "model": model,
        "date": date,
        "server": {
            "url": url if args.url else None,
            "started_here": server is not None,
            "command": None if server is None else shlex.join(server.command),
            "start_s": _round(start_s, 3),
            "info": info,
        },
        "settings": {
            "clients": args.clients,
            "songs_per_client": args.songs_per_client,
            "seconds": args.seconds,
            "seed": args.seed,
            "format": "wav",
            "warmup": args.warmup,
            "deadline_s": args.deadline_s,
        },
        # The run in the fields every results file has (benchmarks/README.md); `summary` has all.
        "runs": [
            {
                "name": f"serve-{info.get('engine', 'default')}",
                "engine": info.get("engine"),
                "quant": info.get("quant"),
                "songs_at_once": info.get("songs_at_once"),
                "lm_frames_per_s": summary.get("lm_frames_per_s"),
                "songs_per_min": summary.get("songs_per_min"),
            }
        ],
        "load_average": {"start": load_start, "end": load_average()},
        "cpu_count": os.cpu_count(),
        "summary": summary,
        "metrics": sampler.summary(),
        "songs": songs,
        "warmup": {"wall_s": _round(warmup_s, 3), "songs": warmup},
    }
    name = args.name or f"serve-{Path(model).name}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = bench_results.write_results(args.out_dir, name, result)
    print_table(summary)
    m = result["metrics"]
    print(f"most songs running {m['max_active_songs']}, longest queue {m['max_queue_length']}")
    print(
        f"load average {load_start} at the start, {result['load_average']['end']} at the end; "
        f"{m['procs_running_mean']} runnable tasks on average"
    )
    print(f"wrote {path}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
