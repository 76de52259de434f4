"""Streaming: a song's audio while the LM is still making it.

One worker thread runs the LM through the song runner (runner.py) and, from its `on_codes`
callback, feeds each batch of new codes to the codec's `LiveDecoder` (live.py; interleaving): a
window is decoded as soon as its codes are certain and the audio up to the next crossfade comes
out. On a GPU the codec runs on a second CUDA stream (its own, reused by every song) and its
audio is copied back asynchronously, so the LM's next frames run on the GPU beside it; the host
collects finished pieces at the next callback. The consumer (a file writer, a player) reads
float32 [2, n] pieces from `SongStream`, whose concatenation is bit for bit the non-streamed song
of the same seed: the same decoder does the same work in both.

All GPU work stays on the worker thread, so CUDA graph captures never see another thread's
launches; the consumer thread only touches host memory.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.request import DEFAULT_CODEC, CodecParams, SamplingParams
from heartmula_rt.runtime.decode import OnFrame
from heartmula_rt.runtime.engine import Engine
from heartmula_rt.runtime.live import LiveDecoder
from heartmula_rt.runtime.runner import SongsInterrupted, run_songs
from heartmula_rt.runtime.scheduler import SongRun

if TYPE_CHECKING:
    from heartmula_rt.runtime.pipeline import Pipeline

_END = object()  # queue marker: the song is complete


class _Song:
    """What the worker thread shares with its `SongStream`: the queue, the flags, the results.

    The thread holds this, never the `SongStream`, so a stream nobody holds any more is garbage
    collected (and closed) while its worker runs.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()  # pieces, then _END or the worker's exception
        self.stop = threading.Event()  # end the LM at its next frame
        self.closed = threading.Event()  # and skip the codec's remaining work
        self.frames: torch.Tensor | None = None
        self.interrupted = False
        self.first_audio_s: float | None = None
        self.start = time.perf_counter()

    def put(self, piece: np.ndarray) -> None:
        if self.first_audio_s is None:
            self.first_audio_s = time.perf_counter() - self.start
        self.queue.put(piece)


def _finish(song: _Song, thread: threading.Thread, *, close: bool) -> None:
    """Stop (or close) the song and wait for its worker, unless called from the worker itself."""
    song.stop.set()
    if close:
        song.closed.set()
    if thread is not threading.current_thread():
        thread.join()
    if close:  # nothing more will be read: drop what the worker left
        with song.queue.mutex:
            song.queue.queue.clear()


class SongStream:
    """Iterate to get a song's audio as float32 [2, n] torch tensors on the CPU while it is
    generated (the type `Pipeline.generate` returns).

    After the last piece, `frames` holds the codes [8, T], `interrupted` whether `stop()` cut
    the song short and `first_audio_s` the seconds from the start to the first piece. An error
    in the worker is raised from the iteration.

    `stop()` ends the LM at its next frame and waits while the frames made so far are decoded to
    the end, as a song of that length: the pieces still to be read keep the stream a
    prefix-exact, properly ended song. `close()` (also on leaving a `with` block, when the stream
    is garbage collected, and at interpreter exit) ends it at once: the LM stops, the codec's
    remaining work is skipped, unread pieces are dropped and the iteration ends. Both return
    with the worker thread finished, so nothing is left running.

    The worker holds the pipeline's lock from the song's first frame to its last piece: songs of
    one pipeline run one at a time.
    """

    def __init__(
        self,
        pipe: Pipeline,
        prompt: Prompt,
        sampling: SamplingParams,
        codec_params: CodecParams = DEFAULT_CODEC,
        *,
        generator: torch.Generator | None = None,
        on_frame: OnFrame | None = None,
        engine: Engine | None = None,
        codec: HeartCodec | None = None,
    ) -> None:
        """`generator` draws the codec's noise (None: fresh random noise); `engine` and `codec`
        replace the pipeline's own (bench compares them). The worker holds `pipe.lock` and
        runs torch with `pipe.threads`."""
        self._song = song = _Song()
        self._ended = False
        work = _Work(pipe, engine or pipe.engine, codec or pipe.codec, prompt, sampling,
                     codec_params, generator, on_frame)  # fmt: skip
        self._thread = threading.Thread(
            target=_run, args=(song, pipe.lock, pipe.threads, work), name="heartmula-rt song",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        # Runs close() once: on close(), on garbage collection, or at interpreter exit (daemon
        # threads still running inside torch when the interpreter ends abort the process).
        self._finalizer = weakref.finalize(self, _finish, song, self._thread, close=True)

    @property
    def frames(self) -> torch.Tensor | None:
        return self._song.frames

    @property
    def interrupted(self) -> bool:
        return self._song.interrupted

    @property
    def first_audio_s(self) -> float | None:
        return self._song.first_audio_s

    def stop(self) -> None:
        _finish(self._song, self._thread, close=False)

    def close(self) -> None:
        self._ended = True
        self._finalizer()

    def __enter__(self) -> SongStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._ended:
            raise StopIteration
        item = self._song.queue.get()
        if item is _END or isinstance(item, BaseException):
            self._ended = True
            self._thread.join()
            if item is _END:
                raise StopIteration
            raise item
        return torch.from_numpy(item)  # the API's one type: torch tensors on the CPU (no copy)


@dataclass(frozen=True)
class _Work:
    """What the worker runs: one song of `pipe` through the song runner with `engine`, decoded
    by `codec`."""

    pipe: Pipeline
    engine: Engine
    codec: HeartCodec
    prompt: Prompt
    sampling: SamplingParams
    codec_params: CodecParams
    generator: torch.Generator | None
    on_frame: OnFrame | None


def _run(song: _Song, lock: threading.RLock, threads: int, work: _Work) -> None:
    torch.set_num_threads(threads)  # torch keeps the count per thread
    held = _acquire(lock, song.stop)
    try:
        if held:
            # Not inference_mode: the static engine's state outlives the song, and inference
            # tensors could not be updated by a later song outside that mode.
            with torch.no_grad():
                _generate(song, work)
        else:  # stopped while another call held the pipeline
            song.frames, song.interrupted = (
                torch.zeros(work.engine.model.config.audio_num_codebooks, 0, dtype=torch.long),
                True,
            )
    except BaseException as e:  # handed to the consumer, raised there
        song.queue.put(e)
    else:
        song.queue.put(_END)
    finally:
        if held:
            lock.release()


def _acquire(lock: threading.RLock, stop: threading.Event) -> bool:
    """Wait for `lock` until `stop` is set; whether it is held."""
    while not lock.acquire(timeout=0.05):
        if stop.is_set():
            return False
    return True


def _generate(song: _Song, work: _Work) -> None:
    live = LiveDecoder(work.codec, work.codec_params, generator=work.generator, put=song.put)
    received = 0

    def on_codes(new: torch.Tensor) -> None:
        nonlocal received
        if song.stop.is_set():
            raise KeyboardInterrupt  # the engines' own early stop: they keep the frames
        received += new.shape[1]
        live.push(new)

    run = SongRun(work.prompt, work.sampling, on_frame=work.on_frame, on_codes=on_codes)
    try:
        (frames,) = run_songs(work.pipe, [run], run.rows, one_song=True, engine=work.engine)
    except SongsInterrupted as stopped:
        frames, song.interrupted = stopped.songs[0].codes, True
    song.frames = frames
    if frames.shape[1] == 0 or song.closed.is_set():
        return  # stopped before the first frame (no song), or closed (nobody listens)
    if frames.shape[1] > received:
        live.push(frames[:, received:])
    live.finish()
