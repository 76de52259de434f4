"""Fused twins of the LM's elementwise layers: one Triton launch where eager PyTorch launches
one kernel per op (RMSNorm ≈ 8, RoPE ≈ 9 per q or k, SiLU·mul 2).

Each computes what its plain function computes, in the same precision steps:

- `fused_rms_norm` = `layers.rms_norm`: float32 statistics, the normalised row cast to x's
  dtype, then × weight (in float32, rounded once, as PyTorch's mul). One program per row.
- `fused_rope` = `layers.apply_rope` on q and on k in one launch: interleaved pairs rotated in
  float32, the result in the input's dtype. One program per (position, batch row), its q and
  k heads as one tile.
- `fused_silu_mul` = `silu(gate) · up`: the SiLU rounded to the dtype before the product, as
  the two eager ops round. One program per 1024 elements.

The module swaps that use them are `heartmula_rt.model.fused`. Every launch goes through a
`*_launch` function that turns tensor-likes (real tensors, or `triton.runtime.jit.MockTensor`)
into (grid, args, kwargs); `aot_launches` lists the same calls for every shape the engines use,
so what is compiled ahead of time is what runs. The launch functions read only shapes and
dtypes: the tensors they get are contiguous (the ops make them so). Tests run the kernels on
the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from heartmula_rt.config import LM_PRESETS, LMConfig

Launch = tuple[tuple[int, ...], tuple, dict]  # (grid, args, kwargs) of one kernel launch
SILU_MUL_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=valid, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    y = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (y * w).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    n_q_heads,
    n_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # q [B, T, H, D], k [B, T, H_kv, D], cos/sin [T, D/2], all contiguous; grid (T, B): one
    # program per (position, batch row), its q heads then its k heads as one
    # [BLOCK_HEADS, BLOCK_HALF] tile of interleaved pairs.
    pos = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + pos
    head = tl.arange(0, BLOCK_HEADS)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    is_q = head < n_q_heads
    valid = (head < n_q_heads + n_kv_heads) & (i < HEAD_DIM // 2)
    q_even = (row * n_q_heads + head) * HEAD_DIM + 2 * i
    k_even = (row * n_kv_heads + head - n_q_heads) * HEAD_DIM + 2 * i
    src = tl.where(is_q, q_ptr + q_even, k_ptr + k_even)
    dst = tl.where(is_q, q_out_ptr + q_even, k_out_ptr + k_even)
    cos = tl.load(cos_ptr + pos * (HEAD_DIM // 2) + i, mask=i < HEAD_DIM // 2, other=0.0)
    sin = tl.load(sin_ptr + pos * (HEAD_DIM // 2) + i, mask=i < HEAD_DIM // 2, other=0.0)
    x0 = tl.load(src, mask=valid, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=valid, other=0.0).to(tl.float32)
    tl.store(dst, (x0 * cos - x1 * sin).to(q_out_ptr.dtype.element_ty), mask=valid)
    tl.store(dst + 1, (x1 * cos + x0 * sin).to(q_out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    g = tl.load(gate_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, (silu * u).to(out_ptr.dtype.element_ty), mask=valid)


def rms_norm_launch(x, weight, out, eps: float) -> Launch:
    """x, out [..., dim] and weight [dim]."""
    dim = x.shape[-1]
    block = triton.next_power_of_2(dim)
    grid = (math.prod(x.shape[:-1]),)
    return (
        grid,
        (x, weight, out, dim, eps),
        {"BLOCK": block, "num_warps": 8 if block >= 4096 else 4},
    )


def rope_launch(q, k, cos, sin, q_out, k_out) -> Launch:
    """q, q_out [B, T, H, D]; k, k_out [B, T, H_kv, D]; cos, sin float32 [T, D/2]."""
    b, t, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    block_heads = triton.next_power_of_2(n_q_heads + n_kv_heads)
    kwargs = {
        "HEAD_DIM": head_dim,
        "BLOCK_HEADS": block_heads,
        "BLOCK_HALF": triton.next_power_of_2(head_dim // 2),
        "num_warps": 4 if block_heads * head_dim >= 2048 else 1,
    }
    return (t, b), (q, k, cos, sin, q_out, k_out, n_q_heads, n_kv_heads), kwargs


def silu_mul_launch(gate, up, out) -> Launch:
    """gate, up, out of one shape."""
    n = math.prod(gate.shape)
    grid = (triton.cdiv(n, SILU_MUL_BLOCK),)
    return grid, (gate, up, out, n), {"BLOCK": SILU_MUL_BLOCK, "num_warps": 4}


@torch.library.custom_op("heartmula_rt::fused_rms_norm", mutates_args=())
def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`layers.rms_norm(x, weight, eps)` in one launch."""
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    grid, args, kwargs = rms_norm_launch(x, weight, out, eps)
    _rms_norm_kernel[grid](*args, **kwargs)
    return out


