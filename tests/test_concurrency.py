"""One `Pipeline` shared by threads: calls from several threads give each the song it would
get alone (they take turns on the pipeline's lock), for the plain and the static engine."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

import heartmula_rt
from heartmula_rt.runtime.engine import StaticEngine
from heartmula_rt.runtime.pipeline import Pipeline

TAGS, LYRICS = "piano", "la la"
SONGS = [{"seed": seed, "max_seconds": 0.5, "num_steps": 1} for seed in range(4)]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path) -> Pipeline:
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


def song(pipe: Pipeline, i: int) -> np.ndarray:
    """Song i: even ones through `generate`, odd ones through a stream."""
    if i % 2:
        return np.concatenate(list(pipe.stream(TAGS, LYRICS, **SONGS[i])), axis=1)
    return pipe.generate(TAGS, LYRICS, **SONGS[i]).numpy()


# The static step runs its sampler in Triton's interpreter on the CPU (seconds a frame): 2 songs.
@pytest.mark.parametrize(("engine", "songs"), [("plain", 4), ("static", 2)])
def test_threads_share_a_pipeline(pipe: Pipeline, engine: str, songs: int) -> None:
    if engine == "static":
        pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")
        # The capture-free step: the same shared caches and device sampler a graph replays.
        static = StaticEngine(pipe.lm, pipe.gen_config, graphs=False, sync_every=4)
        pipe = dataclasses.replace(pipe, engine=static)
    alone = [song(pipe, i) for i in range(songs)]
    assert not np.array_equal(alone[0], alone[1])  # different songs, so a mix-up would show

    together: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(songs)

    def run(i: int) -> None:
        start.wait()
        try:
            together[i] = song(pipe, i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(songs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, expected in enumerate(alone):
        assert np.array_equal(together[i], expected), f"song {i}"
