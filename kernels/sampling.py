"""The fused sampler: CFG mixing, temperature, top-k and the categorical draw in one launch.

It is the plain sampler of `heartmula_rt.sampling` (SPEC §4) with two changes that let a CUDA
graph replay it: the settings and the Philox RNG state live in device memory (read by the kernel
every call, so one captured graph serves any seed, top-k, temperature and CFG scale), and the
kernel advances the RNG counter itself, so every replay draws fresh numbers while a seeded run
repeats exactly.

On a GPU, one program per output row, reading its row in chunks of at most MAX_BLOCK entries:
the tile is bounded whatever the vocabulary or the number of rows, so compile time and registers
stay small (a whole-row tile of the 8197-entry vocabulary spilled registers and took 10 s to
compile for sm_90; the whole batch as one tile, far longer). The last program to finish advances
the counter (a ticket taken with an atomic add), after every program has read it.

State layout (`new_state`): `state_ints` int64 [4] = (seed, counter, topk, ticket);
`state_floats` float32 [2] = (cfg_scale, temperature). Tests run the kernel on the CPU with
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Globals read inside a jitted function must be constexprs (a real compile refuses others).
_INT32_MIN: tl.constexpr = tl.constexpr(-2147483648)
_INT32_MAX: tl.constexpr = tl.constexpr(2147483647)
# A GPU program takes one row, in chunks of MAX_BLOCK entries (8 per thread of 8 warps). Triton's
# interpreter (the CPU tests) runs programs one by one in Python, so there one program takes the
# whole batch in one chunk, as numpy arrays.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK = 2048


@triton.jit
def _guided(logits_ptr, offsets, uncond, valid, scale, temperature, CFG: tl.constexpr):
    """A [rows, chunk] tile of guided logits over the temperature, in float32 (-0.0 made +0.0,
    which orders equal to it); `uncond` is the offset of the unconditional rows."""
    x = tl.load(logits_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if CFG:  # rows are [cond..., uncond...]
        u = tl.load(logits_ptr + uncond + offsets, mask=valid, other=0.0).to(tl.float32)
        x = u + (x - u) * scale
    return x / temperature + 0.0


@triton.jit
def _order_key(x):
    """Order-preserving int32 keys of float32 values."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & _INT32_MAX)


@triton.jit
def _first_best(best, best_at, vocab):
    """Per row, the first column holding the row's largest value (torch's argmax rule)."""
    top = tl.max(best, axis=1)
    return tl.min(tl.where(best == top[:, None], best_at, vocab), axis=1)