@fused_rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("heartmula_rt::fused_rope", mutates_args=())
def fused_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`lm.Rope()(q, k, cos, sin)` (q [B, T, H, D] and k [B, T, H_kv, D] of one dtype, float32
    cos/sin [T, D/2]) in one launch; the results are contiguous."""
    q, k, cos, sin = q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous()
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    grid, args, kwargs = rope_launch(q, k, cos, sin, q_out, k_out)
    _rope_kernel[grid](*args, **kwargs)
    return q_out, k_out


@fused_rope.register_fake
def _(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("heartmula_rt::fused_silu_mul", mutates_args=())
def fused_silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """`silu(gate) · up` (one shape, one dtype) in one launch."""
    gate, up = gate.contiguous(), up.contiguous()
    out = gate.new_empty(gate.shape)
    grid, args, kwargs = silu_mul_launch(gate, up, out)
    _silu_mul_kernel[grid](*args, **kwargs)
    return out


@fused_silu_mul.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape)


def aot_launches() -> list[tuple[str, object, tuple, dict]]:
    """(description, kernel, args, kwargs) of every launch the engines make: the 3B and the tiny
    fixture's LM (`config.LM_PRESETS`), backbone and decoder, each LM dtype, one or two
    batch rows (CFG) of one new position, or two (the decoder's first step)."""
    from triton.runtime.jit import MockTensor

    f32 = torch.float32
    launches = []
    for preset in ("3B", "tiny"):
        config = LMConfig.from_dict(LM_PRESETS[preset])
        for part, f in (("backbone", config.backbone), ("decoder", config.decoder)):
            d, hidden = f.head_dim, f.intermediate_dim
            for dtype in (torch.bfloat16, torch.float16, f32):
                for b, t in ((1, 1), (2, 1), (1, 2), (2, 2)):
                    if part == "backbone" and t > 1:
                        continue  # backbone decode steps take one position
                    where = f"{preset} {part} {str(dtype).removeprefix('torch.')} [{b}, {t}]"

                    def mock(*shape: int, dtype: torch.dtype = dtype) -> MockTensor:
                        return MockTensor(dtype, list(shape))

                    x = mock(b, t, f.embed_dim)
                    _, args, kwargs = rms_norm_launch(x, mock(f.embed_dim), x, f.norm_eps)
                    launches.append((f"rms_norm {where}", _rms_norm_kernel, args, kwargs))
                    q, k = mock(b, t, f.num_heads, d), mock(b, t, f.num_kv_heads, d)
                    table = mock(t, d // 2, dtype=f32)
                    _, args, kwargs = rope_launch(q, k, table, table, q, k)
                    launches.append((f"rope {where}", _rope_kernel, args, kwargs))
                    h = mock(b, t, hidden)
                    _, args, kwargs = silu_mul_launch(h, h, h)
                    launches.append((f"silu_mul {where}", _silu_mul_kernel, args, kwargs))
    return launches
