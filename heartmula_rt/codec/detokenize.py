"""Codes [8, T] → stereo waveform (SPEC §5.1–5.4, §5.7): input guard, windows, in-context
chaining of the flow-matching latents, scalar decoding and crossfade stitching.

Windows are 372 codes (744 latent frames) with a hop of 320; each window after the first takes
the previous window's last 104 latent frames as its in-context prefix. The reference's tail-drop
quirk is fixed: the codes are always padded to a whole number of hops plus the overlap, so every
code is decoded.

`WindowDecoder` is the one implementation: `detokenize` gives it every code at once, streaming
(heartmula_rt/stream.py) gives it codes as the LM makes them, and both get the same samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch

from ..config import LATENTS_PER_CODE, WINDOW, CodecConfig
from ..errors import UserError
from ..request import CodecParams
from .dit import FlowMatching
from .scalar import DECODE_CHUNK, ScalarModel

log = logging.getLogger(__name__)

HOP = 320  # codes between window starts
OVERLAP = WINDOW - HOP  # 52 codes shared by neighbouring windows


def check_codes(codes: torch.Tensor, codebook_size: int, num_quantizers: int = 8) -> torch.Tensor:
    """Validate codes [num_quantizers, T ≥ 1] of non-negative integer ids; returns them as int64."""
    if not isinstance(codes, torch.Tensor):
        raise UserError(f"codes must be a torch.Tensor, not {type(codes).__name__}")
    if codes.dim() != 2 or codes.shape[0] != num_quantizers or codes.shape[1] == 0:
        raise UserError(
            f"codes must have shape [{num_quantizers}, T] with T ≥ 1, not {list(codes.shape)}"
        )
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise UserError(f"codes must be an integer tensor, not {codes.dtype}")
    codes = codes.long()
    if bool((codes < 0).any()):
        raise UserError(f"codes must be ids in [0, {codebook_size}); got a negative id")
    return codes


def sanitize_codes(
    codes: torch.Tensor, codebook_size: int, num_quantizers: int = 8
) -> tuple[torch.Tensor, int]:
    """Validate codes [num_quantizers, T] and replace stray ids ≥ codebook_size.

    The LM can emit ids in [codebook_size, audio_eos_id) that index past the codebook. Each is
    replaced by the same codebook's id from the nearest earlier valid frame, else the nearest
    later one, else 0. Returns (int64 codes, number of ids replaced); the input is not modified.
    """
    codes = check_codes(codes, codebook_size, num_quantizers)
    valid = codes < codebook_size
    n_stray = int((~valid).sum())
    if n_stray == 0:
        return codes, 0
    T = codes.shape[1]
    t = torch.arange(T, device=codes.device).expand_as(codes)
    prev = torch.where(valid, t, -1).cummax(dim=1).values  # last valid frame at or before t
    nxt = torch.where(valid, t, T).flip(1).cummin(dim=1).values.flip(1)  # first at or after t
    src = torch.where(prev >= 0, prev, nxt)
    fixed = codes.gather(1, src.clamp(max=T - 1))
    return torch.where(src < T, fixed, 0), n_stray


def plan_windows(num_codes: int) -> tuple[int, list[int]]:
    """(padded length in codes, window starts) for T = num_codes.

    Short inputs are padded to one window; then the length is padded to a whole number of hops
    plus the overlap, ceil((L − 52)/320)·320 + 52, so that the windows at 0, 320, 640, … cover
    every code. (The reference skips this padding when (L − 104) mod 320 = 0 and so drops the
    last 52 codes; here that case is padded like any other.)
    """
    length = max(num_codes, WINDOW)
    length = math.ceil((length - OVERLAP) / HOP) * HOP + OVERLAP
    return length, list(range(0, length - HOP + 1, HOP))


def extend_codes(codes: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat codes [Q, T] periodically (tile) and cut to `length` frames."""
    reps = math.ceil(length / codes.shape[1])
    return codes.repeat(1, reps)[:, :length]


def num_output_samples(num_codes: int, sample_rate: int) -> int:
    """T codes' worth of audio, T · sample_rate / 12.5, in exact integer arithmetic.

    The reference's float product int(T / 12.5 · sample_rate) loses a sample for some T
    (e.g. 29); at 48 kHz this is exactly T · 3840.
    """
    return num_codes * sample_rate * 2 // 25


class LatentChain:
    """The flow-matching half of windowed decoding: window after window, the noise draw and the
    in-context prefix taken from the previous window's latents.

    Noise contract: exactly one CPU `torch.randn((1, 744, C), generator=generator)` per window,
    in window order, then moved to the model's device; nothing else draws from the generator.
    """

    def __init__(self, flow: FlowMatching, params: CodecParams, generator: torch.Generator) -> None:
        self.flow, self.params, self.generator = flow, params, generator
        self.previous: torch.Tensor | None = None  # the last window's latents

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """One window's valid codes [Q, 372] → its final latents [1, 744, C] float32 (before
        the decoder's rounding), on the model's device."""
        flow = self.flow
        device = flow.cond_feature_emb.weight.device
        mu = flow.condition(codes[None].to(device))
        frames, prefix = LATENTS_PER_CODE * WINDOW, LATENTS_PER_CODE * OVERLAP
        noise = torch.randn(
            (1, frames, flow.latent_channels), generator=self.generator, dtype=torch.float32
        )
        noise = noise.to(device)
        ic, n_ic = torch.zeros_like(noise), 0  # window 0 has no in-context prefix
        if self.previous is not None:
            ic[:, :prefix], n_ic = self.previous[:, -prefix:], prefix
        p = self.params
        self.previous = flow.sample(
            mu, noise, ic, n_ic, num_steps=p.num_steps, guidance_scale=p.guidance_scale
        )
        return self.previous