# The row count is a value, not a specialisation: one compile serves every batch.
@triton.jit(do_not_specialize=["n_out"])
def _fused_sample_kernel(
    logits_ptr,
    row_stride,
    out_ptr,
    ints_ptr,
    floats_ptr,
    vocab,
    n_out,
    CFG: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # BLOCK covers the vocabulary
):
    seed = tl.load(ints_ptr)
    counter = tl.load(ints_ptr + 1)
    k = tl.load(ints_ptr + 2)
    scale = tl.load(floats_ptr)
    temperature = tl.load(floats_ptr + 1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows[:, None] < n_out
    lanes = tl.arange(0, BLOCK)[None, :]
    uncond = n_out * row_stride
    best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)  # running max per lane
    best_at = tl.zeros((ROWS, BLOCK), tl.int32)  # and its column
    if k == 1:  # plain argmax of the guided logits (the temperature does not move it)
        for start in range(0, vocab, BLOCK):
            cols = start + lanes
            valid = row_ok & (cols < vocab)
            x = _guided(
                logits_ptr, rows[:, None] * row_stride + cols, uncond, valid, scale, 1.0, CFG
            )
            better = valid & (x > best)  # strictly: the first of equal values wins
            best_at = tl.where(better, cols, best_at)
            best = tl.where(better, x, best)
    else:
        # Each row's k-th largest key, found exactly by bisection on "at least k keys are
        # >= mid" (32 halvings of the int32 range), so ties at the k-th value are kept, as in
        # the plain sampler. Each halving re-reads the row chunk by chunk (from L1).
        lo_lanes = tl.full((ROWS, BLOCK), _INT32_MAX, tl.int32)
        hi_lanes = tl.full((ROWS, BLOCK), _INT32_MIN, tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + lanes
            valid = row_ok & (cols < vocab)
            offsets = rows[:, None] * row_stride + cols
            key = _order_key(_guided(logits_ptr, offsets, uncond, valid, scale, temperature, CFG))
            lo_lanes = tl.minimum(lo_lanes, tl.where(valid, key, _INT32_MAX))
            hi_lanes = tl.maximum(hi_lanes, tl.where(valid, key, _INT32_MIN))
        lo = tl.min(lo_lanes, axis=1).to(tl.int64)
        hi = tl.max(hi_lanes, axis=1).to(tl.int64) + 1
        if ONE_CHUNK:  # the whole row is one chunk: its keys stay at hand for every halving
            row_valid = row_ok & (lanes < vocab)
            row_offsets = rows[:, None] * row_stride + lanes
            row_x = _guided(logits_ptr, row_offsets, uncond, row_valid, scale, temperature, CFG)
            row_key = _order_key(row_x)
        for _halving in range(32):
            mid = lo + (hi - lo) // 2  # in [lo, hi): an int32
            if ONE_CHUNK:
                counts = (row_valid & (row_key >= mid.to(tl.int32)[:, None])).to(tl.int32)
            else:
                counts = tl.zeros((ROWS, BLOCK), tl.int32)
                for start in range(0, vocab, BLOCK):
                    cols = start + lanes
                    valid = row_ok & (cols < vocab)
                    offsets = rows[:, None] * row_stride + cols
                    x = _guided(logits_ptr, offsets, uncond, valid, scale, temperature, CFG)
                    counts += (valid & (_order_key(x) >= mid.to(tl.int32)[:, None])).to(tl.int32)
            enough = tl.sum(counts, axis=1) >= k
            open_range = hi - lo > 1
            lo = tl.where(open_range & enough, mid, lo)
            hi = tl.where(open_range & ~enough, mid, hi)
        # Gumbel-max over the kept logits: a categorical draw from their softmax. Philox
        # counters: (position in the [rows, vocab] batch, call counter low, high, 0).
        kth = lo.to(tl.int32)[:, None]
        for start in range(0, vocab, BLOCK):
            cols = start + lanes
            valid = row_ok & (cols < vocab)
            offsets = rows[:, None] * row_stride + cols
            x = _guided(logits_ptr, offsets, uncond, valid, scale, temperature, CFG)
            c0 = (rows[:, None] * vocab + cols).to(tl.uint32)
            zero = c0 * 0
            c1 = zero + (counter & 0xFFFFFFFF).to(tl.uint32)
            c2 = zero + (counter >> 32).to(tl.uint32)
            bits = tl.philox(seed, c0, c1, c2, zero)[0]
            gumbel = -tl.log(-tl.log(tl.random.uint_to_uniform_float(bits)))
            score = x + gumbel
            better = valid & (_order_key(x) >= kth) & (score > best)
            best_at = tl.where(better, cols, best_at)
            best = tl.where(better, score, best)
    token = _first_best(best, best_at, vocab)
    tl.store(out_ptr + rows, token.to(tl.int64), mask=rows < n_out)
    # The ticket's atomic add orders this program's reads before it (acq_rel): the last
    # program to take one knows all have read the counter, and advances it for the next call.
    if tl.atomic_add(ints_ptr + 3, 1) == tl.num_programs(0) - 1:
        tl.store(ints_ptr + 1, counter + 1)
        tl.store(ints_ptr + 3, 0)


def new_state(
    *, seed: int, topk: int, cfg_scale: float, temperature: float, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """(state_ints, state_floats) for `fused_sample`, with the counter at 0."""
    ints = torch.tensor([seed, 0, topk, 0], dtype=torch.int64, device=device)
    floats = torch.tensor([cfg_scale, temperature], dtype=torch.float32, device=device)
    return ints, floats


def _launch(
    logits, state_ints, state_floats, out, cfg: bool, interpreted: bool = INTERPRETED
) -> tuple[tuple, tuple, dict]:
    """(grid, args, meta-parameters) of one launch: shared by the op and the ahead-of-time
    compile test (`kernels/aot.py`), which passes tensor stand-ins of the same shapes."""
    n_out, vocab = out.shape[0], logits.shape[1]
    if interpreted:
        rows, block = triton.next_power_of_2(n_out), triton.next_power_of_2(vocab)
    else:
        rows, block = 1, min(triton.next_power_of_2(vocab), MAX_BLOCK)
    args = (logits, logits.stride()[0], out, state_ints, state_floats, vocab, n_out)
    # A row's keys are kept for every halving when they fit: a whole 2048-entry row spilled.
    one_chunk = block >= vocab and (interpreted or block < MAX_BLOCK)
    meta = {"CFG": cfg, "ROWS": rows, "BLOCK": block, "ONE_CHUNK": one_chunk}
    meta["num_warps"] = 8 if block >= MAX_BLOCK else 4
    return (triton.cdiv(n_out, rows),), args, meta


@torch.library.custom_op("heartmula_rt::fused_sample", mutates_args={"state_ints"})
def fused_sample(logits: Tensor, state_ints: Tensor, state_floats: Tensor, cfg: bool) -> Tensor:
    """Raw logits [R, V] → one token per output row, int64 [R/2 if cfg else R, 1].

    With `cfg`, the first half of the rows are conditional and the second half unconditional.
    Advances the RNG counter in `state_ints` (`new_state`) by one.
    """
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    n_out = logits.shape[0] // 2 if cfg else logits.shape[0]
    out = torch.empty(n_out, 1, dtype=torch.int64, device=logits.device)
    grid, args, meta = _launch(logits, state_ints, state_floats, out, cfg)
    _fused_sample_kernel[grid](*args, **meta)
    return out


@fused_sample.register_fake
def _(logits: Tensor, state_ints: Tensor, state_floats: Tensor, cfg: bool) -> Tensor:
    n_out = logits.shape[0] // 2 if cfg else logits.shape[0]
    return logits.new_empty(n_out, 1, dtype=torch.int64)


def aot_launches() -> list[tuple[str, object, tuple, dict]]:
    """Every launch shape the engines and tests use, as a GPU launches them, for the
    ahead-of-time compile test: the 3B and the tiny fixture's audio vocabularies and the tests'
    small ones, 1–8 output rows, with and without CFG, bf16 and float32 logits."""
    from triton.runtime.jit import MockTensor

    launches = []
    for vocab in (8197, 1029, 1000, 300, 7):
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 2, 8):
                for cfg in (True, False):
                    logits = MockTensor(dtype, [2 * rows if cfg else rows, vocab])
                    ints, floats = MockTensor(torch.int64, [4]), MockTensor(torch.float32, [2])
                    out = MockTensor(torch.int64, [rows, 1])
                    _, args, meta = _launch(logits, ints, floats, out, cfg, False)
                    what = f"vocab {vocab}, {rows} rows, cfg {cfg}, {str(dtype)[6:]}"
                    launches.append((what, _fused_sample_kernel, args, meta))
    return launches
