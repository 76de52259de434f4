"""Decode attention split over keys: one new query token per row over that row's KV cache, each
row reading its keys only up to its own position.

The static engine keeps every row's position on the device and reads a static number of cached
positions (`kv_len`: the bucket's end, or for a batch of songs the whole capacity) so that one
CUDA graph serves many steps; SDPA then reads all `kv_len` positions of every row and masks
those past the row's position. Here the keys are cut into fixed chunks of `CHUNK` absolute
positions, one program per (chunk, row, kv head):

1. `_chunk_kernel`: a chunk that starts past the row's position exits before reading anything;
   the others run the online softmax over their keys up to the position (tiles of `BLOCK_N`)
   and write the chunk's partial result: running max and sum of exp per query head, and the
   un-normalised output.
2. `_combine_kernel`, one program per (row, query head): merges the row's chunks 0 .. position
   // CHUNK in that order.

A row's result is thus a function of its query, its keys and values up to its position, and the
position: not of `kv_len`, the cache's capacity, or the other rows, which holds bit for bit
(every block size is fixed, not tuned). So the grid may span the whole cache (the capture's
static shape) while each step reads only the keys the rows use, and a song makes the same
frames alone as among others.

GQA: query head j reads kv head j // GROUP; each program multiplies the GROUP query heads of its
kv head as one tile (padded to 16 rows for `tl.dot`), so each key is read once per kv head.
Scores and the softmax are float32; float32 operands multiply in three TF32 passes (`tf32x3`,
about float32's precision; tiles of `F32_BLOCK_N` keys over 8 warps, as wider ones spill
registers), bf16 and float16 ones once, on the tensor cores, with the probabilities rounded to
the values' dtype as flash attention does. Tests run the kernels on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from heartmula_rt.config import LM_PRESETS, LMConfig

CHUNK = 128  # key positions per chunk: the split (fixed, so that rows round alike everywhere)
BLOCK_N = 64  # keys per tile inside a chunk
F32_BLOCK_N = 32  # the same for float32
_DOT_MIN_ROWS = 16  # tl.dot's smallest tile height
_LOG2E = 1.4426950408889634

# Triton's interpreter multiplies bf16 dot operands as their uint16 bit patterns: there the dots
# take float32 operands.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

Launch = tuple[tuple[int, ...], tuple, dict]  # (grid, args, kwargs) of one kernel launch


# The counts only index: compiling a variant per value (1, or a multiple of 16) would gain nothing.
@triton.jit(do_not_specialize=["n_heads", "n_chunks"])
def _chunk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    n_heads,
    n_chunks,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    pos = tl.load(pos_ptr + row)
    first = chunk * CHUNK
    if first <= pos:  # else no key of this chunk is attended: nothing to read or write
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        head = kv_head * GROUP + g
        g_valid = g < GROUP
        d_valid = d < HEAD_DIM
        q = tl.load(
            q_ptr + row * stride_qb + head[:, None] * stride_qh + d[None, :],
            mask=g_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + row * stride_kb + kv_head * stride_kh
        v_base = v_ptr + row * stride_vb + kv_head * stride_vh
        m_i = tl.full((BLOCK_G,), -float("inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        end = tl.minimum(first + CHUNK, pos + 1)  # the chunk's attended keys: [first, end)
        for n0 in range(first, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_valid = n < end
            kt = tl.load(
                k_base + n[None, :] * stride_kn + d[:, None],
                mask=n_valid[None, :] & d_valid[:, None],
                other=0.0,
            )
            v = tl.load(
                v_base + n[:, None] * stride_vn + d[None, :],
                mask=n_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if UPCAST:
                kt, v = kt.to(tl.float32), v.to(tl.float32)
            # Scores in log2 units: exp2 of them is the softmax's exp.
            s = tl.dot(q, kt, input_precision="tf32x3") * qk_scale
            s = tl.where(n_valid[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
            m_i = m_new
        # Partials [B, H, n_chunks] (+ [HEAD_DIM] for acc), at the chunk's query heads.
        at = (row * n_heads + head) * n_chunks + chunk
        tl.store(m_ptr + at, m_i, mask=g_valid)
        tl.store(l_ptr + at, l_i, mask=g_valid)
        tl.store(
            acc_ptr + at[:, None] * HEAD_DIM + d[None, :],
            acc,
            mask=g_valid[:, None] & d_valid[None, :],
        )


@triton.jit(do_not_specialize=["n_heads", "n_chunks"])
def _combine_kernel(
    pos_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    n_heads,
    n_chunks,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    at = (row * n_heads + head) * n_chunks  # the row's chunk 0, always attended (key 0)
    m = tl.load(m_ptr + at)
    l_sum = tl.load(l_ptr + at)
    acc = tl.load(acc_ptr + at * HEAD_DIM + d, mask=d_valid, other=0.0)
    last = tl.load(pos_ptr + row) // CHUNK
    for c in range(1, last + 1):  # in chunk order: the same sums whatever follows
        m_c = tl.load(m_ptr + at + c)
        m_new = tl.maximum(m, m_c)
        old, new = tl.exp2(m - m_new), tl.exp2(m_c - m_new)
        l_sum = l_sum * old + tl.load(l_ptr + at + c) * new
        acc_c = tl.load(acc_ptr + (at + c) * HEAD_DIM + d, mask=d_valid, other=0.0)
        acc = acc * old + acc_c * new
        m = m_new
    out = acc / l_sum
    tl.store(
        out_ptr + (row * n_heads + head) * HEAD_DIM + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_valid,
    )


def _workspace_shapes(q, k) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the per-chunk partials: (max and sum [B, H, C], acc [B, H, C, D])."""
    b, n_heads, head_dim = q.shape
    n_chunks = triton.cdiv(k.shape[2], CHUNK)
    return (b, n_heads, n_chunks), (b, n_heads, n_chunks, head_dim)


