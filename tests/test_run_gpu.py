"""benchmarks/run_gpu.sh without a GPU: its plan, its deadlines and its summary (run for real in
its fake mode), and the bench results it relies on being written as each run ends."""

from __future__ import annotations

import json
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
