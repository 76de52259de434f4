"""A song's audio while it is made: float32 samples appended to `FOLDER/<id>.pcm` by the codec's
thread (`LiveAudio`), read from the start by any number of listeners meanwhile (`listen_pcm`:
the one reader, for a local service's songs and for a Ray replica's, read from the shared
folder), and read whole once the song ends (`read_pcm`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.serve.jobs import Job, JobStore

CHANNELS = 2
FRAME_BYTES = 4 * CHANNELS  # one float32 sample of every channel


def listen_pcm(
    path: Path, ended: Callable[[], bool], wait: Callable[[int], None]
) -> Iterator[np.ndarray]:
    """The samples [2, n] of a growing `.pcm` file from its start, each piece as soon as it is
    written, to its end: `ended()` says the writer is done (asked before each read, so every
    sample of an ended song is read), `wait(samples read)` waits for more. An empty piece comes
    after each wait without news, so that a server notices a listener that has gone. The file
    is opened here, so a listener reads it to its end even once the finished song's file has
    replaced it."""
    f = open(path, "rb")  # noqa: SIM115 (closed by the generator); may raise: ended

    def pieces() -> Iterator[np.ndarray]:
        rest, read = b"", 0
        with f:
            while True:
                done = ended()
                data = rest + f.read()
                usable = len(data) // FRAME_BYTES * FRAME_BYTES  # a torn last sample waits
                rest, read = data[usable:], read + usable // FRAME_BYTES
                yield np.frombuffer(data[:usable], dtype="<f4").reshape(-1, CHANNELS).T
                if done:
                    return
                if not usable:
                    wait(read)

    return pieces()


def read_pcm(path: Path) -> np.ndarray:
    """The samples [2, n] of a `.pcm` file, to its last whole sample."""
    raw = path.read_bytes()
    usable = len(raw) // FRAME_BYTES * FRAME_BYTES  # a killed writer's last sample may be torn
    return np.frombuffer(raw[:usable], dtype="<f4").reshape(-1, CHANNELS).T


class LiveAudio:
    """One song's audio as it is decoded: float32 [2, n] pieces appended to its `.pcm` file,
    listeners woken as each piece is on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (open for the song's whole life)
        self.samples = 0  # per channel, complete on disk
        self.done = False
        self._changed = threading.Condition()

    def append(self, piece: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(piece.T, dtype="<f4").tobytes())
        self._file.flush()
        with self._changed:
            self.samples += piece.shape[1]
            self._changed.notify_all()

    def close(self) -> None:
        self._file.close()
        with self._changed:
            self.done = True
            self._changed.notify_all()

    def listen(self, wait_s: float = 1.0) -> Iterator[np.ndarray]:
        """`listen_pcm` of this song, each wait at most `wait_s`."""

        def wait(read: int) -> None:
            with self._changed:
                if self.samples == read and not self.done:
                    self._changed.wait(wait_s)

        return listen_pcm(self.path, lambda: self.done, wait)


def write_final(
    store: JobStore, folder: Path, job: Job, state: str, sample_rate: int, error: str | None = None
) -> None:
    """A song's final file (if it has audio) written from its audio file so far (`FOLDER/ID.pcm`,
    which goes), and its record's final `state`: the service's end of every song, and how a
    song whose maker has gone (a killed replica, ray_app.py) is kept as `interrupted`."""
    pcm = folder / f"{job.id}.pcm"
    audio = None
    if pcm.is_file():
        wav = read_pcm(pcm)
        if wav.shape[1]:
            audio = f"{job.id}.{job.format}"
            write_audio(folder / audio, torch.from_numpy(wav.copy()), sample_rate)
            job.audio_seconds = wav.shape[1] / sample_rate
    # The record names the file before the live audio goes: a listener who comes now gets one.
    job.audio, job.finished, job.error = audio, time.time(), error
    store.update(
        job.id,
        state=state,
        audio=audio,
        finished=job.finished,
        error=error,
        frames=job.frames,
        audio_seconds=job.audio_seconds,
    )
    pcm.unlink(missing_ok=True)
