"""Codes [8, T] → stereo waveform (SPEC §5.1–5.4, §5.7): input guard, windows, in-context
chaining of the flow-matching latents, scalar decoding and crossfade stitching.

Windows are 372 codes (744 latent frames) with a hop of 320; each window after the first takes
the previous window's last 104 latent frames as its in-context prefix. The reference's tail-drop
quirk is fixed: the codes are always padded to a whole number of hops plus the overlap, so every
code is decoded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch

from ..config import CodecConfig
from ..errors import UserError
from .dit import FlowMatching
from .scalar import ScalarModel

log = logging.getLogger(__name__)

WINDOW = 372  # codes per window (29.76 s)
HOP = 320  # codes between window starts
OVERLAP = WINDOW - HOP  # 52 codes shared by neighbouring windows
LATENTS_PER_CODE = 2  # 12.5 Hz codes → 25 Hz latents


def sanitize_codes(
    codes: torch.Tensor, codebook_size: int, num_quantizers: int = 8
) -> tuple[torch.Tensor, int]:
    """Validate codes [num_quantizers, T] and replace stray ids ≥ codebook_size.

    The LM can emit ids in [codebook_size, audio_eos_id) that index past the codebook. Each is
    replaced by the same codebook's id from the nearest earlier valid frame, else the nearest
    later one, else 0. Returns (int64 codes, number of ids replaced); the input is not modified.
    """
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


def window_latents(
    flow: FlowMatching,
    codes: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """Each window's final latents [1, 744, C] float32 (before the decoder's rounding), in order.

    `codes` [Q, T] must hold valid ids (see sanitize_codes). Noise contract: exactly one CPU
    `torch.randn((1, 744, C), generator=generator)` per window, in window order, then moved to
    the model's device; nothing else draws from the generator.
    """
    param = flow.cond_feature_emb.weight
    length, starts = plan_windows(codes.shape[1])
    codes = extend_codes(codes, length).to(param.device)
    frames = LATENTS_PER_CODE * WINDOW
    prefix = LATENTS_PER_CODE * OVERLAP
    previous = None
    for start in starts:
        mu = flow.condition(codes[None, :, start : start + WINDOW])
        noise = torch.randn(
            (1, frames, flow.latent_channels), generator=generator, dtype=torch.float32
        )
        noise = noise.to(param.device)
        ic, n_ic = torch.zeros_like(noise), 0  # window 0 has no in-context prefix
        if previous is not None:
            ic[:, :prefix], n_ic = previous[:, -prefix:], prefix
        previous = flow.sample(
            mu, noise, ic, n_ic, num_steps=num_steps, guidance_scale=guidance_scale
        )
        yield previous


def decode_window(scalar: ScalarModel, latents: torch.Tensor, streams: int) -> torch.Tensor:
    """Latents [1, F, streams·c] → float32 [streams, samples]; stream s gets dims [s·c, (s+1)·c)."""
    x = latents[0].transpose(0, 1).reshape(streams, -1, latents.shape[1])
    return scalar(x)


def detokenize(
    flow: FlowMatching,
    scalar: ScalarModel,
    config: CodecConfig,
    codes: torch.Tensor,
    *,
    num_steps: int = 10,
    guidance_scale: float = 1.25,
    generator: torch.Generator | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """codes [8, T] → float32 waveform [2, int(T/12.5·sr)] on the CPU.

    Stray ids are replaced (see sanitize_codes) with a logged warning. Windows are decoded one
    at a time and crossfaded into the output as they finish; `on_window(done, total)` is called
    after each.
    """
    codes, n_stray = sanitize_codes(codes, config.codebook_size, config.num_quantizers)
    if n_stray:
        log.warning(
            "replaced %d codec ids ≥ %d by a neighbouring frame's", n_stray, config.codebook_size
        )
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # fresh, non-deterministic; the global RNG is left alone
    num_codes = codes.shape[1]
    streams = config.out_channels // config.latent_hidden_dim
    samples_per_code = LATENTS_PER_CODE * math.prod(config.upsample_factors) * config.num_samples
    window_len, hop, overlap = (n * samples_per_code for n in (WINDOW, HOP, OVERLAP))
    _, starts = plan_windows(num_codes)
    out = torch.zeros(streams, window_len + (len(starts) - 1) * hop)
    ramp = torch.linspace(0, 1, overlap)
    latents = window_latents(
        flow, codes, num_steps=num_steps, guidance_scale=guidance_scale, generator=generator
    )
    for i, lat in enumerate(latents):
        wav = decode_window(scalar, lat, streams)[:, :window_len].cpu()
        at = i * hop
        if i > 0:  # linear crossfade over the overlap: old × (1 − r) + new × r
            old = out[:, at : at + overlap]
            out[:, at : at + overlap] = old * (1 - ramp) + wav[:, :overlap] * ramp
            wav, at = wav[:, overlap:], at + overlap
        out[:, at : at + wav.shape[1]] = wav
        if on_window is not None:
            on_window(i + 1, len(starts))
    return out[:, : num_output_samples(num_codes, config.sample_rate)]
