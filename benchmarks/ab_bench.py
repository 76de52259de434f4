"""Two revisions' `heartmula-rt bench` side by side, in one invocation: each revision installed
into a folder of its own (a wheel build of `git archive REV`, the working tree for `WORKTREE`),
then their benches run alternately in fresh processes, round after round, so the machine's drift
falls on both alike. One results JSON with every run and the medians.

    python benchmarks/ab_bench.py --before a9c2fbe --after WORKTREE --rounds 3 \\
        --out benchmarks/results/ab-single-song-<date>.json -- \\
        --synthetic mid --no-codec --max-seconds 8 --repeats 3 --warmup 1

What follows `--` is passed to `heartmula-rt bench` of both revisions (so it must mean the same
to both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def install(rev: str, into: Path) -> str:
    """`rev` (or the working tree) installed without dependencies into `into`; its commit."""
    source = REPO
    commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    if rev != WORKTREE:
        commit = git("rev-parse", rev)
        source = into.with_name(into.name + "-src")
        source.mkdir()
        archive = subprocess.run(
            ["git", "archive", commit], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    # setup.py's layout (kernels/ and quant/ inside the package), copied: no pip build, which
    # fails where an installed setuptools plugin imports a top-level `kernels` package (the
    # source tree's kernels/ folder shadows it).
    package = into / "heartmula_rt"
    shutil.copytree(source / "heartmula_rt", package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("kernels", "quant"):
        shutil.copytree(
            source / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    return commit


def bench(site: Path, bench_args: list[str], out_dir: Path) -> dict:
    """One fresh `heartmula-rt bench` process of the revision installed in `site`."""
    out_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, "-m", "heartmula_rt.cli", "bench", *bench_args]
    subprocess.run([*command, "--out-dir", str(out_dir)], env=env, check=True, cwd=site)
    (path,) = out_dir.glob("*.json")
    return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="a git revision, or WORKTREE")
    parser.add_argument("--after", default=WORKTREE, help="a git revision, or WORKTREE (default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    revisions = {"before": args.before, "after": args.after}
    with tempfile.TemporaryDirectory() as tmp:
        sites = {name: Path(tmp) / name for name in revisions}
        commits = {name: install(rev, sites[name]) for name, rev in revisions.items()}
        runs: dict[str, list[dict]] = {name: [] for name in revisions}
        for round_ in range(args.rounds):
            for name in revisions:
                result = bench(sites[name], bench_args, Path(tmp) / f"out-{name}-{round_}")
                runs[name].append(result)
                fps = [r["lm_frames_per_s"] for r in result["runs"]]
                print(f"round {round_ + 1} {name}: frames/s {fps}", file=sys.stderr)
    summary = {
        name: {
            run["name"]: statistics.median(
                next(r["lm_frames_per_s"] for r in result["runs"] if r["name"] == run["name"])
                for result in results
            )
            for run in results[0]["runs"]
        }
        for name, results in runs.items()
    }
    first = runs["after"][0]
    report = {
        "device": platform.processor() or "cpu",
        "torch": first["torch"],
        "commit": commits["after"],
        "command": shlex.join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "revisions": revisions,
        "commits": commits,
        "bench_args": bench_args,
        "median_lm_frames_per_s": summary,
        # One run per revision and bench run: the median over the rounds, and each round's.
        "runs": [
            {
                **{k: run[k] for k in ("engine", "quant", "dtype")},
                "name": f"{name}:{run['name']}",
                "revision": revisions[name],
                "lm_frames_per_s": summary[name][run["name"]],
                "raw_lm_frames_per_s": [
                    next(r["lm_frames_per_s"] for r in result["runs"] if r["name"] == run["name"])
                    for result in results
                ],
            }
            for name, results in runs.items()
            for run in results[0]["runs"]
        ],
        "results": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
