"""Fused twins of the LM's RMSNorm (with the residual add before it), RoPE (with the KV-cache
write after it) and SiLU·mul, as module swaps.

Each twin computes its plain module's function with one launch of a Triton kernel
(`kernels.fused_layers`, torch custom ops) instead of one per eager op; `use_fused_layers(model)`
swaps them in, and is called where an LM lands on a GPU (`load_pipeline`, `bench`,
`planner.Placement.place_lm`). They serve the `plain` and `graph` engines; under torch.compile (the
`compile` engine) each twin runs its plain forward instead: a custom op is opaque to inductor,
which fuses the plain ops itself and, unlike the twins, with their neighbours (the residual
add before a norm, the casts around a matmul).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn

from heartmula_rt.model import lm
from heartmula_rt.model.lm import AttentionMask, KVCache, RMSNorm, Rope, SiluMul


def _register_kernels() -> None:
    """Registers torch.ops.heartmula_rt.fused_* and rope_attention. Called when a twin is built,
    not when this file is imported: the kernels need triton, which CPU builds of torch lack."""
    from heartmula_rt.kernels import decode_attention, fused_layers  # noqa: F401


class FusedRMSNorm(RMSNorm):
    """`RMSNorm` in one launch; the same `scale` parameter."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        _register_kernels()

    @classmethod
    def from_plain(cls, ref: RMSNorm) -> FusedRMSNorm:
        module = cls(ref.scale.shape[0], ref.eps)
        module.scale = ref.scale
        return module

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return super().forward(x)
        return torch.ops.heartmula_rt.fused_rms_norm(x, self.scale, self.eps)

    def add_norm(self, residual: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """`RMSNorm.add_norm` in one launch: the residual add and the norm of its sum."""
        if torch.compiler.is_compiling() or residual.shape != delta.shape:
            return super().add_norm(residual, delta)
        return torch.ops.heartmula_rt.fused_add_rms_norm(residual, delta, self.scale, self.eps)


class FusedRope(Rope):
    """`Rope` on q and k in one launch."""

    def __init__(self) -> None:
        super().__init__()
        _register_kernels()

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return super().forward(q, k, cos, sin)
        return torch.ops.heartmula_rt.fused_rope(q, k, cos, sin)

    def to_cache(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        start: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache,
        kv_len: int | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`Rope.to_cache` in one launch: q and k rotated, k and v written into the cache."""
        positional = isinstance(start, Tensor)
        if torch.compiler.is_compiling() or (positional and start.dim() != 1):
            return super().to_cache(q, k, v, start, cos, sin, cache, kv_len)
        b, t = q.shape[:2]
        end = kv_len if positional else start + t
        if end > cache.k.shape[2]:  # the plain path's refusal, in its words
            return super().to_cache(q, k, v, start, cos, sin, cache, kv_len)
        q = torch.ops.heartmula_rt.fused_rope_cache(
            q,
            k,
            v,
            cos,
            sin,
            cache.k,
            cache.v,
            start if positional else None,
            0 if positional else start,
        )
        return q, cache.k[:, :, :end], cache.v[:, :, :end]


    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        start: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache,
        kv_len: int | None,
        mask: AttentionMask | None,
    ) -> Tensor:
        """`Rope.attend` of a decode step in one launch (two past one chunk of keys: the split
        kernel's combination): RoPE, the cache write and the attention (`rope_attention`),
        where the split-key kernel runs; other steps (prefill) as the plain path."""
        from heartmula_rt.kernels.decode_attention import CHUNK, MAX_NEW, rope_attention_fits

        t = q.shape[1]
        positional = isinstance(start, Tensor)
        end = kv_len if positional else start + t
        if (
            torch.compiler.is_compiling()
            or q.device.type not in lm.SPLIT_DECODE_DEVICES  # (tests add the CPU's interpreter)
            or end > cache.k.shape[2]  # the plain path's refusal, in its words
            or t > (1 if positional or end > CHUNK else MAX_NEW)
            or (positional and start.dim() != 1)
            or not rope_attention_fits(q.dtype, q.shape[3])
        ):
            return super().attend(q, k, v, start, cos, sin, cache, kv_len, mask)
        return torch.ops.heartmula_rt.rope_attention(
            q,
            k,
            v,
            cos,
            sin,
            cache.k,
            cache.v,
            start if positional else None,
            0 if positional else start,
            end,
        )


class FusedSiluMul(SiluMul):
    """`SiluMul` in one launch."""

    def __init__(self) -> None:
        super().__init__()
        _register_kernels()

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return super().forward(gate, up)
        return torch.ops.heartmula_rt.fused_silu_mul(gate, up)


def fused_twin(module: nn.Module) -> nn.Module:
    """`module`'s fused twin, or `module` itself if it has none."""
    if type(module) is RMSNorm:
        return FusedRMSNorm.from_plain(module)
    if type(module) is Rope:
        return FusedRope()
    if type(module) is SiluMul:
        return FusedSiluMul()
    return module


def use_fused_layers(model: nn.Module) -> dict[str, int]:
    """Swap every RMSNorm, Rope and SiluMul of `model` for its fused twin (on any device: the
    twins run wherever their kernels do, the CPU through Triton's interpreter); returns how many
    modules were swapped, by twin type. Apply it before `offload.OffloadedLayers` wraps layers:
    streamed layers are not submodules."""
    swapped: Counter[str] = Counter()
    for name, module in list(model.named_modules()):
        twin = fused_twin(module)
        if twin is not module:
            model.set_submodule(name, twin)
            swapped[type(twin).__name__] += 1
    return dict(swapped)