def chunk_launch(q, k, v, pos, m, l_sum, acc) -> Launch:
    """q [B, H, D] (D contiguous), k/v [B, H_kv, L, D] (D contiguous, any other strides), pos
    int64 [B], partials m, l_sum float32 [B, H, C] and acc float32 [B, H, C, D] contiguous."""
    b, n_heads, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_chunks = triton.cdiv(kv_len, CHUNK)
    group = n_heads // n_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    f32 = q.dtype == torch.float32
    args = (
        q,
        k,
        v,
        pos,
        m,
        l_sum,
        acc,
        q.stride()[0],
        q.stride()[1],
        *k.stride()[:3],
        *v.stride()[:3],
        n_heads,
        n_chunks,
        _LOG2E / math.sqrt(head_dim),
    )
    kwargs = {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_G": max(triton.next_power_of_2(group), _DOT_MIN_ROWS),
        "BLOCK_D": block_d,
        "CHUNK": CHUNK,
        "BLOCK_N": F32_BLOCK_N if f32 else BLOCK_N,
        "UPCAST": _INTERPRETED,
        "num_warps": 8 if f32 else 4,
        "num_stages": 2 if f32 else 3,  # float32 tiles in 3 stages overflow sm_86's shared memory
    }
    return (n_chunks, b, n_kv_heads), args, kwargs


def combine_launch(pos, m, l_sum, acc, out) -> Launch:
    """The partials of `chunk_launch` → out [B, H, D] contiguous."""
    b, n_heads, n_chunks, head_dim = acc.shape
    block_d = triton.next_power_of_2(head_dim)
    kwargs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "CHUNK": CHUNK, "num_warps": 1}
    return (b, n_heads), (pos, m, l_sum, acc, out, n_heads, n_chunks), kwargs


@torch.library.custom_op("heartmula_rt::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    """Softmax attention (scale 1/sqrt(D)) of one query per row, q [B, H, D], over that row's
    cached k/v [B, H_kv, L, D] at positions 0 .. pos[row] (pos int64 [B] on the device, each
    < L; H a multiple of H_kv, query head j reading kv head j // (H / H_kv)) → [B, H, D] in q's
    dtype. `SDPA(q, k, v, mask)` with each row's positions past pos masked."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    stats_shape, acc_shape = _workspace_shapes(q, k)
    m = torch.empty(stats_shape, dtype=torch.float32, device=q.device)
    l_sum = torch.empty(stats_shape, dtype=torch.float32, device=q.device)
    acc = torch.empty(acc_shape, dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid, args, kwargs = chunk_launch(q, k, v, pos, m, l_sum, acc)
    _chunk_kernel[grid](*args, **kwargs)
    grid, args, kwargs = combine_launch(pos, m, l_sum, acc, out)
    _combine_kernel[grid](*args, **kwargs)
    return out


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    return q.new_empty(q.shape)


def aot_launches() -> list[tuple[str, object, tuple, dict]]:
    """(description, kernel, args, kwargs) of the engines' launches: the backbones of the 3B, 7B
    and tiny presets (their GQA groups and head sizes) in each LM dtype; the rows and the cache's
    length are values, not variants."""
    from triton.runtime.jit import MockTensor

    f32 = torch.float32
    launches = []
    for preset in ("3B", "7B", "tiny"):
        f = LMConfig.from_dict(LM_PRESETS[preset]).backbone
        for dtype in (torch.bfloat16, torch.float16, f32):
            where = f"{preset} {str(dtype).removeprefix('torch.')}"
            q = MockTensor(dtype, [16, f.num_heads, f.head_dim])
            kv = MockTensor(dtype, [16, f.num_kv_heads, 4096, f.head_dim])
            pos = MockTensor(torch.int64, [16])
            stats_shape, acc_shape = _workspace_shapes(q, kv)
            m, acc = MockTensor(f32, list(stats_shape)), MockTensor(f32, list(acc_shape))
            _, args, kwargs = chunk_launch(q, kv, kv, pos, m, m, acc)
            launches.append((f"chunks {where}", _chunk_kernel, args, kwargs))
            _, args, kwargs = combine_launch(pos, m, m, acc, q)
            launches.append((f"combine {where}", _combine_kernel, args, kwargs))
    return launches
