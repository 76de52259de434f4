"""CPU threads on the tiny fixture: `decode_frames`, `generate` and a streamed song with 1, 2 and
the default number of threads (heartmula_rt's OMP_WAIT_POLICY=PASSIVE), and torch's own
count under libgomp's own wait policy (spin, then sleep: what ran before), on an idle machine
and beside a busy process.

    python benchmarks/cpu_threads.py --out benchmarks/results/cpu_threads-<date>.json

Every measurement is a fresh process (libgomp reads its wait policy once, as torch loads, and
its thread teams outlive the calls) that loads the pipeline, then runs each path once as a
warm-up and once timed; `--repeats` rounds go over every setting in turn, so a neighbour's
burst of work lands on all of them. The busy process is `python -c "while True: pass"`. Each
process hashes the LM frames and the audio bytes, so the file also says what repeats across
runs and across thread counts (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "fixtures" / "tiny-public" / "ckpt"
TAGS, LYRICS = "piano,happy", "[verse]\nla la la\n"
# name: (threads= of load_pipeline, 0 for torch's own count; wait policy). "spin" is libgomp's
# own default (torch loaded first, OMP_WAIT_POLICY unset): what ran before heartmula_rt chose.
SETTINGS = {
    "1": (1, "default"),
    "2": (2, "default"),
    "default": (None, "default"),
    "torch-spin": (0, "spin"),
}
PATHS = ["decode_frames", "generate", "stream"]


def sha256(array) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def child(args: argparse.Namespace) -> None:
    """One setting in this process, one warm-up and one timed run per path: timings and hashes
    as one JSON line on stdout."""
    threads, wait = SETTINGS[args.setting]
    if wait == "spin":
        os.environ.pop("OMP_WAIT_POLICY", None)
        import torch  # noqa: F401, PLC0415  (first: libgomp reads its policy as torch loads)
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    import heartmula_rt  # noqa: PLC0415

    if threads == 0:  # torch's own count
        threads = torch.get_num_threads()
    pipe = heartmula_rt.load_pipeline(args.model_path, threads=threads)
    song = {"max_seconds": args.max_frames * 0.08, "seed": 0}
    frames = pipe.generate_frames(TAGS, LYRICS, max_frames=args.max_frames, seed=0)

    def decode_frames() -> np.ndarray:
        return pipe.decode_frames(frames, seed=0).numpy()

    def generate() -> np.ndarray:
        return pipe.generate(TAGS, LYRICS, **song).numpy()

    def stream() -> np.ndarray:
        return np.concatenate(list(pipe.stream(TAGS, LYRICS, **song)), axis=1)

    seconds, hashes = {}, {}
    for name, run in zip(PATHS, [decode_frames, generate, stream], strict=True):
        run()  # warm-up
        start = time.perf_counter()
        wav = run()
        seconds[name] = round(time.perf_counter() - start, 4)
        hashes[name] = sha256(wav)
    result = {
        "engine": pipe.engine.name,
        "quant": pipe.config.quant,
        "threads": pipe.threads,
        "frames_sha256": sha256(frames.numpy()),
    }
    print(json.dumps({**result, "audio_sha256": hashes, "seconds": seconds}))


def runnable_tasks() -> int:
    """Tasks running or waiting for a core, machine-wide (/proc/stat; also those of processes
    this one cannot see)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("procs_running"):
            return int(line.split()[1])
    return 0


def measure(args: argparse.Namespace, setting: str) -> dict:
    """One child process of `setting`, and the machine's mean runnable tasks while it ran."""
    command = [sys.executable, __file__, "--child", "--setting", setting]
    command += ["--model-path", str(args.model_path), "--max-frames", str(args.max_frames)]
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append(runnable_tasks())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ran = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        done.set()
        sampler.join()
    if ran.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed:\n{ran.stderr}")
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    result["runnable_tasks_mean"] = round(statistics.mean(samples), 2) if samples else None
    return result


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def commit() -> str | None:
    sys.path.insert(0, str(REPO))
    from heartmula_rt.bench import results as bench_results  # noqa: PLC0415

    return bench_results.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the results JSON to write")
    parser.add_argument("--model-path", type=Path, default=TINY)
    parser.add_argument("--max-frames", type=int, default=40, help="song length (40: one window)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every setting (3)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.out is None:
        parser.error("--out is required")

    runs = []
    for condition in ["idle", "busy"]:
        busy = None
        if condition == "busy":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            raw = {name: [] for name in SETTINGS}
            for _ in range(args.repeats):  # rounds, so a neighbour's burst hits every setting
                for name in SETTINGS:
                    raw[name].append(measure(args, name))
                    print(condition, name, raw[name][-1]["seconds"], flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        for name, (_, wait) in SETTINGS.items():
            seconds = {path: [r["seconds"][path] for r in raw[name]] for path in PATHS}
            runs.append(
                {
                    "condition": condition,
                    "setting": name,
                    "engine": raw[name][0]["engine"],
                    "quant": raw[name][0]["quant"],
                    "lm_frames_per_s": None,  # every path times the codec too
                    "threads": raw[name][0]["threads"],
                    "wait_policy": wait,
                    "median_s": {path: statistics.median(s) for path, s in seconds.items()},
                    "raw_s": seconds,
                    "runnable_tasks_mean": [r["runnable_tasks_mean"] for r in raw[name]],
                    "frames_sha256": sorted({r["frames_sha256"] for r in raw[name]}),
                    "audio_sha256": sorted(
                        {h for r in raw[name] for h in r["audio_sha256"].values()}
                    ),
                }
            )

    result = {
        "device": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)),
        },
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "commit": commit(),
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(args.model_path),
        "max_frames": args.max_frames,
        "repeats": args.repeats,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'condition':9} {'setting':10} {'threads':>7} " + " ".join(f"{p:>13}" for p in PATHS))
    for run in runs:
        medians = " ".join(f"{run['median_s'][p]:13.2f}" for p in PATHS)
        print(f"{run['condition']:9} {run['setting']:10} {run['threads']:7} {medians}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
