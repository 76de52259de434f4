"""Writing audio files: the format from the extension, written to a temporary file and renamed,
so a failed or interrupted write never leaves a half-written song behind.

Streamed songs go to `WavStream`: 16-bit WAV whose header is rewritten after every piece, so the
file is a valid WAV of the audio so far at every moment. A file being written is named
`<stem>.partial.wav` and renamed to the requested name only when the song is complete; a stopped
song keeps the `.partial` name. On a pipe (stdout) the header says "unknown length" (the
largest sizes), as players of streamed WAV expect.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

from heartmula_rt.errors import UserError

SAMPLE_RATE = 48000
# extension -> (libsndfile format, subtype)
FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_24"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def check_output_path(path: Path) -> Path:
    """Fail before any model work if `path` has an unknown extension or cannot be written."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"unknown output extension {path.suffix or '(none)'!r} in {path}; "
            f"use one of {', '.join(FORMATS)}"
        )
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist")
    if path.is_dir():
        raise UserError(f"output path {path} is a folder")
    from heartmula_rt.runtime.codes import sidecar_path  # here: codes.py is the heavier module

    if sidecar_path(path).is_dir():  # found now, not once the song is made (issue #31)
        raise UserError(f"{sidecar_path(path)}, where the song's codes go, is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"output path {path} is not writable")
    try:  # permissions alone do not tell (read-only mounts, root): try to create a file there
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write {path}: its folder {folder} takes no new files ({e.strerror})"
        ) from None
    return path


def partial_path(path: Path) -> Path:
    """Where audio decoded from an interrupted generation goes: `<stem>.partial<ext>`."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def write_audio(path: Path, wav: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> int:
    """Write a [channels, samples] float waveform; returns how many samples were clipped.

    Integer and lossy formats cannot hold values outside [-1, 1]; the caller is told how many
    were clipped rather than having them wrap or silently distort.
    """
    path = check_output_path(path)
    fmt, subtype = FORMATS[path.suffix.lower()]
    data = wav.detach().to(torch.float32).cpu().numpy().T
    clipped = int(np.count_nonzero(np.abs(data) > 1.0))
    data = np.clip(data, -1.0, 1.0)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would leak into the finished file
        # Encoded in memory, then written by Python: a full disk is then OSError's ENOSPC,
        # which libsndfile would report as "System error."
        encoded = io.BytesIO()
        sf.write(encoded, data, sample_rate, format=fmt, subtype=subtype)
        with open(tmp, "wb") as f:
            f.write(encoded.getbuffer())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # e.g. the disk filled up meanwhile
            raise UserError(f"could not write the audio: {_why(e)} ({path})") from None
        if isinstance(e, sf.LibsndfileError):
            raise UserError(f"could not write {path} ({e})") from None
        raise
    return clipped


def _why(e: OSError) -> str:
    """An OSError in a few words: "no space left on device", "file too large", ..."""
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return (e.strerror or str(e)).lower()


def pcm16(data: np.ndarray) -> tuple[bytes, int]:
    """Float samples [channels, n] → (interleaved little-endian 16-bit bytes, number clipped),
    converted as libsndfile converts `write_audio`'s WAV files: floor(x · 32768), clipped."""
    clipped = int(np.count_nonzero(np.abs(data) > 1.0))
    ints = np.floor(np.clip(data, -1.0, 1.0) * 32768.0).clip(-32768, 32767).astype("<i2")
    return ints.T.tobytes(), clipped


class WavStream:
    """A 16-bit PCM WAV written piece by piece to `out` (a binary file or pipe).

    On a seekable file the RIFF and data sizes are rewritten after every piece; on a pipe they
    stay at the largest value ("length unknown").
    """

    HEADER_BYTES = 44

    def __init__(self, out: BinaryIO, sample_rate: int = SAMPLE_RATE, channels: int = 2) -> None:
        self.out, self.sample_rate, self.channels = out, sample_rate, channels
        self.data_bytes = 0
        self.clipped = 0
        try:
            self.seekable = out.seekable()
        except (AttributeError, OSError):
            self.seekable = False
        self._header(0xFFFFFFFF - self.HEADER_BYTES + 8)

    @property
    def seconds(self) -> float:
        return self.data_bytes / (2 * self.channels * self.sample_rate)

    def write(self, piece: np.ndarray) -> None:
        """Append float samples [channels, n] (numpy, or a CPU tensor as a stream gives them)."""
        data, clipped = pcm16(np.asarray(piece))
        self.clipped += clipped
        if self.seekable:  # after the last complete piece, whatever an interrupted write left
            self.out.seek(self.HEADER_BYTES + self.data_bytes)
        self._write_all(data)
        self.data_bytes += len(data)
        if self.seekable:
            self.out.seek(0)
            self._header(self.data_bytes)
        self.out.flush()

    def _write_all(self, data: bytes) -> None:
        """All of `data`, or an OSError: an unbuffered file (stdout under PYTHONUNBUFFERED, a
        raw file) may take part of it and say so only by the count it returns (a full disk,
        a file size limit); the next write then raises what went wrong."""
        view = memoryview(data)
        while view:
            written = self.out.write(view)
            if written is None:  # a sink that counts nothing takes everything (app.py's)
                return
            view = view[written:]

    def _header(self, data_bytes: int) -> None:
        block = 2 * self.channels
        self._write_all(
            b"RIFF"
            + struct.pack("<I", data_bytes + self.HEADER_BYTES - 8)
            + b"WAVEfmt "
            + struct.pack(
                "<IHHIIHH",
                16,
                1,
                self.channels,
                self.sample_rate,
                self.sample_rate * block,
                block,
                16,
            )
            + b"data"
            + struct.pack("<I", data_bytes)
        )
