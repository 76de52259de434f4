"""benchmarks/run_gpu.sh without a GPU: its plan, its deadlines and its summary (the script run
for real, in its fake mode), and the bench results it relies on being written as each run ends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from heartmula_rt import bench as bench_module
from heartmula_rt.cli import build_parser


def bench(*args: str) -> int:
    ns = build_parser().parse_args(["bench", *args])
    return ns.func(ns)


class Cut(Exception):
    """A step's timeout, as far as the bench can tell: it stops between two runs."""


def test_bench_keeps_each_run_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut in int8's batch of 2: the file holds every run before it, as whole JSON."""
    time_batch = bench_module._time_batch
    batches = []

    def cut_second(*args, **kwargs):
        batches.append(args)
        if len(batches) == 2:
            raise Cut
        return time_batch(*args, **kwargs)

    monkeypatch.setattr(bench_module, "_time_batch", cut_second)
    args = [
        "--synthetic", "tiny", "--device", "cpu", "--engines", "plain", "--max-seconds", "0.5",
        "--repeats", "1", "--warmup", "0", "--no-codec", "--quant", "none,int8",
        "--batch", "1,2", "--out-dir", str(tmp_path), "--name", "cut",
    ]  # fmt: skip
    with pytest.raises(Cut):
        bench(*args)
    (path,) = tmp_path.iterdir()  # one file, no leftover partial write
    runs = json.loads(path.read_text())["runs"]
    assert [r["name"] for r in runs] == ["plain-float32", "plain-float32-x2", "plain-float32-int8"]


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=300
    )


def test_the_plan_fits_a_call_and_orders_steps_by_value() -> None:
    done = run_script("--plan")
    assert done.returncode == 0
    *steps, total = done.stdout.strip().splitlines()
    budgets = {line.split()[0]: int(line.split()[1]) for line in steps}
    order = ["env", "decode", "batch", "codec", "quant", "quant-batch", "vram", "tests", "compile"]
    assert list(budgets) == order
    assert all(b > 0 for b in budgets.values())
    assert total == f"total: {sum(budgets.values())} s"
    assert sum(budgets.values()) <= 420  # a second call fits in what is left of 15 minutes


def test_a_step_cut_by_its_deadline_keeps_its_run_and_the_others_go_on(tmp_path: Path) -> None:
    """--fake: each step writes one run in bench's format; decode then hangs past its deadline."""
    done = run_script("--fake", OUT=str(tmp_path), FAKE_HANG="decode", FAKE_BUDGET_S="2")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    started = [
        line.split()[1]
        for line in out.splitlines()
        if line.startswith("=== ") and "(at most" in line
    ]
    assert started == [
        "env",
        "decode",
        "batch",
        "codec",
        "quant",
        "quant-batch",
        "vram",
        "tests",
        "compile",
    ]
    assert "=== decode: timed out after" in out
    cut = json.loads(next(tmp_path.glob("*_decode.json")).read_text())
    assert [r["name"] for r in cut["runs"]] == ["fake-decode"]
    summary = out[out.index("=== summary") :]
    assert re.search(r"^decode\s+timed out\s+\d+ s\s+2 s$", summary, re.M)
    assert re.search(r"^compile\s+ok\s+", summary, re.M)
    assert "fake-decode" in summary and "fake-compile" in summary
    assert summary.rstrip().endswith("not measured or cut: decode (timed out)")
    assert (tmp_path / "run.log").read_text().count("=== summary") == 1


def test_named_steps_run_after_env_only(tmp_path: Path) -> None:
    done = run_script("--fake", "quant", "vram", OUT=str(tmp_path), FAKE_BUDGET_S="5")
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(p.name.split("_")[2] for p in tmp_path.glob("*.json"))
    assert names == ["env.json", "quant.json", "vram.json"]
    assert done.stdout.rstrip().endswith("not measured or cut: none")


def test_a_failed_env_stops_the_run(tmp_path: Path) -> None:
    done = run_script("--fake", OUT=str(tmp_path), FAKE_HANG="env", FAKE_BUDGET_S="1")
    assert done.returncode == 1
    assert "=== env failed: nothing else runs" in done.stdout
    assert [p.name.split("_")[2] for p in tmp_path.glob("*.json")] == ["env.json"]
