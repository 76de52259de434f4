"""Weight-only int8 matmul for decode: y = (x @ w.T) * scale, with w int8 [N, K], scale float32
[N], for the few rows of one frame (1, or 2 with CFG).

Decode reads every weight once per frame, so its speed is the bytes of the weights: this kernel
streams the int8 weights (half of bf16's bytes) once for all rows, where the plain path
(`quant.formats.Int8Linear`) first writes a bf16 copy of the whole matrix. With so few rows a
tensor-core dot would be 8–16× padding, so each program multiplies and sums in float32 on the
CUDA cores (exact products of the stored integers, float32 sums) and applies the scale to the
sum. Tests run the kernel on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 4  # decode's rows; longer inputs (prefill) take the plain path

_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
    for n, k, w in [(8, 256, 4), (16, 256, 4), (32, 128, 4), (16, 512, 8), (64, 128, 8)]
]
if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter would run every config
    _CONFIGS = _CONFIGS[1:2]


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


def _launch(rows, weight, scale, y) -> tuple[object, tuple, dict]:
    """(grid, args, meta-parameters) of one launch for rows [M, K]: shared by the op and the
    ahead-of-time compile test (`kernels/aot.py`), which passes tensor stand-ins."""
    (m, k), n = rows.shape, weight.shape[0]
    args = (rows, weight, scale, y, m, n, k, rows.stride()[0], weight.stride()[0], y.stride()[0])
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    return grid, args, {"BLOCK_M": triton.next_power_of_2(m)}


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
    grid, args, meta = _launch(rows, weight, scale, y)
    _int8_matmul_kernel[grid](*args, **meta)
    return y.view(*x.shape[:-1], n)


@int8_weight_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# The 3B model's decode matmuls (N, K): q, k/v, o, w1/w3, w2, and codebook 0's head; the tiny
# fixture's come from its config the same way, but these shapes cover every specialisation.
_AOT_SHAPES = ((3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192), (8197, 3072), (24, 16))


def aot_launches() -> list[tuple[str, object, tuple, dict]]:
    """Every launch shape decode uses, for the ahead-of-time compile test: 1, 2 or 4 rows
    (MAX_ROWS), bf16 / float16 / float32 activations, the 3B model's matrix shapes."""
    from triton.runtime.jit import MockTensor

    launches = []
    for n, k in _AOT_SHAPES:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for m in (1, 2, MAX_ROWS):
                rows, y = MockTensor(dtype, [m, k]), MockTensor(dtype, [m, n])
                weight, scale = MockTensor(torch.int8, [n, k]), MockTensor(torch.float32, [n])
                _, args, meta = _launch(rows, weight, scale, y)
                what = f"{m} rows, N {n}, K {k}, {str(dtype)[6:]}"
                launches.append((what, _int8_matmul_kernel, args, meta))
    return launches
