"""The LM and the codec as a pipeline: does the LM keep its frames/s while the codec decodes
finished windows on its own thread (and, with `--codec-device`, its own device)?

    python benchmarks/pipeline_overlap.py --songs 4 --seconds 20 --threads 1 --rounds 3 \\
        --name overlap-tiny                     # a tiny random --never-eos checkpoint, made

The same songs (same prompts and seeds) are made three ways, in one process, in rounds (each
round starting one way later, so the machine's drift falls on all), after one warm-up round:

- `lm-alone`: the batching scheduler and the engine with no codec, what the LM does by itself
  (the loop the service's engine thread runs);
- `pipelined`: `heartmula-rt serve`'s service (serve/service.py) in this process: the LM on its
  thread, each song's windows decoded on the codec's thread as soon as their codes are certain;
- `in-turn`: the same service, its LM waiting for the codec to finish whatever a frame handed it
  before the next frame: one thread doing both, as without the pipeline.

Per run: the LM's frames/s (frames made after the first, over the time from the first frame to
the last: prefill of the first song and the last codec windows left out), the codec thread's
busy seconds, and the wall time from the first song posted to the last song's audio written.
With the pipeline working, `pipelined` keeps `lm-alone`'s frames/s and its wall time is the
larger of the two stages, not their sum (`in-turn`). Songs must run to their length: give a
random checkpoint made with `tools/make_checkpoint.py --never-eos`; without `--model-path`, a
tiny one is made so in a temporary folder.
Writes `{UTC date}_{device}_{name}.json` to `--out-dir` (fields: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))

from cpu_threads import runnable_tasks  # noqa: E402
from make_checkpoint import make_checkpoint  # noqa: E402
from rounds import rotated_rounds, way_runs  # noqa: E402
from serve_bench import SONGS  # noqa: E402

import heartmula_rt  # noqa: E402
from heartmula_rt.bench import results as bench_results  # noqa: E402
from heartmula_rt.request import request_from_json  # noqa: E402
from heartmula_rt.runtime.runner import run_songs  # noqa: E402
from heartmula_rt.runtime.scheduler import SongRun  # noqa: E402
from heartmula_rt.serve.config import ServiceConfig  # noqa: E402
from heartmula_rt.serve.jobs import SqliteJobStore  # noqa: E402
from heartmula_rt.serve.service import FINAL, SongService  # noqa: E402

WAYS = ("lm-alone", "pipelined", "in-turn")
POLL_S = 0.02


class TimedService(SongService):
    """The service with its two threads timed: when each frame reached the codec's queue, and
    how long the codec's thread worked. `in_turn`: the LM waits for the codec to be done with a
    frame before it goes on past the next."""

    def __init__(self, *args, in_turn: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_turn = in_turn
        self.frame_times: list[tuple[float, int]] = []  # (when, frames) of the LM's frames
        self.codec_busy_s = 0.0
        self._idle = threading.Event()
        self._idle.set()
        stage = self.runner.codec
        step = stage._live_step  # the codec's work on one song's frames (runner.py)

        def timed(song, new) -> None:
            start = time.perf_counter()
            step(song, new)
            self.codec_busy_s += time.perf_counter() - start
            self._idle.set()

        stage._live_step = timed

    def frames(self, song, new: torch.Tensor) -> None:
        self.frame_times.append((time.perf_counter(), new.shape[1]))
        super().frames(song, new)
        if self.in_turn:
            self._idle.wait()  # the codec is done with the frames before these
            self._idle.clear()


def lm_rate(frame_times: list[tuple[float, int]]) -> float:
    """Frames per second after the first frame, to the last."""
    span = frame_times[-1][0] - frame_times[0][0]
    return sum(n for _, n in frame_times[1:]) / span


def bodies(args: argparse.Namespace) -> list[dict]:
    return [
        {
            "tags": SONGS[i % len(SONGS)][0],
            "lyrics": SONGS[i % len(SONGS)][1],
            "seconds": args.seconds,
            "seed": args.seed + i,
            "format": "wav",
        }
        for i in range(args.songs)
    ]


def run_lm_alone(pipe, args: argparse.Namespace) -> dict:
    """The song runner's LM over the same songs in the service's rows, no codec."""
    times: list[tuple[float, int]] = []
    limits = {"max_seconds": args.seconds}
    requests = [request_from_json(b, limits, also=("format",))[0] for b in bodies(args)]
    runs = []
    for request in requests:
        run = SongRun(pipe.prompt(request), request.sampling)
        run.on_codes = lambda new: times.append((time.perf_counter(), new.shape[1]))
        runs.append(run)
    start = time.perf_counter()
    run_songs(pipe, runs, service_rows(pipe, args))
    wall = time.perf_counter() - start
    return {"lm_frames_per_s": lm_rate(times), "frames": sum(n for _, n in times), "wall_s": wall}


def service_rows(pipe, args: argparse.Namespace) -> int:
    """The LM rows the service has for these songs."""
    with tempfile.TemporaryDirectory() as folder:
        service = SongService(pipe, SqliteJobStore(Path(folder) / "jobs.sqlite3"), config(args))
        return service.runner.scheduler.rows


def config(args: argparse.Namespace, folder: Path | None = None) -> ServiceConfig:
    return ServiceConfig(
        folder=folder or Path(tempfile.gettempdir()),
        songs_at_once=args.songs,
        max_queue=args.songs,
        max_seconds=args.seconds,
    )


def run_service(pipe, args: argparse.Namespace, in_turn: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = SqliteJobStore(folder / "jobs.sqlite3")
        service = TimedService(pipe, store, config(args, folder), in_turn=in_turn)
        service.start()
        try:
            start = time.perf_counter()
            jobs = [service.submit(body) for body in bodies(args)]
            deadline = time.monotonic() + args.deadline_s
            while any(service.job(j.id).state not in FINAL for j in jobs):
                if time.monotonic() > deadline:
                    raise RuntimeError("the songs did not end before --deadline-s")
                time.sleep(POLL_S)
            wall = time.perf_counter() - start
            states = sorted({service.job(j.id).state for j in jobs})
            audio_s = sum(service.job(j.id).audio_seconds for j in jobs)
        finally:
            service.close()
    if states != ["done"]:
        raise RuntimeError(f"songs ended {states}")
    return {
        "lm_frames_per_s": lm_rate(service.frame_times),
        "frames": sum(n for _, n in service.frame_times),
        "codec_busy_s": service.codec_busy_s,
        "wall_s": wall,
        "audio_s": audio_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-path", type=Path, help="a --never-eos checkpoint (default: a tiny one, made)"
    )
    parser.add_argument("--songs", type=int, default=4, help="songs at once (4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="each song's length (20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up (3)")
    parser.add_argument("--device", default="auto", help="the LM's (auto)")
    parser.add_argument("--codec-device", default=None, help="the codec's (default: --device)")
    parser.add_argument("--engine", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--codec-dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch's per thread")
    parser.add_argument("--deadline-s", type=float, default=600.0, help="per run (600)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="pipeline-overlap")
    args = parser.parse_args()

    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_path or make_checkpoint(Path(tmp) / "tiny-never-eos", never_eos=True)
        pipe = heartmula_rt.load_pipeline(
            model,
            device=args.device,
            codec_device=args.codec_device,
            engine=args.engine,
            dtype=args.dtype,
            codec_dtype=args.codec_dtype,
            threads=args.threads,
        )
        ways = {
            "lm-alone": lambda: run_lm_alone(pipe, args),
            "pipelined": lambda: run_service(pipe, args, in_turn=False),
            "in-turn": lambda: run_service(pipe, args, in_turn=True),
        }

        def measure(way: str) -> dict:
            load = runnable_tasks()
            result = ways[way]()
            result["runnable_tasks"] = (load + runnable_tasks()) / 2
            return result

        raw = rotated_rounds(WAYS, args.rounds, measure)

    runs = way_runs(
        raw,
        lambda way: {"name": way, "engine": pipe.config.engine, "quant": pipe.config.quant},
        ("lm_frames_per_s", "wall_s", "codec_busy_s"),
        "lm_rate_vs_alone",
    )
    result = {
        "device": bench_results.device_name(pipe.device),
        "codec_device": str(pipe.config.codec_device),
        "torch": torch.__version__,
        "triton": bench_results.triton_version(),
        "commit": bench_results.commit(),
        "command": shlex.join(["python", *sys.argv]),
        "model": str(args.model_path or "tiny, --never-eos"),
        "date": date,
        "cpu_count": os.cpu_count(),
        "settings": {
            "songs": args.songs,
            "seconds": args.seconds,
            "seed": args.seed,
            "rounds": args.rounds,
            "threads": pipe.threads,
            "dtype": pipe.config.dtype,
            "codec_dtype": pipe.config.codec_dtype,
        },
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = bench_results.write_results(args.out_dir, args.name, result)
    print(f"{'way':<10} {'LM frames/s':>12} {'vs alone':>9} {'wall s':>8} {'codec busy s':>13}")
    for run in runs:
        busy = "" if run["codec_busy_s"] is None else f"{run['codec_busy_s']:.2f}"
        print(
            f"{run['name']:<10} {run['lm_frames_per_s']:>12.2f} {run['lm_rate_vs_alone']:>9.2f} "
            f"{run['wall_s']:>8.2f} {busy:>13}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
