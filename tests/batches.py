"""Songs run together through an engine's scheduler (tests/test_batching.py and
tests/test_reference_wiring.py): every comparison keeps the batch's row count, `ROWS` (a matmul
of another row count may round differently; see decode.py)."""

from __future__ import annotations

import torch

from heartmula_rt.runtime.scheduler import Scheduler, SongRun

ROWS = 4
POSITIONS = 160


def run_songs(engine, songs: list[SongRun]) -> list[torch.Tensor]:
    """Each song's frames, all of `songs` run to their ends in one batch of `ROWS` rows."""
    scheduler = Scheduler(ROWS, POSITIONS)
    for song in songs:
        scheduler.submit(song)
    engine.run(scheduler)
    assert not scheduler.busy() and all(song.ended for song in songs)
    return [torch.stack(song.frames, dim=1) for song in songs]
