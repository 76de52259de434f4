"""CPU threads: `load_pipeline(threads=)` reaches torch in every thread that runs the pipeline's
work, and importing heartmula_rt makes torch's OpenMP workers wait passively."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import heartmula_rt
from heartmula_rt import UserError
from heartmula_rt.request import CodecParams
from heartmula_rt.runtime.loader import resolve_threads


@pytest.fixture
def restore_threads():
    """torch's count is process state: put it back for the tests that follow."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_reach_the_calling_and_the_stream_worker_thread(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch, restore_threads
) -> None:
    pipe = heartmula_rt.load_pipeline(tiny_ckpt, threads=1)
    assert pipe.threads == torch.get_num_threads() == 1
    seen: list[tuple[bool, int]] = []  # (in the main thread, torch's count) at each window
    decode = pipe.codec.scalar_model.decode_chunked

    def recording(*args, **kwargs):
        seen.append(
            (threading.current_thread() is threading.main_thread(), torch.get_num_threads())
        )
        return decode(*args, **kwargs)

    monkeypatch.setattr(pipe.codec.scalar_model, "decode_chunked", recording)
    frames = torch.zeros(8, 10, dtype=torch.long)
    torch.set_num_threads(2)  # as another library, or a pipeline loaded with threads=2, would
    pipe.decode_frames(frames, CodecParams(num_steps=1))
    torch.set_num_threads(2)  # a new thread starts with the count last set in any thread
    for _ in pipe.stream("piano", "la la", max_seconds=0.8, num_steps=1, seed=0):
        pass
    assert seen == [(True, 1), (False, 1)]


def test_default_threads_leave_one_core_free(restore_threads) -> None:
    torch.set_num_threads(64)
    assert resolve_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1 or the user's own choice: kept
    assert resolve_threads() == 1
    assert resolve_threads(3) == 3


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_bad_thread_counts(threads) -> None:
    with pytest.raises(UserError, match="threads must be a whole number of at least 1"):
        resolve_threads(threads)


def test_import_makes_openmp_workers_wait_passively() -> None:
    # libgomp prints its settings as torch loads it: spin count 0 when passive (300000 by default).
    # heartmula_rt loads torch only when a model runs; what it sets holds for torch loaded later.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", "import heartmula_rt, torch; torch.ones(4).sum()"],
        env={**env, "OMP_DISPLAY_ENV": "VERBOSE"},
        capture_output=True,
        text=True,
        check=True,
    )
    if "GOMP_SPINCOUNT" not in done.stderr:
        pytest.skip("torch's OpenMP runtime here is not libgomp")
    assert "GOMP_SPINCOUNT = '0'" in done.stderr
