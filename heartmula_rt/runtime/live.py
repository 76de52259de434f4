"""A song's codec while its frames come (`LiveDecoder`): each window decoded as soon as its codes
are certain, on the codec's side stream on a GPU, its audio copied back without waiting. The
song runner's live songs (serve) and `SongStream` decode with it; their audio is bit for bit the
whole song's decode."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from heartmula_rt.model.codec import DecodeCancelled, HeartCodec
from heartmula_rt.request import CodecParams


class Readback:
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


class LiveDecoder:
    """A song's codec while its frames come: `push(new)` decodes the windows the new codes
    complete and hands their audio to `put` as float32 [2, n] numpy pieces; `finish()` decodes
    the rest, to the song's end, and hands out every piece. On a GPU the codec runs on its side
    stream and the pieces are copied back without waiting; `put` may then come a push later."""

    def __init__(
        self,
        codec: HeartCodec,
        params: CodecParams,
        *,
        generator: torch.Generator | None,
        put: Callable[[np.ndarray], None],
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.device = codec.flow_matching.cond_feature_emb.weight.device
        self.side = codec.side_stream.get(self.device) if self.device.type == "cuda" else None
        with self._on_side():  # `stop`: the song was cancelled (WindowDecoder, DecodeCancelled)
            self.decoder = codec.window_decoder(params, generator=generator, stop=stop)
        self.readback = Readback(self.device, put)

    def _on_side(self) -> contextlib.AbstractContextManager:
        """Every codec tensor is made and used on the side stream, never across streams."""
        return torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()

    def _decode(self, pieces: Callable[[], list[torch.Tensor]]) -> None:
        if self.side is not None:  # the codes were written on the LM's stream
            self.side.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_side():
            try:
                done = pieces()
            except DecodeCancelled as e:  # a cancelled song: the windows before are its audio
                self.readback.add(e.pieces[0] if e.pieces else [])
                raise
            self.readback.add(done)

    def push(self, new: torch.Tensor) -> None:
        self._decode(lambda: self.decoder.push(new))

    def finish(self) -> None:
        self._decode(self.decoder.finish)
        self.readback.flush(wait=True)
