"""Wall time of `heartmula-rt plan` (the 3B model's sizes, no weights): the first plan of a model
and song length (sizes counted: torch imported, meta traces) and the same plan again (sizes
remembered: no torch), per budget, and `heartmula-rt --help` beside them.

    python benchmarks/plan_time.py --out benchmarks/results/plan_time-<date>.json

Each measurement is a fresh process, as a user runs the command; every "first" run gets an empty
size folder of its own (HEARTMULA_RT_SIZE_CACHE), and its "again" run reuses that folder.
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
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "heartmula_rt.cli"]


def seconds(args: list[str], cache: Path) -> float:
    env = {**os.environ, "HEARTMULA_RT_SIZE_CACHE": str(cache)}
    start = time.perf_counter()
    subprocess.run([*COMMAND, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results JSON to write")
    parser.add_argument("--budgets", default="12G,6G", help="comma list (12G,6G)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (3)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from heartmula_rt.bench import _commit  # noqa: PLC0415

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets.split(","):
            first, again = [], []
            for i in range(args.repeats):
                cache = Path(tmp) / f"{budget}-{i}"
                first.append(round(seconds(["plan", "--vram", budget], cache), 3))
                again.append(round(seconds(["plan", "--vram", budget], cache), 3))
            runs.append(
                {
                    "name": f"plan --vram {budget}",
                    "engine": None,  # a plan runs no LM engine
                    "first_s": statistics.median(first),
                    "again_s": statistics.median(again),
                    "raw_first_s": first,
                    "raw_again_s": again,
                }
            )
            print(runs[-1], file=sys.stderr)
        help_s = [round(seconds(["--help"], Path(tmp) / "help"), 3) for _ in range(args.repeats)]
    runs.append(
        {"name": "--help", "engine": None, "median_s": statistics.median(help_s), "raw_s": help_s}
    )
    result = {
        "device": {"cpu": platform.processor() or "cpu", "cpu_count": os.cpu_count()},
        "python": platform.python_version(),
        "torch": subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "commit": _commit(),
        "command": shlex.join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
