"""Streaming: a song's audio while the LM is still making it.

One worker thread runs the LM and, from its `on_codes` callback, feeds each batch of new codes to
the codec's `WindowDecoder` (interleaving): a window is decoded as soon as its codes are certain
and the audio up to the next crossfade comes out. On a GPU the codec runs on a second CUDA
stream (its own, reused by every song) and its audio is copied back asynchronously, so the LM's
next frames run on the GPU beside it; the host collects finished pieces at the next callback.
The consumer (a file writer, a player) reads float32 [2, n] numpy pieces from `SongStream`, whose
concatenation is bit for bit the non-streamed song of the same seed: the same decoder does the
same work in both.

All GPU work stays on the worker thread, so CUDA graph captures never see another thread's
launches; the consumer thread only touches numpy arrays.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .codec import HeartCodec
from .decode import GenerationInterrupted
from .engine import Engine
from .prompt import Prompt

_END = object()  # queue marker: the song is complete


class _Readback:
    """Device pieces → host numpy, in order; on CUDA without waiting for the device."""

    def __init__(self, device: torch.device, put: Callable[[np.ndarray], None]) -> None:
        self.cuda = device.type == "cuda"
        self.put = put
        self.pending: deque[tuple[Any, torch.Tensor]] = deque()  # (event, pinned host copy)

    def add(self, pieces: list[torch.Tensor]) -> None:
        for piece in pieces:
            if not self.cuda:
                self.put(np.ascontiguousarray(piece.numpy()))
                continue
            host = torch.empty(piece.shape, dtype=piece.dtype, pin_memory=True)
            host.copy_(piece, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((event, host))
        self.flush(wait=False)

    def flush(self, *, wait: bool) -> None:
        """Hand out the pieces whose copies are done (all of them, waiting, if `wait`)."""
        while self.pending and (wait or self.pending[0][0].query()):
            event, host = self.pending.popleft()
            event.synchronize()
            self.put(host.numpy())


class SongStream:
    """Iterate to get a song's audio as float32 [2, n] numpy pieces while it is generated.

    After the last piece, `frames` holds the codes [8, T], `interrupted` whether `stop()` cut
    the song short and `first_audio_s` the seconds from the start to the first piece. `stop()`
    ends the LM at its next frame; the frames made so far are decoded to the end as a song of
    that length, so the stream stays a prefix-exact, properly ended song. An error in the
    worker is raised from the iteration.
    """

    def __init__(
        self,
        engine: Engine,
        codec: HeartCodec,
        prompt: Prompt,
        *,
        num_steps: int = 10,
        guidance_scale: float = 1.25,
        generator: torch.Generator | None = None,
        on_frame: Callable[[int], None] | None = None,
        threads: int | None = None,
        **generate: Any,
    ) -> None:
        """`generate` holds `generate_frames`' keyword arguments (max_frames, topk, ...);
        `threads` is torch's CPU thread count in the worker (None: torch's default for a new
        thread, the count last set in any thread)."""
        self.frames: torch.Tensor | None = None
        self.interrupted = False
        self.first_audio_s: float | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ended = False
        self._start = time.perf_counter()
        self._threads = threads
        args = (engine, codec, prompt, num_steps, guidance_scale, generator, on_frame, generate)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self._ended:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self._ended = True
            self._thread.join()
            if item is _END:
                raise StopIteration
            raise item
        return item

    def _put(self, piece: np.ndarray) -> None:
        if self.first_audio_s is None:
            self.first_audio_s = time.perf_counter() - self._start
        self._queue.put(piece)

    def _run(self, *args: Any) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)  # torch keeps the count per thread
        try:
            # Not inference_mode: the static engine's state outlives the song, and inference
            # tensors could not be updated by a later song outside that mode.
            with torch.no_grad():
                self._generate(*args)
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)
        else:
            self._queue.put(_END)

    def _generate(
        self,
        engine: Engine,
        codec: HeartCodec,
        prompt: Prompt,
        num_steps: int,
        guidance_scale: float,
        generator: torch.Generator | None,
        on_frame: Callable[[int], None] | None,
        generate: dict[str, Any],
    ) -> None:
        device = codec.flow_matching.cond_feature_emb.weight.device
        side = codec.side_stream.get(device) if device.type == "cuda" else None

        def on_side() -> contextlib.AbstractContextManager:
            """Every codec tensor is made and used on the side stream, never across streams."""
            return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()

        with on_side():
            decoder = codec.window_decoder(
                num_steps=num_steps, guidance_scale=guidance_scale, generator=generator
            )
        readback = _Readback(device, self._put)
        received = 0

        def decode(pieces: Callable[[], list[torch.Tensor]]) -> None:
            if side is not None:  # the codes were written on the LM's stream
                side.wait_stream(torch.cuda.current_stream(device))
            with on_side():
                readback.add(pieces())

        def on_codes(new: torch.Tensor) -> None:
            nonlocal received
            if self._stop.is_set():
                raise KeyboardInterrupt  # the engines' own early stop: they keep the frames
            received += new.shape[1]
            decode(lambda: decoder.push(new))

        try:
            frames = engine.generate_frames(
                prompt, on_frame=on_frame, on_codes=on_codes, **generate
            )
        except GenerationInterrupted as stopped:
            frames, self.interrupted = stopped.frames, True
        self.frames = frames
        if frames.shape[1] == 0:
            return  # stopped before the first frame: no song
        if frames.shape[1] > received:
            decode(lambda: decoder.push(frames[:, received:]))
        decode(decoder.finish)
        readback.flush(wait=True)
