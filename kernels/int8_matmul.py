"""Weight-only int8 matmul for decode: y = (x @ w.T) * scale, with w int8 [N, K], scale float32
[N], for the rows of one frame: 1 or 2 per song (CFG), up to a batch of songs.

Decode reads every weight once per frame, so its speed is the bytes of the weights: these kernels
stream the int8 weights (half of bf16's bytes) once for all rows, where the plain path
(`quant.formats.Int8Linear`) first writes a bf16 copy of the whole matrix. Both programs compute
exact products of the stored integers (an int8 is exact in bf16 and float16) summed in float32,
and apply the scale to the sum:

- up to `SMALL_ROWS` rows (one or two songs' frame): a tensor-core dot would be 4–16× padding,
  so each program multiplies and sums on the CUDA cores;
- up to `MAX_ROWS` (several songs, the depth decoder's first step of two CFG songs): the rows
  are padded to 16, 32 or 64 and multiplied with `tl.dot` on the tensor cores. float32 rows take
  three TF32 passes (`tf32x3`, about float32's precision: an int8 is exact in TF32), 16 rows per
  program: wider float32 tiles spill registers.

Longer inputs (prefill) take the plain path. Tests run the kernels on the CPU with
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SMALL_ROWS = 4  # the CUDA-core kernel's rows
MAX_ROWS = 64  # the dot kernel's; longer inputs (prefill) take the plain path
_DOT_MIN_ROWS = 16  # tl.dot's smallest tile height
_F32_DOT_ROWS = 16  # float32 rows per dot program

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs every config

_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
    for n, k, w in [(8, 256, 4), (16, 256, 4), (32, 128, 4), (16, 512, 8), (64, 128, 8)]
]
# Narrow column blocks keep every SM busy on 3072-wide outputs, wide ones reuse each row tile.
_DOT_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in [(16, 64, 4, 3), (32, 128, 4, 2), (64, 32, 4, 2)]
]
if _INTERPRETED:
    _CONFIGS, _DOT_CONFIGS = _CONFIGS[1:2], _DOT_CONFIGS[1:2]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per BLOCK_N output columns, all rows of x at once: each weight is read once.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :],
            mask=(rm[:, None] < M) & (k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w_ptr + rn[:, None] * stride_wn + k[None, :],
            mask=(rn[:, None] < N) & (k[None, :] < K),
            other=0,
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    y = acc * scale[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


# Keyed by the padded height, not M: one tuning serves every row count of a bucket, and M is
# not specialised (compiled) on either.
@triton.autotune(configs=_DOT_CONFIGS, key=["BLOCK_M", "N", "K"])
@triton.jit(do_not_specialize=["M"])
def _int8_dot_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # As _int8_matmul_kernel for BLOCK_M rows per program (all of them but in float32), the
    # weight tile loaded as [BLOCK_K, BLOCK_N] for the dot.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :],
            mask=(rm[:, None] < M) & (k[None, :] < K),
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + k[:, None],
            mask=(rn[None, :] < N) & (k[:, None] < K),
            other=0,
        )
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision="tf32x3")
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    y = acc * scale[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def _launch(rows, weight, scale, y) -> tuple[object, object, tuple, dict]:
    """(kernel, grid, args, meta-parameters) of one launch for rows [M, K], M ≤ MAX_ROWS: shared
    by the op and the ahead-of-time compile test (`kernels/aot.py`), which passes tensor
    stand-ins."""
    (m, k), n = rows.shape, weight.shape[0]
    args = (rows, weight, scale, y, m, n, k, rows.stride()[0], weight.stride()[0], y.stride()[0])
    block_m = triton.next_power_of_2(m)
    if m <= SMALL_ROWS:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        return _int8_matmul_kernel, grid, args, {"BLOCK_M": block_m}
    block_m = _F32_DOT_ROWS if rows.dtype == torch.float32 else max(block_m, _DOT_MIN_ROWS)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
    # Triton's interpreter multiplies bf16 dot operands as their uint16 bit patterns: there the
    # dot takes float32 operands (the same exact products of int8 and bf16 values).
    return _int8_dot_kernel, grid, args, {"BLOCK_M": block_m, "UPCAST": _INTERPRETED}


@torch.library.custom_op("heartmula_rt::int8_weight_matmul", mutates_args=())
def int8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows in all) · int8 weight [N, K]ᵀ · float32 scale [N] →
    [..., N] in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    m, k = rows.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"int8_weight_matmul takes at most {MAX_ROWS} rows, not {m}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernel, grid, args, meta = _launch(rows, weight, scale, y)
    kernel[grid](*args, **meta)
    return y.view(*x.shape[:-1], n)


@int8_weight_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# The 3B model's decode matmuls (N, K): q, k/v, o, w1/w3, w2, and codebook 0's head; the tiny
# fixture's come from its config the same way, but these shapes cover every specialisation.
_AOT_SHAPES = ((3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192), (8197, 3072), (24, 16))
# Row counts that reach every variant: each padded height (1 specialises the small kernel).
_AOT_ROWS = (1, 2, SMALL_ROWS, 5, 17, MAX_ROWS)


def aot_launches() -> list[tuple[str, object, tuple, dict]]:
    """Every launch shape decode uses, for the ahead-of-time compile test: 1 to MAX_ROWS rows
    (`_AOT_ROWS`), bf16 / float16 / float32 activations, the 3B model's matrix shapes."""
    from triton.runtime.jit import MockTensor

    launches = []
    for n, k in _AOT_SHAPES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for m in _AOT_ROWS:
                rows, y = MockTensor(dtype, [m, k]), MockTensor(dtype, [m, n])
                weight, scale = MockTensor(torch.int8, [n, k]), MockTensor(torch.float32, [n])
                kernel, _, args, meta = _launch(rows, weight, scale, y)
                what = f"{m} rows, N {n}, K {k}, {str(dtype)[6:]}"
                launches.append((what, kernel, args, meta))
    return launches
