"""Fused twins of the LM's elementwise layers: one Triton launch where eager PyTorch launches
one kernel per op (RMSNorm ≈ 8, RoPE ≈ 9 per q or k, SiLU·mul 2).

Each computes what its plain function computes, in the same precision steps:

- `fused_rms_norm` = `layers.rms_norm`: float32 statistics, the normalised row cast to x's
  dtype, then × weight (in float32, rounded once, as PyTorch's mul). One program per row.
- `fused_rope` = `layers.apply_rope` on q and on k in one launch: interleaved pairs rotated in
  float32, the result in the input's dtype. One program per (position, batch row), its q and
  k heads as one tile.
- `fused_silu_mul` = `silu(gate) · up`: the SiLU rounded to the dtype before the product, as
  the two eager ops round. One program per 1024 elements of a row: gate and up may be the two
  halves of one merged w1/w3 matmul's output (rows strided, read in place, no copy).
- `fused_add_rms_norm` = `RMSNorm.add_norm`: the residual add rounded to the dtype as `+`
  rounds it, then `rms_norm` of that sum; returns both. One program per row.
- `fused_rope_cache` = `Rope.to_cache`: `fused_rope` on q and k, with k (rotated) and v
  written into the layer's KV cache at their positions in the same launch (each row's
  device-held position, or start.. for every row); q, k and v may be strided views of one merged
  q/k/v matmul's output. One program per (position, batch row).

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
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, n_cols, stride_gate, stride_up, BLOCK: tl.constexpr
):
    # gate, up [rows, n_cols] with row strides (columns contiguous), out contiguous; grid
    # (rows, column blocks).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=valid, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=valid, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * dim + cols, mask=valid, other=0.0).to(tl.float32)
    s = (x + d).to(sum_ptr.dtype.element_ty)  # the residual stream, rounded as `+` rounds it
    tl.store(sum_ptr + row * dim + cols, s, mask=valid)
    s = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(s * s, axis=0) / dim + eps)
    y = (s * inv_rms).to(sum_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (y * w).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["start"])
def _rope_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_qb,
    stride_qt,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_cb,
    stride_ch,
    stride_cn,
    start,
    n_q_heads,
    n_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr,
):
    # q [B, T, H, D], k and v [B, T, H_kv, D], heads and D contiguous, B and T strided; grid
    # (T, B). HAS_POS: T is 1, row b goes to position pos[b] and its cos/sin are row b of
    # [B, D/2]; else every row's position t goes to start + t, cos/sin row t of [T, D/2].
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if HAS_POS:
        dest = tl.load(pos_ptr + b)
        angle_row = b
    else:
        dest = start + t
        angle_row = t
    head = tl.arange(0, BLOCK_HEADS)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    is_q = head < n_q_heads
    valid = (head < n_q_heads + n_kv_heads) & (i < HEAD_DIM // 2)
    # q's heads then k's, as one tile of interleaved pairs.
    q_src = q_ptr + b * stride_qb + t * stride_qt + head * HEAD_DIM + 2 * i
    k_src = k_ptr + b * stride_kb + t * stride_kt + (head - n_q_heads) * HEAD_DIM + 2 * i
    q_dst = q_out_ptr + ((b * tl.num_programs(0) + t) * n_q_heads + head) * HEAD_DIM + 2 * i
    k_dst = k_cache_ptr + b * stride_cb + (head - n_q_heads) * stride_ch + dest * stride_cn + 2 * i
    src = tl.where(is_q, q_src, k_src)
    dst = tl.where(is_q, q_dst, k_dst)
    cos = tl.load(cos_ptr + angle_row * (HEAD_DIM // 2) + i, mask=i < HEAD_DIM // 2, other=0.0)
    sin = tl.load(sin_ptr + angle_row * (HEAD_DIM // 2) + i, mask=i < HEAD_DIM // 2, other=0.0)
    x0 = tl.load(src, mask=valid, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=valid, other=0.0).to(tl.float32)
    tl.store(dst, (x0 * cos - x1 * sin).to(q_out_ptr.dtype.element_ty), mask=valid)
    tl.store(dst + 1, (x1 * cos + x0 * sin).to(q_out_ptr.dtype.element_ty), mask=valid)
    # v as it is, into the cache.
    kv_head = tl.arange(0, BLOCK_KV)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    v_valid = (kv_head < n_kv_heads) & (d < HEAD_DIM)
    v = tl.load(
        v_ptr + b * stride_vb + t * stride_vt + kv_head * HEAD_DIM + d, mask=v_valid, other=0.0
    )
    v_dst = v_cache_ptr + b * stride_cb + kv_head * stride_ch + dest * stride_cn + d
    tl.store(v_dst, v, mask=v_valid)


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


def silu_mul_launch(gate, up, out, stride_gate: int, stride_up: int) -> Launch:
    """gate, up, out [..., n_cols] of one shape: out contiguous, gate and up rows `stride_*`
    apart (columns contiguous)."""
    n_cols = gate.shape[-1]
    grid = (math.prod(gate.shape[:-1]), triton.cdiv(n_cols, SILU_MUL_BLOCK))
    args = (gate, up, out, n_cols, stride_gate, stride_up)
    return grid, args, {"BLOCK": SILU_MUL_BLOCK, "num_warps": 4}


def add_rms_norm_launch(x, delta, weight, s, out, eps: float) -> Launch:
    """x, delta, s (their sum), out [..., dim] contiguous and weight [dim]."""
    dim = x.shape[-1]
    block = triton.next_power_of_2(dim)
    grid = (math.prod(x.shape[:-1]),)
    return (
        grid,
        (x, delta, weight, s, out, dim, eps),
        {"BLOCK": block, "num_warps": 8 if block >= 4096 else 4},
    )


def rope_cache_launch(
    q, k, v, cos, sin, pos, q_out, k_cache, v_cache, strides: tuple[int, ...], start: int
) -> Launch:
    """q [B, T, H, D], k, v [B, T, H_kv, D] (heads and D contiguous; `strides` their B and T
    strides, q's, k's then v's, and the cache's B, head and position strides); cos, sin
    float32 [B or T, D/2]; pos int64 [B] or None (then positions start..); q_out contiguous;
    k_cache, v_cache [B, H_kv, L, D] (D contiguous, of one layout)."""
    b, t, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    block_heads = triton.next_power_of_2(n_q_heads + n_kv_heads)
    kwargs = {
        "HEAD_DIM": head_dim,
        "BLOCK_HEADS": block_heads,
        "BLOCK_HALF": triton.next_power_of_2(head_dim // 2),
        "BLOCK_KV": triton.next_power_of_2(n_kv_heads),
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "HAS_POS": pos is not None,
        "num_warps": 4 if block_heads * head_dim >= 2048 else 1,
    }
    args = (q, k, v, cos, sin, pos, q_out, k_cache, v_cache, *strides, start)
    return (t, b), (*args, n_q_heads, n_kv_heads), kwargs


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


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """x [..., n] as rows read in place where its layout allows (columns contiguous, one
    stride between rows: a slice of a wider contiguous output), else a contiguous copy; and
    that row stride."""
    if x.dim() >= 1 and x.stride(-1) == 1:
        try:
            rows = x.view(-1, x.shape[-1])
        except RuntimeError:
            pass
        else:
            return x, rows.stride(0) if rows.shape[0] > 1 else x.shape[-1]
    return x.contiguous(), x.shape[-1]


@torch.library.custom_op("heartmula_rt::fused_silu_mul", mutates_args=())
def fused_silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """`silu(gate) · up` (one shape, one dtype) in one launch; gate and up may be strided row
    slices (the halves of a merged w1/w3 output), read in place."""
    (gate, stride_gate), (up, stride_up) = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grid, args, kwargs = silu_mul_launch(gate, up, out, stride_gate, stride_up)
    _silu_mul_kernel[grid](*args, **kwargs)
    return out


@fused_silu_mul.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("heartmula_rt::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: Tensor, delta: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """`RMSNorm.add_norm`: (s, layers.rms_norm(s, weight, eps)) for s = x + delta (one shape,
    one dtype) in one launch."""
    x, delta, weight = x.contiguous(), delta.contiguous(), weight.contiguous()
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    grid, args, kwargs = add_rms_norm_launch(x, delta, weight, s, out, eps)
    _add_rms_norm_kernel[grid](*args, **kwargs)
    return s, out


@fused_add_rms_norm.register_fake
def _(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=dtype)


def heads_view(x: Tensor) -> Tensor:
    """x [B, T, H, D] with heads and D contiguous (a view of a projection's output), else a
    contiguous copy."""
    h, d = x.shape[2], x.shape[3]
    return x if x.stride(3) == 1 and (h == 1 or x.stride(2) == d) else x.contiguous()


@torch.library.custom_op("heartmula_rt::fused_rope_cache", mutates_args=("k_cache", "v_cache"))
def fused_rope_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor | None,
    start: int,
) -> Tensor:
    """`Rope.to_cache`'s work in one launch: q [B, T, H, D] and k [B, T, H_kv, D] rotated
    (float32 cos/sin [T, D/2], or [B, D/2] with `pos`), k and v [B, T, H_kv, D] written into
    k_cache, v_cache [B, H_kv, L, D] at each row's position pos[b] (int64 [B] on the device,
    T = 1) or, without `pos`, at start..start+T-1; returns the rotated q, contiguous."""
    q, k, v = heads_view(q), heads_view(k), heads_view(v)
    cos, sin = cos.contiguous(), sin.contiguous()
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("the KV cache's keys and values need one layout, D contiguous")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    strides = (
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
        *k_cache.stride()[:3],
    )
    grid, args, kwargs = rope_cache_launch(
        q, k, v, cos, sin, pos, q_out, k_cache, v_cache, strides, start
    )
    _rope_cache_kernel[grid](*args, **kwargs)
    return q_out


@fused_rope_cache.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor | None,
    start: int,
) -> Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


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
                    _, args, kwargs = silu_mul_launch(h, h, h, 2 * hidden, 2 * hidden)
                    launches.append((f"silu_mul {where}", _silu_mul_kernel, args, kwargs))
                    _, args, kwargs = add_rms_norm_launch(x, x, mock(f.embed_dim), x, x, 1e-5)
                    launches.append((f"add_rms_norm {where}", _add_rms_norm_kernel, args, kwargs))
                    # q, k, v: views of the merged q/k/v matmul's output; the cache [B, H_kv,
                    # L, D]; the backbone's decode steps at device-held positions, the
                    # decoder's (and prefill's) at start.. (no `pos`).
                    width = (f.num_heads + 2 * f.num_kv_heads) * d
                    kv_cache = mock(b, f.num_kv_heads, 1024, d)
                    pos = mock(b, dtype=torch.int64) if part == "backbone" else None
                    strides = (t * width, width) * 3 + (f.num_kv_heads * 1024 * d, 1024 * d, d)
                    _, args, kwargs = rope_cache_launch(
                        q, k, k, table, table, pos, q, kv_cache, kv_cache, strides, 0
                    )
                    launches.append((f"rope_cache {where}", _rope_cache_kernel, args, kwargs))
            # prefill: the backbone over a prompt, every row from `start` (no `pos`)
            if part == "backbone":
                for dtype in (torch.bfloat16, torch.float16, f32):
                    where = f"{preset} backbone prefill {str(dtype).removeprefix('torch.')}"
                    q = MockTensor(dtype, [2, 64, f.num_heads, d])
                    k = MockTensor(dtype, [2, 64, f.num_kv_heads, d])
                    table = MockTensor(f32, [64, d // 2])
                    width = (f.num_heads + 2 * f.num_kv_heads) * d
                    kv_cache = MockTensor(dtype, [2, f.num_kv_heads, 1024, d])
                    strides = (64 * width, width) * 3 + (f.num_kv_heads * 1024 * d, 1024 * d, d)
                    _, args, kwargs = rope_cache_launch(
                        q, k, k, table, table, None, q, kv_cache, kv_cache, strides, 0
                    )
                    launches.append((f"rope_cache {where}", _rope_cache_kernel, args, kwargs))
    return launches
