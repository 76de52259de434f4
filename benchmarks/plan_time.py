"""Wall time of `heartmula-rt plan` (the 3B model, no weights) per budget and song length, with
`heartmula-rt --help` and `python -c "import torch"` beside them for scale.

    python benchmarks/plan_time.py --out benchmarks/results/plan_time-<date>.json

Each measurement is a fresh process, as a user runs the command. Nothing is remembered between
runs: every plan works its sizes out from the configs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "heartmula_rt.cli"]


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results JSON to write")
    parser.add_argument("--budgets", default="12G,6G", help="comma list (12G,6G)")
    parser.add_argument("--lengths", default="240,60", help="--max-seconds, comma list (240,60)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (5)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from heartmula_rt.bench import results as bench_results  # noqa: PLC0415

    commands = [
        (
            f"plan --vram {budget} --max-seconds {length}",
            [*COMMAND, "plan", "--vram", budget, "--max-seconds", length],
        )
        for budget in args.budgets.split(",")
        for length in args.lengths.split(",")
    ]
    commands += [
        ("--help", [*COMMAND, "--help"]),
        ("import torch", [sys.executable, "-c", "import torch"]),
    ]
    runs = []
    for name, command in commands:
        raw = [round(seconds(command), 3) for _ in range(args.repeats)]
        # a plan runs no LM engine and quantizes nothing
        run = {"name": name, "engine": None, "quant": None, "lm_frames_per_s": None}
        runs.append({**run, "median_s": statistics.median(raw), "raw_s": raw})
        print(runs[-1], file=sys.stderr)
    result = {
        "device": {"cpu": platform.processor() or "cpu", "cpu_count": os.cpu_count()},
        "python": platform.python_version(),
        "torch": subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "commit": bench_results.commit(),
        "command": shlex.join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
