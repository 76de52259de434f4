"""Reference clips sent to the server (`POST /v1/references`, docs/reference-audio.md): the
clip's bytes, bounded in size, written to a private temporary file and read by
model/reference.py as the CLI reads one (only the range asked for, every bad input one
sentence); its MuQ-MuLan embedding is returned for a song's `"reference"` and cached by the
clip's sha256 and range, so the same clip costs one embedding.

The embedder loads on first use (the published weights; `model.reference.load_embedder`, which
tests replace) on `device`; kept for the next clip, or, with `keep=False` (a GPU whose memory
the LM's plan counts on), freed after each.
"""

from __future__ import annotations

import gc
import hashlib
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from heartmula_rt.errors import UserError

MAX_CLIP_BYTES = 16 * 2**20  # a minute and a half of CD-quality WAV; many minutes of MP3
MAX_RANGE_SECONDS = 60.0  # of the clip embedded (six of MuQ-MuLan's 10 s windows)
CACHED = 64  # embeddings kept, by clip and range
# What a clip's Content-Type says it is → the name soundfile reads it by.
CLIP_TYPES = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "application/octet-stream": "",
}


def check_range(start: object, end: object) -> tuple[float, float]:
    """A clip's range from a client: numbers, 0 ≤ start < end, at least 1 s and at most
    MAX_RANGE_SECONDS long."""
    from heartmula_rt.request import seconds_value

    a, b = seconds_value("start", start), seconds_value("end", end, positive=True)
    if not a < b:
        raise UserError(f"start must come before end, not {a:g} and {b:g}")
    if b - a > MAX_RANGE_SECONDS:
        raise UserError(
            f"a reference range may be at most {MAX_RANGE_SECONDS:g} s on this server, "
            f"not {b - a:g} s"
        )
    if b - a < 1.0:
        raise UserError(f"a reference range must be at least 1 s long, not {b - a:g} s")
    return a, b


class ReferenceEmbedder:
    """Clips → embeddings for the server, one at a time (a lock), cached."""

    def __init__(self, device: str = "cpu", *, keep: bool = True) -> None:
        self.device, self.keep = device, keep
        self._lock = threading.Lock()
        self._embedder: Any = None
        self._cache: OrderedDict[str, list[float]] = OrderedDict()

    def embed(self, data: bytes, suffix: str, seconds: tuple[float, float]) -> dict[str, Any]:
        """{"id", "embedding" (512 floats), "seconds" [start, end]} of a clip's bytes."""
        if len(data) > MAX_CLIP_BYTES:
            raise UserError(f"the clip is over {MAX_CLIP_BYTES} bytes")
        a, b = seconds
        key = f"{hashlib.sha256(data).hexdigest()[:32]}-{a:g}-{b:g}"
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return {"id": key, "embedding": cached, "seconds": [a, b]}
            embedding = self._embed(data, suffix, seconds)
            self._cache[key] = embedding
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return {"id": key, "embedding": embedding, "seconds": [a, b]}

    def _embed(self, data: bytes, suffix: str, seconds: tuple[float, float]) -> list[float]:
        from heartmula_rt.model import reference

        with tempfile.TemporaryDirectory(prefix="heartmula-rt-clip-") as folder:
            path = Path(folder) / f"clip{suffix}"
            path.write_bytes(data)
            try:
                wav = reference.read_reference_audio(path, seconds)
            except UserError as e:  # said of "the clip", not of a temporary path
                said = str(e).replace(str(path), "the clip").replace(path.name, "the clip")
                raise UserError(said) from None
        if self._embedder is None:
            self._embedder = reference.load_embedder(self.device)
        try:
            return self._embedder.embed(wav).tolist()
        finally:
            if not self.keep:
                self.free()

    def free(self) -> None:
        """Let the embedder go (its GPU memory handed back); the next clip loads it again."""
        self._embedder = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
