"""Decode attention split over keys: each row's new query token (or two, `rope_attention`) over
that row's KV cache, each reading the keys only up to its own position.

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

`rope_attention` (the fused RoPE twin's decode path, model/fused.py) does in its chunk kernel,
`_rope_attend_kernel`, what `fused_rope_cache` did before it: q and the new k rotated (in
registers, rounded as `fused_rope` rounds), k and v written into the cache by the program of the
chunk that holds their position, which reads them back after a barrier; then the same online
softmax (`_attend_keys`). It takes each row's device-held position or one `start` for every row,
and up to `MAX_NEW` new positions per row when they fit one chunk (the depth decoder's first
step: two, each query attending up to its own); a grid of one chunk writes the normalised output
itself, with no combination. It equals `fused_rope_cache` then `decode_attention` bit for bit.

A row's result is thus a function of its query, its keys and values up to its position, and the
position: not of `kv_len`, the cache's capacity, or the other rows, which holds bit for bit
(every block size is fixed, not tuned). So the grid may span the whole cache (the capture's
static shape) while each step reads only the keys the rows use, and a song makes the same
frames alone as among others.

GQA: query head j reads kv head j // GROUP; each program multiplies the GROUP query heads of its
kv head as one tile (padded to 16 rows for `tl.dot`), so each key is read once per kv head.
Scores and the softmax are float32; float32 operands multiply in three TF32 passes (`tf32x3`,
about float32's precision; tiles of `F32_BLOCK_N` keys over 8 warps, as wider ones spill
registers; heads wider than 128, the 3B depth decoder's 384, take `WIDE_BLOCK_N` keys over 8
warps, and float32 ones do not fit at all: `rope_attention_fits`), bf16 and float16 ones once, on
the tensor cores, with the probabilities rounded to
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
WIDE_BLOCK_N = 16  # and for heads wider than 128 (tl.dot's least: the depth decoder reads ≤ 9)
MAX_NEW = 2  # new positions per row `rope_attention` takes: one, or the depth decoder's first two
_DOT_MIN_ROWS = 16  # tl.dot's smallest tile height
_LOG2E = 1.4426950408889634

# Triton's interpreter multiplies bf16 dot operands as their uint16 bit patterns: there the dots
# take float32 operands.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

Launch = tuple[tuple[int, ...], tuple, dict]  # (grid, args, kwargs) of one kernel launch


@triton.jit
def _attend_keys(
    q,
    k_base,
    v_base,
    first,
    end,
    limit,
    stride_kn,
    stride_vn,
    qk_scale,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The online softmax of the query tile q [BLOCK_G, BLOCK_D] over the keys [first, end)
    (tiles of BLOCK_N), tile row r attending the keys up to limit[r]: (running max, sum of exp,
    un-normalised output)."""
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    m_i = tl.full((BLOCK_G,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
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
        s = tl.where(n_valid[None, :] & (n[None, :] <= limit[:, None]), s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_partials(
    m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, at, valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """A chunk's partial result at flat indices `at` [BLOCK_G] of [B, H, n_chunks]."""
    d = tl.arange(0, BLOCK_D)
    tl.store(m_ptr + at, m_i, mask=valid)
    tl.store(l_ptr + at, l_i, mask=valid)
    tl.store(
        acc_ptr + at[:, None] * HEAD_DIM + d[None, :],
        acc,
        mask=valid[:, None] & (d < HEAD_DIM)[None, :],
    )


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
        q = tl.load(
            q_ptr + row * stride_qb + head[:, None] * stride_qh + d[None, :],
            mask=g_valid[:, None] & (d < HEAD_DIM)[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        m_i, l_i, acc = _attend_keys(
            q,
            k_ptr + row * stride_kb + kv_head * stride_kh,
            v_ptr + row * stride_vb + kv_head * stride_vh,
            first,
            tl.minimum(first + CHUNK, pos + 1),  # the chunk's attended keys: [first, end)
            pos + tl.zeros((BLOCK_G,), dtype=tl.int64),
            stride_kn,
            stride_vn,
            qk_scale,
            BLOCK_G,
            BLOCK_D,
            HEAD_DIM,
            BLOCK_N,
            UPCAST,
        )
        # Partials [B, H, n_chunks] (+ [HEAD_DIM] for acc), at the chunk's query heads.
        at = (row * n_heads + head) * n_chunks + chunk
        _store_partials(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, at, g_valid, HEAD_DIM, BLOCK_D)


@triton.jit
def _rotated(x_ptr, offsets, mask, cos, sin, d):
    """RoPE of interleaved pairs (d even: x_d cos - x_{d+1} sin, d odd: x_d cos + x_{d-1} sin)
    at `offsets` [.., BLOCK_D] of x, in float32, rounded to x's dtype as `fused_rope` rounds."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(x_ptr + offsets + 1 - 2 * (d % 2), mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where(d % 2 == 0, x * cos - partner * sin, x * cos + partner * sin)
    return rotated.to(x_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["n_heads", "n_chunks", "start"])
def _rope_attend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    k_cache_ptr,
    v_cache_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    stride_qb,
    stride_qt,
    stride_nb,
    stride_nt,
    stride_cb,
    stride_ch,
    stride_cn,
    start,
    n_heads,
    n_chunks,
    qk_scale,
    T: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_POS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (chunk, row, kv head), as `_chunk_kernel`. q [B, T, H, D], the new k and v [B, T,
    # H_kv, D] (heads and D contiguous; k's B and T strides are v's). The row's new positions:
    # pos[row] (HAS_POS, T = 1, cos/sin row `row` of [B, D/2]) or start.. (cos/sin [T, D/2]).
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    if HAS_POS:
        pos = tl.load(pos_ptr + row)
        angle_base = row  # cos/sin [B, D/2]: the row's (T = 1)
    else:
        pos = start.to(tl.int64)
        angle_base = row * 0  # cos/sin [T, D/2]: the new position's
    first = chunk * CHUNK
    if first <= pos + T - 1:
        d = tl.arange(0, BLOCK_D)
        d_valid = d < HEAD_DIM
        half = d // 2
        # The new keys and values this chunk holds, rotated, into the cache; the barrier makes
        # them visible to the whole program before it reads them back with the others.
        t = tl.arange(0, BLOCK_T)
        dest = pos + t
        mine = (t < T) & (dest >= first) & (dest < first + CHUNK)
        new_mask = mine[:, None] & d_valid[None, :]
        angle = angle_base + t[:, None]
        cos = tl.load(cos_ptr + angle * (HEAD_DIM // 2) + half[None, :], mask=new_mask, other=0.0)
        sin = tl.load(sin_ptr + angle * (HEAD_DIM // 2) + half[None, :], mask=new_mask, other=0.0)
        new = row * stride_nb + t[:, None] * stride_nt + kv_head * HEAD_DIM + d[None, :]
        cache = row * stride_cb + kv_head * stride_ch + dest[:, None] * stride_cn + d[None, :]
        k_new = _rotated(k_ptr, new, new_mask, cos, sin, d[None, :])
        tl.store(k_cache_ptr + cache, k_new, mask=new_mask)
        v_new = tl.load(v_ptr + new, mask=new_mask, other=0.0)
        tl.store(v_cache_ptr + cache, v_new, mask=new_mask)
        tl.debug_barrier()
        # The query tile: row r is new position r // GROUP's query head kv_head * GROUP + r %
        # GROUP, attending the keys up to its own position.
        r = tl.arange(0, BLOCK_G)
        t_r = r // GROUP
        head = kv_head * GROUP + r % GROUP
        r_valid = r < T * GROUP
        q_mask = r_valid[:, None] & d_valid[None, :]
        angle = angle_base + t_r[:, None]
        cos = tl.load(cos_ptr + angle * (HEAD_DIM // 2) + half[None, :], mask=q_mask, other=0.0)
        sin = tl.load(sin_ptr + angle * (HEAD_DIM // 2) + half[None, :], mask=q_mask, other=0.0)
        offsets = row * stride_qb + t_r[:, None] * stride_qt + head[:, None] * HEAD_DIM + d[None, :]
        q = _rotated(q_ptr, offsets, q_mask, cos, sin, d[None, :])
        if UPCAST:
            q = q.to(tl.float32)
        m_i, l_i, acc = _attend_keys(
            q,
            k_cache_ptr + row * stride_cb + kv_head * stride_ch,
            v_cache_ptr + row * stride_cb + kv_head * stride_ch,
            first,
            tl.minimum(first + CHUNK, pos + T),
            pos + t_r,
            stride_cn,
            stride_cn,
            qk_scale,
            BLOCK_G,
            BLOCK_D,
            HEAD_DIM,
            BLOCK_N,
            UPCAST,
        )
        if ONE_CHUNK:  # the combination of one chunk: its output, normalised (out [B, T, H, D])
            out = acc / l_i[:, None]
            at = ((row * T + t_r) * n_heads + head)[:, None] * HEAD_DIM + d[None, :]
            tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=q_mask)
        else:  # T = 1: partials for `_combine_kernel`
            at = (row * n_heads + head) * n_chunks + chunk
            _store_partials(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, at, r_valid, HEAD_DIM, BLOCK_D)


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
    HAS_POS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    at = (row * n_heads + head) * n_chunks  # the row's chunk 0, always attended (key 0)
    m = tl.load(m_ptr + at)
    l_sum = tl.load(l_ptr + at)
    acc = tl.load(acc_ptr + at * HEAD_DIM + d, mask=d_valid, other=0.0)
    last = n_chunks - 1  # without positions, every row is at one in the grid's last chunk
    if HAS_POS:
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


def _workspace_shapes(
    b: int, n_heads: int, kv_len: int, head_dim: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the per-chunk partials: (max and sum [B, H, C], acc [B, H, C, D])."""
    n_chunks = triton.cdiv(kv_len, CHUNK)
    return (b, n_heads, n_chunks), (b, n_heads, n_chunks, head_dim)


def _workspace(
    b: int, n_heads: int, kv_len: int, head_dim: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """The partials' buffers m, l_sum and acc (allocations: no launch)."""
    stats_shape, acc_shape = _workspace_shapes(b, n_heads, kv_len, head_dim)
    f32 = torch.float32
    m = torch.empty(stats_shape, dtype=f32, device=device)
    l_sum = torch.empty(stats_shape, dtype=f32, device=device)
    return m, l_sum, torch.empty(acc_shape, dtype=f32, device=device)


def _tile_kwargs(dtype: torch.dtype, head_dim: int, query_rows: int) -> dict:
    """Meta-parameters of a program's tile: `query_rows` rows of queries of one kv head. Float32
    tiles, and heads wider than 128 (the 3B depth decoder's 384), take fewer keys per tile over
    twice the threads: as wide as the others, they spill registers."""
    f32, wide = dtype == torch.float32, head_dim > 128
    narrow = not (f32 or wide)
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_G": max(triton.next_power_of_2(query_rows), _DOT_MIN_ROWS),
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "CHUNK": CHUNK,
        "BLOCK_N": WIDE_BLOCK_N if wide else F32_BLOCK_N if f32 else BLOCK_N,
        "UPCAST": _INTERPRETED,
        "num_warps": 4 if narrow else 8,
        "num_stages": 3 if narrow else 2,  # float32 in 3 stages overflows sm_86's shared memory
    }


def rope_attention_fits(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `rope_attention` compiles for heads of `head_dim` in `dtype` without spilling
    registers: float32's three-pass products of heads wider than 128 do not fit (float32 LMs
    keep the fused RoPE and SDPA there)."""
    return dtype != torch.float32 or head_dim <= 128


def chunk_launch(q, k, v, pos, m, l_sum, acc) -> Launch:
    """q [B, H, D] (D contiguous), k/v [B, H_kv, L, D] (D contiguous, any other strides), pos
    int64 [B], partials m, l_sum float32 [B, H, C] and acc float32 [B, H, C, D] contiguous."""
    b, n_heads, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_chunks = triton.cdiv(kv_len, CHUNK)
    group = n_heads // n_kv_heads
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
    kwargs = {"GROUP": group, **_tile_kwargs(q.dtype, head_dim, group)}
    return (n_chunks, b, n_kv_heads), args, kwargs


def combine_launch(pos, m, l_sum, acc, out) -> Launch:
    """The partials of `chunk_launch` (or `rope_attend_launch`) → out [B, H, D] contiguous; pos
    int64 [B], or None: every row's position in the last chunk."""
    b, n_heads, n_chunks, head_dim = acc.shape
    block_d = triton.next_power_of_2(head_dim)
    kwargs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "CHUNK": CHUNK, "num_warps": 1}
    kwargs["HAS_POS"] = pos is not None
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
    m, l_sum, acc = _workspace(*q.shape[:2], k.shape[2], q.shape[2], q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid, args, kwargs = chunk_launch(q, k, v, pos, m, l_sum, acc)
    _chunk_kernel[grid](*args, **kwargs)
    grid, args, kwargs = combine_launch(pos, m, l_sum, acc, out)
    _combine_kernel[grid](*args, **kwargs)
    return out


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    return q.new_empty(q.shape)


def rope_attend_launch(
    q, k, v, cos, sin, pos, k_cache, v_cache, m, l_sum, acc, out, strides, start: int, kv_len: int
) -> Launch:
    """q [B, T, H, D], k and v [B, T, H_kv, D] (heads and D contiguous; `strides`: q's B and T
    strides, k's (which are v's), then the caches' B, head and position strides); cos, sin
    float32 [B, D/2] with `pos` (int64 [B], T = 1) or [T, D/2] without (positions start..);
    k_cache, v_cache [B, H_kv, L, D] (D contiguous); `kv_len` the positions the grid spans
    (with `pos` the static extent read, else start + T); partials as `chunk_launch`'s; out
    [B, T, H, D] contiguous."""
    b, t, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    n_chunks = triton.cdiv(kv_len, CHUNK)
    args = (q, k, v, cos, sin, pos, k_cache, v_cache, m, l_sum, acc, out, *strides, start)
    kwargs = {
        "T": t,
        "GROUP": group,
        "BLOCK_T": triton.next_power_of_2(t),
        "HAS_POS": pos is not None,
        "ONE_CHUNK": n_chunks == 1,
        **_tile_kwargs(q.dtype, head_dim, t * group),
    }
    if n_chunks == 1:  # a tile or two of keys: nothing to pipeline (3 stages spill on sm_80)
        kwargs["num_stages"] = 2
    args += (n_heads, n_chunks, _LOG2E / math.sqrt(head_dim))
    return (n_chunks, b, k.shape[2]), args, kwargs


@torch.library.custom_op("heartmula_rt::rope_attention", mutates_args=("k_cache", "v_cache"))
def rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor | None,
    start: int,
    kv_len: int,
) -> Tensor:
    """`fused_rope_cache` and `decode_attention` in one launch (two past one chunk of keys):
    q [B, T, H, D] and k [B, T, H_kv, D] rotated (float32 cos/sin [B, D/2] with `pos`, else
    [T, D/2]), k and v written into k_cache, v_cache [B, H_kv, L, D] at each row's position
    pos[b] (int64 [B] on the device, T = 1) or at start..start+T-1, and each new query's
    softmax attention over its row's keys up to its own position → [B, T, H, D] in q's dtype.
    The grid spans `kv_len` positions (≤ L): with `pos`, the static extent; else start + T.
    T ≤ `MAX_NEW`; past one chunk, T = 1."""
    from heartmula_rt.kernels.fused_layers import heads_view

    q, k, v = heads_view(q), heads_view(k), heads_view(v)
    if k.stride()[:2] != v.stride()[:2] or k_cache.stride() != v_cache.stride():
        raise ValueError("k and v, and the cache's keys and values, need one layout each")
    b, t, n_heads, head_dim = q.shape
    m, l_sum, acc = _workspace(b, n_heads, kv_len, head_dim, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    strides = (*q.stride()[:2], *k.stride()[:2], *k_cache.stride()[:3])
    grid, args, kwargs = rope_attend_launch(
        q, k, v, cos.contiguous(), sin.contiguous(), pos, k_cache, v_cache, m, l_sum, acc, out,
        strides, start, kv_len,
    )  # fmt: skip
    _rope_attend_kernel[grid](*args, **kwargs)
    if grid[0] > 1:
        grid, args, kwargs = combine_launch(pos, m, l_sum, acc, out.view(b, n_heads, head_dim))
        _combine_kernel[grid](*args, **kwargs)
    return out


@rope_attention.register_fake
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
    kv_len: int,
) -> Tensor:
    return q.new_empty(q.shape)


def aot_launches() -> list[tuple[str, object, tuple, dict]]:
    """(description, kernel, args, kwargs) of the engines' launches: the split-key attention of
    the 3B, 7B and tiny backbones (their GQA groups and head sizes) and `rope_attention`'s
    (theirs, and the 3B's and tiny's depth decoders') in each LM dtype: at device-held positions,
    and at a start (one position past one chunk and within it; the decoders' two); the rows and
    the cache's length are values, not variants."""
    from triton.runtime.jit import MockTensor

    f32 = torch.float32
    launches = []
    for preset in ("3B", "7B", "tiny"):
        config = LMConfig.from_dict(LM_PRESETS[preset])
        for dtype in (torch.bfloat16, torch.float16, f32):

            def mock(*shape: int, dtype: torch.dtype = dtype) -> MockTensor:
                return MockTensor(dtype, list(shape))

            f, where = config.backbone, f"{preset} {str(dtype).removeprefix('torch.')}"
            q, pos = mock(16, f.num_heads, f.head_dim), mock(16, dtype=torch.int64)
            kv = mock(16, f.num_kv_heads, 4096, f.head_dim)
            stats_shape, acc_shape = _workspace_shapes(16, f.num_heads, 4096, f.head_dim)
            m, acc = mock(*stats_shape, dtype=f32), mock(*acc_shape, dtype=f32)
            _, args, kwargs = chunk_launch(q, kv, kv, pos, m, m, acc)
            launches.append((f"chunks {where}", _chunk_kernel, args, kwargs))
            for at in (pos, None):
                _, args, kwargs = combine_launch(at, m, m, acc, q)
                what = f"combine {where} pos={at is not None}"
                launches.append((what, _combine_kernel, args, kwargs))
            parts = [("backbone", f, ((pos, 1, 4096), (None, 1, 4096), (None, 1, 64)))]
            if preset != "7B":  # (its depth decoder is the 3B's)
                parts.append(("decoder", config.decoder, ((None, 1, 8), (None, 2, 2))))
            for part, f, steps in parts:
                if not rope_attention_fits(dtype, f.head_dim):
                    continue
                for at, t, kv_len in steps:
                    q = mock(16, t, f.num_heads, f.head_dim)
                    k = mock(16, t, f.num_kv_heads, f.head_dim)
                    kv = mock(16, f.num_kv_heads, 4096, f.head_dim)
                    cos = mock(16 if at is not None else t, f.head_dim // 2, dtype=f32)
                    width = (f.num_heads + 2 * f.num_kv_heads) * f.head_dim
                    strides = (t * width, width) * 2 + (f.num_kv_heads * 4096 * f.head_dim,)
                    strides += (4096 * f.head_dim, f.head_dim)
                    _, args, kwargs = rope_attend_launch(
                        q, k, k, cos, cos, at, kv, kv, m, m, acc, q, strides, 0, kv_len
                    )
                    what = f"rope_attention {where} {part} pos={at is not None} t={t} {kv_len}"
                    launches.append((what, _rope_attend_kernel, args, kwargs))
    return launches
