"""What the HTTP app needs of whatever makes its songs (`SongBackend`): one pipeline's
`SongService` (service.py), or the Ray router over replicas (ray_app.py); and the frames/s meter
both keep."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from heartmula_rt.errors import UserError
from heartmula_rt.runtime.audio import FORMATS
from heartmula_rt.serve.jobs import Job

RATE_WINDOW_S = 10.0  # frames/s is reported over this many seconds of recent work
AUDIO_FORMATS = tuple(ext.lstrip(".") for ext in FORMATS)
DEFAULT_FORMAT = "mp3"


class QueueFull(Exception):
    """The queue holds `max_queue` songs; `retry_after` seconds is a fair time to try again."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; try again in {retry_after} s")
        self.retry_after = retry_after


class Conflict(UserError):
    """A request that cannot apply to the song as it stands (HTTP 409)."""



class Listenable(Protocol):
    def listen(self) -> Iterator[np.ndarray]: ...


class SongBackend(Protocol):
    """Songs from any thread: queue, edit, cancel, and read them as they are made."""

    def info(self) -> dict[str, Any]:
        """What /v1/info shows: sample_rate, model, device, engine, quant, max_seconds,
        songs_at_once."""
        ...

    def submit(self, body: object) -> Job: ...

    def edit(self, job_id: str, kind: str, body: object) -> Job: ...

    def cancel(self, job_id: str) -> bool: ...

    def job(self, job_id: str) -> Job | None: ...

    def recent(self, limit: int) -> list[Job]: ...

    def live_audio(self, job_id: str) -> Listenable | None: ...

    def audio_path(self, job: Job) -> Path | None: ...

    def stats(self) -> dict[str, Any]: ...

    def gpu_memory(self) -> tuple[int, int] | None: ...


class RateMeter:
    """Frames made over the last `RATE_WINDOW_S` seconds, from any thread."""

    def __init__(self) -> None:
        self._made: deque[tuple[float, int]] = deque()  # (when, frames)
        self._lock = threading.Lock()

    def add(self, frames: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._made.append((now, frames))
            while self._made and now - self._made[0][0] > RATE_WINDOW_S:
                self._made.popleft()

    def frames(self) -> int:
        """Frames made in the window."""
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._made if now - t <= RATE_WINDOW_S)

    def per_second(self) -> float:
        return self.frames() / RATE_WINDOW_S
