"""Audio files: formats by extension, clipping reported, nothing half-written on failure."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from heartmula_rt.errors import UserError
from heartmula_rt.runtime.audio import FORMATS, WavStream, partial_path, write_audio


@pytest.mark.parametrize("ext", list(FORMATS))
def test_round_trip(tmp_path: Path, ext: str) -> None:
    t = torch.arange(48000) / 48000
    wav = torch.stack(
        [0.5 * torch.sin(2 * torch.pi * 440 * t), 0.25 * torch.sin(2 * torch.pi * 220 * t)]
    )
    path = tmp_path / f"tone{ext}"
    assert write_audio(path, wav) == 0
    data, rate = sf.read(str(path), dtype="float32")
    assert rate == 48000 and data.shape == (48000, 2)
    if ext in (".wav", ".flac"):  # lossless: equal to the quantisation step
        np.testing.assert_allclose(data.T, wav.numpy(), atol=1 / 2**15)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600


def test_clipping_is_counted(tmp_path: Path) -> None:
    wav = torch.zeros(2, 100)
    wav[0, :3] = 1.5
    wav[1, 10] = -2.0
    assert write_audio(tmp_path / "loud.wav", wav) == 4
    data, _ = sf.read(str(tmp_path / "loud.wav"))
    assert data.max() <= 1.0 and data.min() >= -1.0


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sf, "write", disk_full)
    out = tmp_path / "song.flac"
    with pytest.raises(UserError, match="could not write the audio: no space left on device"):
        write_audio(out, torch.zeros(2, 10))
    assert list(tmp_path.iterdir()) == []


def test_partial_path() -> None:
    assert partial_path(Path("out/song.mp3")) == Path("out/song.partial.mp3")


def test_wav_stream_is_valid_at_every_piece_and_equals_write_audio(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    wav = (rng.standard_normal((2, 30_000)) * 0.6).astype(np.float32)  # some beyond [-1, 1]
    streamed = tmp_path / "streamed.wav"
    with streamed.open("wb") as f:
        out = WavStream(f)
        for start in range(0, wav.shape[1], 7_000):
            out.write(wav[:, start : start + 7_000])
            assert sf.info(str(streamed)).frames == min(start + 7_000, wav.shape[1])
    whole = tmp_path / "whole.wav"
    assert write_audio(whole, torch.from_numpy(wav)) == out.clipped > 0
    assert streamed.read_bytes() == whole.read_bytes()
    assert out.seconds == wav.shape[1] / 48000


def test_wav_stream_to_a_pipe_says_length_unknown(tmp_path: Path) -> None:
    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    pipe = Pipe()
    WavStream(pipe).write(np.full((2, 10), 0.5, dtype=np.float32))
    data = pipe.getvalue()
    assert data[:4] == b"RIFF" and data[36:40] == b"data"
    assert data[4:8] == b"\xff\xff\xff\xff" and data[40:44] == b"\xdb\xff\xff\xff"  # 2³² − 1
    assert np.array_equal(np.frombuffer(data[44:], "<i2"), np.full(20, 16384))
