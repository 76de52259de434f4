"""The plain sampler (SPEC §4): top-k with temperature, and classifier-free guidance mixing."""

from __future__ import annotations

import torch
from torch import Tensor


def cfg_mix(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Guided logits `uncond + (cond - uncond) * scale`, in float32."""
    uncond = uncond.float()
    return uncond + (cond.float() - uncond) * scale


def sample_topk(
    logits: Tensor, topk: int, temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """One token per row from logits [B, V]: [B, 1] int64 on the logits' device.

    Entries strictly below the k-th largest are dropped (ties at the k-th survive); the draw is
    categorical over the softmax of the rest, as `argmax(p / E)` with E ~ Exp(1), which needs no
    host sync. `generator`, if given, must live on the logits' device. topk=1 is plain argmax.
    """
    if topk == 1:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits.float() / temperature
    kth = torch.topk(scaled, min(topk, scaled.shape[-1]), dim=-1).values[..., -1:]
    probs = torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, frame: int, codebook: int) -> int:
    """The seed of one draw: a song's `seed`, the `frame` it samples (0: the prompt's) and the
    `codebook`, mixed (splitmix64) into 64 bits whose low 32 differ too (the CPU generator
    seeds from those). A song's draws depend on nothing else, not on what shares its batch."""
    x = (seed * 0x9E3779B97F4A7C15 + frame * 0xD1B54A32D192ED03 + codebook + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
