"""The fused sampler: CFG mixing, temperature, top-k and the categorical draw in one launch.

It is the plain sampler of `heartmula_rt.sampling` (SPEC §4) with two changes that let a CUDA
graph replay it: the settings and the Philox RNG state live in device memory (read by the kernel
every call, so one captured graph serves any seed, top-k, temperature and CFG scale), and the
kernel advances the RNG counter itself, so every replay draws fresh numbers while a seeded run
repeats exactly.

State layout: `state_ints` int64 [3] = (seed, counter, topk); `state_floats` float32 [2] =
(cfg_scale, temperature). Tests run the kernel on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT32_MIN = -2147483648
_INT32_MAX = 2147483647


@triton.jit
def _fused_sample_kernel(
    logits_ptr,
    row_stride,
    out_ptr,
    ints_ptr,
    floats_ptr,
    vocab,
    n_out,
    CFG: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program, the whole batch as one [rows, vocab] tile: the RNG counter has one writer.
    seed = tl.load(ints_ptr)
    counter = tl.load(ints_ptr + 1)
    k = tl.load(ints_ptr + 2)
    scale = tl.load(floats_ptr)
    temperature = tl.load(floats_ptr + 1)
    rows = tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)[None, :]
    valid = (rows[:, None] < n_out) & (cols < vocab)
    offsets = rows[:, None] * row_stride + cols
    x = tl.load(logits_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if CFG:  # rows are [cond..., uncond...]
        u = tl.load(logits_ptr + n_out * row_stride + offsets, mask=valid, other=0.0)
        u = u.to(tl.float32)
        x = u + (x - u) * scale
    if k == 1:
        token = tl.argmax(tl.where(valid, x, float("-inf")), axis=1)
    else:
        x = x / temperature + 0.0  # + 0.0 turns -0.0 into +0.0, which orders equal to it
        # Order-preserving int keys of the floats; each row's k-th largest key is found exactly
        # by bisection on "at least k keys are >= mid" (32 halvings of the int32 range), so
        # ties at the k-th value are kept, as in the plain sampler.
        bits = x.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & _INT32_MAX)).to(tl.int64)
        lo = tl.min(tl.where(valid, key, _INT32_MAX), axis=1)
        hi = tl.max(tl.where(valid, key, _INT32_MIN), axis=1) + 1
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            enough = tl.sum((valid & (key >= mid[:, None])).to(tl.int32), axis=1) >= k
            open_range = hi - lo > 1
            lo = tl.where(open_range & enough, mid, lo)
            hi = tl.where(open_range & ~enough, mid, hi)
        # Gumbel-max over the kept logits: a categorical draw from their softmax. Philox
        # counters: (position in the tile, call counter low, call counter high, 0).
        c0 = (rows[:, None] * vocab + cols).to(tl.uint32)
        zero = c0 * 0
        c1 = zero + (counter & 0xFFFFFFFF).to(tl.uint32)
        c2 = zero + (counter >> 32).to(tl.uint32)
        bits_r, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
        gumbel = -tl.log(-tl.log(tl.random.uint_to_uniform_float(bits_r)))
        kept = valid & (key >= lo[:, None])
        token = tl.argmax(tl.where(kept, x + gumbel, float("-inf")), axis=1)
    tl.store(out_ptr + rows, token.to(tl.int64), mask=rows < n_out)
    tl.store(ints_ptr + 1, counter + 1)


@torch.library.custom_op("heartmula_rt::fused_sample", mutates_args={"state_ints"})
def fused_sample(
    logits: torch.Tensor, state_ints: torch.Tensor, state_floats: torch.Tensor, cfg: bool
) -> torch.Tensor:
    """Raw logits [R, V] → one token per output row, int64 [R/2 if cfg else R, 1].

    With `cfg`, the first half of the rows are conditional and the second half unconditional.
    Advances the RNG counter in `state_ints` by one.
    """
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    n_out = logits.shape[0] // 2 if cfg else logits.shape[0]
    vocab = logits.shape[1]
    out = torch.empty(n_out, 1, dtype=torch.int64, device=logits.device)
    block = triton.next_power_of_2(vocab)
    _fused_sample_kernel[(1,)](
        logits,
        logits.stride(0),
        out,
        state_ints,
        state_floats,
        vocab,
        n_out,
        CFG=cfg,
        BLOCK_ROWS=triton.next_power_of_2(n_out),
        BLOCK=block,
        num_warps=16 if block >= 8192 else 4,
    )
    return out


@fused_sample.register_fake
def _(
    logits: torch.Tensor, state_ints: torch.Tensor, state_floats: torch.Tensor, cfg: bool
) -> torch.Tensor:
    n_out = logits.shape[0] // 2 if cfg else logits.shape[0]
    return logits.new_empty(n_out, 1, dtype=torch.int64)
