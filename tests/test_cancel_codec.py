"""A cancelled song's codec (issue #31, items 5b and 24): cancelling stops the live codec
within one ODE step of the window in hand, and a song cancelled before its first codec window
gets its frames decoded (as Ctrl-C's songs in the CLI) instead of no audio at all; with no
cancel, the decoders' results are unchanged."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import heartmula_rt
from heartmula_rt.config import WINDOW
from heartmula_rt.model.codec import DecodeCancelled
from heartmula_rt.model.codec.detokenize import HOP
from heartmula_rt.request import SongRequest
from heartmula_rt.runtime.events import SongEvents
from heartmula_rt.runtime.runner import Song, SongRunner
from heartmula_rt.runtime.scheduler import SongRun

SAMPLES_PER_FRAME = 3840
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


class Heard(SongEvents):
    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []
        self.done = threading.Event()
        self.on_frames = None

    def frames(self, song: Song, new: torch.Tensor) -> None:
        if self.on_frames is not None:
            self.on_frames(song)

    def audio(self, song: Song, piece: np.ndarray) -> None:
        self.pieces.append(piece)

    def written(self, song: Song) -> None:
        self.done.set()

    @property
    def samples(self) -> int:
        return sum(p.shape[1] for p in self.pieces)


def _codes(pipe, frames: int) -> torch.Tensor:
    size = pipe.codec_config.codebook_size
    return torch.randint(0, size, (8, frames), generator=torch.Generator().manual_seed(0))


def test_cancel_stops_the_codec_within_one_ode_step(pipe) -> None:
    request = SongRequest.of("piano", "la", max_frames=WINDOW + HOP, seed=1, num_steps=STEPS)
    heard = Heard()
    runner = SongRunner(pipe, rows=2, positions=1024, events=heard, live=True)
    song = runner.submit(Song(request, SongRun(pipe.prompt(request), request.sampling)))
    calls, cancelled = [], threading.Event()

    def count(*_):
        calls.append(1)
        if len(calls) == STEPS + 2:  # the second step of the second window
            runner.cancel(song)
            cancelled.set()

    hook = pipe.codec.flow_matching.estimator.register_forward_hook(count)
    try:
        # Two windows' codes in one push: window 0 is decoded whole, window 1 is given up.
        runner.codec.push(song, _codes(pipe, WINDOW + HOP))
        assert cancelled.wait(120)
        song.codes, song.ended = _codes(pipe, WINDOW + HOP), "cancelled"  # as the LM ends it
        runner.codec.push(song, None)
        runner.codec.finish()
    finally:
        hook.remove()
    assert len(calls) == STEPS + 2  # no ODE step after the cancel
    assert heard.done.is_set() and song.error is None
    assert heard.samples == HOP * SAMPLES_PER_FRAME  # window 0's audio, kept


def test_a_decoder_that_is_not_stopped_is_unchanged(pipe) -> None:
    codes = _codes(pipe, WINDOW + 40)
    params = SongRequest.of("x", num_steps=2).codec
    expected = pipe.decode_frames(codes, params, seed=3)
    with torch.no_grad():
        decoder = pipe.codec.window_decoder(
            params, generator=torch.Generator().manual_seed(3), stop=lambda: False
        )
        pieces = decoder.push(codes) + decoder.finish()
    assert torch.equal(torch.cat(pieces, dim=1), expected)
    with torch.no_grad(), pytest.raises(DecodeCancelled):
        pipe.codec.window_decoder(params, stop=lambda: True).push(codes)


def test_a_song_cancelled_before_its_first_window_keeps_its_audio(pipe) -> None:
    request = SongRequest.of("piano", "la", max_frames=60, seed=2, num_steps=2, stop_at_eos=False)
    heard = Heard()
    runner = SongRunner(pipe, rows=2, positions=1024, events=heard, live=True)
    song = Song(request, SongRun(pipe.prompt(request), request.sampling))
    heard.on_frames = lambda s: s.made >= 12 and runner.cancel(s)
    runner.start()
    try:
        runner.submit(song)
        assert heard.done.wait(120)
    finally:
        runner.close()
    assert song.ended == "cancelled" and 12 <= song.codes.shape[1] < 61
    # Its frames decoded as a song of that length: what decode_frames makes of them.
    expected = pipe.decode_frames(song.codes, request.codec, seed=2)
    assert heard.samples == song.codes.shape[1] * SAMPLES_PER_FRAME
    assert torch.equal(torch.from_numpy(np.concatenate(heard.pieces, axis=1)), expected)