def window_latents(
    flow: FlowMatching, codes: torch.Tensor, params: CodecParams, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Each window's final latents [1, 744, C] float32 (before the decoder's rounding), in order.

    `codes` [Q, T] must hold valid ids (see sanitize_codes); noise as `LatentChain` draws it.
    """
    length, starts = plan_windows(codes.shape[1])
    codes = extend_codes(codes, length)
    chain = LatentChain(flow, params, generator)
    for start in starts:
        yield chain(codes[:, start : start + WINDOW])


def decode_window(
    scalar: ScalarModel, latents: torch.Tensor, streams: int, chunk: int = DECODE_CHUNK
) -> torch.Tensor:
    """Latents [1, F, streams·c] → float32 [streams, samples]; stream s gets dims [s·c, (s+1)·c).
    The decoder runs `chunk` latent frames at a time (see ScalarModel.decode_chunked)."""
    x = latents[0].transpose(0, 1).reshape(streams, -1, latents.shape[1])
    return scalar.decode_chunked(x, chunk)


class WindowDecoder:
    """Codes in, audio out, window by window: the one implementation of SPEC §5.1–5.7 that
    `detokenize` (all codes at once) and streaming (codes as the LM makes them) both drive.

    `push` takes the next codes and decodes every window that lies entirely inside codes whose
    final value is known: such a window is in the final plan whatever the song's length. A stray
    id with no valid id before it in its codebook takes the first valid one after it, so nothing
    is decoded while a codebook holds only strays. `finish` plans the tail windows (codes padded
    by tiling) and decodes them. Both return the audio that became final as float32
    [streams, n] pieces on the model's device (nothing waits for the device, so a stream can
    copy them back while the LM runs): everything up to the next window's crossfade, and at the
    end the rest, trimmed to T codes' worth. The pieces concatenate to exactly what `detokenize`
    returns.
    """

    def __init__(
        self,
        flow: FlowMatching,
        scalar: ScalarModel,
        config: CodecConfig,
        params: CodecParams,
        *,
        generator: torch.Generator | None = None,
        on_window: Callable[[int], None] | None = None,
        chunk: int = DECODE_CHUNK,
    ) -> None:
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh, non-deterministic; the global RNG is left alone
        self.scalar, self.config, self.on_window, self.chunk = scalar, config, on_window, chunk
        self.chain = LatentChain(flow, params, generator)
        self.streams = config.out_channels // config.latent_hidden_dim
        samples_per_code = LATENTS_PER_CODE * scalar.samples_per_frame
        self.window_len, self.hop, self.overlap = (
            n * samples_per_code for n in (WINDOW, HOP, OVERLAP)
        )
        device = flow.cond_feature_emb.weight.device
        self.ramp = torch.linspace(0, 1, self.overlap, device=device)
        self.codes = torch.zeros(config.num_quantizers, 0, dtype=torch.long)  # as received
        self.windows = 0  # windows decoded so far
        self.tail: torch.Tensor | None = None  # the last window's overlap, not yet crossfaded
        self.left: int | None = None  # samples still to emit, once the length is known

    def push(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Add codes [Q, n] (stray ids allowed); decode the windows that became certain."""
        cfg = self.config
        codes = check_codes(codes, cfg.codebook_size, cfg.num_quantizers)
        self.codes = torch.cat([self.codes, codes.cpu()], dim=1)
        if self._next_end() > self.codes.shape[1]:
            return []
        if not bool((self.codes < cfg.codebook_size).any(dim=1).all()):
            return []  # a codebook with only stray ids so far: their replacement is unknown
        fixed, _ = sanitize_codes(self.codes, cfg.codebook_size, cfg.num_quantizers)
        pieces = []
        while self._next_end() <= fixed.shape[1]:
            pieces += self._decode(fixed[:, self._next_end() - WINDOW : self._next_end()])
        return pieces

    def finish(self) -> list[torch.Tensor]:
        """No more codes: decode the remaining windows and return the rest of the audio."""
        cfg = self.config
        fixed, n_stray = sanitize_codes(self.codes, cfg.codebook_size, cfg.num_quantizers)
        if n_stray:
            log.debug(  # the CLI says it once per song (cli.note_stray_ids)
                "replaced %d codec ids ≥ %d by a neighbouring frame's", n_stray, cfg.codebook_size
            )
        num_codes = fixed.shape[1]
        length, starts = plan_windows(num_codes)
        fixed = extend_codes(fixed, length)
        self.left = num_output_samples(num_codes, cfg.sample_rate) - self.windows * self.hop
        pieces = []
        for start in starts[self.windows :]:
            pieces += self._decode(fixed[:, start : start + WINDOW])
        return pieces + self._emit(self.tail)

    def _next_end(self) -> int:
        """One past the last code of the next window."""
        return self.windows * HOP + WINDOW

    def _decode(self, codes: torch.Tensor) -> list[torch.Tensor]:
        latents = self.chain(codes)
        wav = decode_window(self.scalar, latents, self.streams, self.chunk)
        wav = wav[:, : self.window_len]
        if self.tail is not None:  # linear crossfade over the overlap: old × (1 − r) + new × r
            old, new = self.tail, wav[:, : self.overlap]
            wav[:, : self.overlap] = old * (1 - self.ramp) + new * self.ramp
        self.windows += 1
        self.tail = wav[:, self.hop :]
        if self.on_window is not None:
            self.on_window(self.windows)
        return self._emit(wav[:, : self.hop])

    def _emit(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """The piece to hand out: cut at the song's end once that is known, never empty."""
        if self.left is not None:
            wav = wav[:, : max(self.left, 0)]
            self.left -= wav.shape[1]
        return [wav] if wav.shape[1] else []
