"""The fused sampler: CFG mixing, temperature, top-k and the categorical draw in one launch, for
every row of a batch of songs with each song's own settings.

It is the plain sampler of `heartmula_rt.model.sampling` (SPEC §4) with its state in device
memory, so a CUDA graph replays it: each song's settings, seed and frame index (read by the
kernel every call, so one captured graph serves any songs in any rows), with the codebook passed
per call.
A draw's Philox counters are (column, the song's frame, the codebook, 0) under the song's seed:
a song's draws depend on nothing else (not on its rows or its neighbours), the static engine's
twin of `sampling.draw_seed`.

On a GPU, one program per row, reading the logits of its song's rows ([cond, uncond] with
guidance) in chunks of at most MAX_BLOCK entries: the tile is bounded whatever the vocabulary or
the number of rows, so compile time and registers stay small (a whole-row tile of the 8197-entry
vocabulary spilled registers and took 10 s to compile for sm_90). A sampling row is read six
times: its argmax, four passes of a radix select for its k-th largest value (`_kth_key`), and the
draw. A guided song's two rows both draw its one token (the same numbers: the counters do not
name the row).

State layout (`new_state`): `state_ints` int64 [rows, 5] = (the first row of the song the row
belongs to, or -1 when idle; then at a song's first row: its rows, seed, top-k, frame);
`state_floats` float32 [rows, 2] = (cfg_scale, temperature) at a song's first row. Tests run the
kernel on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# A GPU program takes one row, in chunks of MAX_BLOCK entries (8 per thread of 8 warps). Triton's
# interpreter (the CPU tests) runs programs one by one in Python, so there one program takes the
# whole batch in one chunk, as numpy arrays.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK = 2048
TILE_LIMIT = 2**20  # Triton's largest tile
INTS, FLOATS = 5, 2  # state entries per row


@triton.jit
def _settings(ints_ptr, floats_ptr, rows, row_ok, row_stride):
    """The state of each row's song: (the song's first row, or -1 for an idle row, which reads
    row 0's song; its seed, top-k and frame; [ROWS, 1] columns of its cfg scale, temperature,
    first row's offset and the unconditional row's offset from that, 0 without guidance)."""
    owner = tl.load(ints_ptr + rows * 5, mask=row_ok, other=-1)
    first = tl.maximum(owner, 0)
    song = ints_ptr + first * 5
    guided = tl.load(song + 1) == 2
    seed = tl.load(song + 2)
    k = tl.load(song + 3)
    frame = tl.load(song + 4)
    scale = tl.load(floats_ptr + first * 2)[:, None]
    temperature = tl.load(floats_ptr + first * 2 + 1)[:, None]
    cond = (first * row_stride)[:, None]
    cfg = (guided.to(tl.int64) * row_stride)[:, None]
    return owner, seed, k, frame, scale, temperature, cond, cfg


@triton.jit
def _guided(logits_ptr, cols, cond, cfg, valid, scale, temperature):
    """A [ROWS, chunk] tile of each row's song's guided logits over its temperature, in float32
    (-0.0 made +0.0, which orders equal to it): rows `cond` and, with guidance (`cfg`, the
    offset of the unconditional row, > 0), `cond + cfg`."""
    x = tl.load(logits_ptr + cond + cols, mask=valid, other=0.0).to(tl.float32)
    guided = valid & (cfg > 0)
    u = tl.load(logits_ptr + cond + cfg + cols, mask=guided, other=0.0).to(tl.float32)
    x = tl.where(guided, u + (x - u) * scale, x)
    return x / temperature + 0.0


@triton.jit
def _order_key(x):
    """Order-preserving uint32 keys of float32 values: the sign bit set for positive values,
    every bit flipped for negative ones."""
    bits = x.to(tl.uint32, bitcast=True)
    return bits ^ ((x.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True) | 0x80000000)


@triton.jit
def _first_best(best, best_at, vocab):
    """Per row, the first column holding the row's largest value (torch's argmax rule)."""
    top = tl.max(best, axis=1)
    return tl.min(tl.where(best == top[:, None], best_at, vocab), axis=1)


@triton.jit
def _kth_key(logits_ptr, lanes, cond, cfg, scale, temperature, k, vocab, ROWS, BLOCK):
    """Each row's k-th largest key of its guided logits over its temperature (k clamped to
    1..vocab), exactly, by radix select: four passes over the row, each counting by their next 8
    bits (most significant first) the keys whose higher bits are those found so far, then keeping
    the digit the k-th largest has. Exact, so the caller's `key >= kth` keeps every tie at the
    k-th value, as in the plain sampler."""
    k = tl.minimum(tl.maximum(k, 1), vocab).to(tl.int32)
    bins = tl.arange(0, 256)[None, :]
    # tl.histogram takes one flat tensor: row r's digits count in bins 256 r.. (ROWS > 1 only in
    # the interpreter).
    slots = tl.arange(0, ROWS)[:, None] * 256
    prefix = tl.zeros((ROWS,), tl.uint32)
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros((ROWS, 256), tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + lanes
            valid = cols < vocab
            key = _order_key(_guided(logits_ptr, cols, cond, cfg, valid, scale, temperature))
            match = tl.broadcast_to(valid, (ROWS, BLOCK))
            if shift < 24:  # the digits above this one must be those found
                match = match & ((key >> (shift + 8)) == (prefix[:, None] >> (shift + 8)))
            digit = ((key >> shift) & 255).to(tl.int32) + slots
            flat = tl.histogram(
                tl.reshape(digit, (ROWS * BLOCK,)), ROWS * 256, tl.reshape(match, (ROWS * BLOCK,))
            )
            hist += tl.reshape(flat, (ROWS, 256))
        # Keys with this digit or a larger one: the k-th largest's digit is the largest digit
        # with at least k (digit 0 has every matching key, k or more).
        at_least = tl.sum(hist, axis=1)[:, None] - tl.cumsum(hist, axis=1) + hist
        found = tl.max(tl.where(at_least >= k[:, None], bins, 0), axis=1)
        k -= tl.sum(tl.where(bins > found[:, None], hist, 0), axis=1)
        prefix |= found.to(tl.uint32) << shift
    return prefix


@triton.jit
def _gumbel(seed, cols, frame, codebook):
    """Gumbel noise of each column of a [ROWS, chunk] tile: Philox counters (column, the song's
    frame, the codebook, 0) under the song's seed."""
    c0 = cols.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + (frame & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = zero + codebook.to(tl.uint32)
    bits = tl.philox(seed[:, None] + zero.to(tl.int64), c0, c1, c2, zero)[0]
    return -tl.log(-tl.log(tl.random.uint_to_uniform_float(bits)))


# The codebook is a value, not a specialisation: one compile serves all eight.
@triton.jit(do_not_specialize=["codebook", "n_rows"])
def _fused_sample_kernel(
    logits_ptr,
    row_stride,
    out_ptr,
    ints_ptr,
    floats_ptr,
    vocab,
    n_rows,
    codebook,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    owner, seed, k, frame, scale, temperature, cond, cfg = _settings(
        ints_ptr, floats_ptr, rows, row_ok, row_stride
    )
    lanes = tl.arange(0, BLOCK)[None, :]
    best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)  # running max per lane
    best_at = tl.zeros((ROWS, BLOCK), tl.int32)  # and its column
    # Plain argmax of the guided logits (the temperature does not move it): top-1 rows.
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        valid = cols < vocab
        x = _guided(logits_ptr, cols, cond, cfg, valid, scale, 1.0)
        better = valid & (x > best)  # strictly: the first of equal values wins
        best_at = tl.where(better, cols, best_at)
        best = tl.where(better, x, best)
    token = _first_best(best, best_at, vocab)
    if tl.max(tl.where(row_ok, k, 1), axis=0) > 1:  # some row samples
        kth = _kth_key(logits_ptr, lanes, cond, cfg, scale, temperature, k, vocab, ROWS, BLOCK)
        # Gumbel-max over the kept logits: a categorical draw from their softmax.
        best = tl.full((ROWS, BLOCK), float("-inf"), tl.float32)
        best_at = tl.zeros((ROWS, BLOCK), tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + lanes
            valid = cols < vocab
            x = _guided(logits_ptr, cols, cond, cfg, valid, scale, temperature)
            score = x + _gumbel(seed, cols + rows[:, None] * 0, frame, codebook)
            better = valid & (_order_key(x) >= kth[:, None]) & (score > best)
            best_at = tl.where(better, cols, best_at)
            best = tl.where(better, score, best)
        token = tl.where(k > 1, _first_best(best, best_at, vocab), token)
    tl.store(out_ptr + rows, tl.where(owner >= 0, token, 0).to(tl.int64), mask=row_ok)


def new_state(rows: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(state_ints, state_floats) for `fused_sample` over `rows` rows, every row idle."""
    ints = torch.zeros(rows, INTS, dtype=torch.int64, device=device)
    ints[:, 0] = -1
    return ints, torch.ones(rows, FLOATS, dtype=torch.float32, device=device)


def song_state(
    first: int,
    rows: int,
    *,
    seed: int,
    topk: int,
    cfg_scale: float,
    temperature: float,
    frame: int = 0,
) -> tuple[Tensor, Tensor]:
    """The state rows of one song at rows first..first+rows-1, about to draw `frame` (CPU; copy
    them in)."""
    ints = torch.zeros(rows, INTS, dtype=torch.int64)
    ints[:, 0] = first
    ints[0, 1:] = torch.tensor([rows, seed, topk, frame])
    floats = torch.tensor([[cfg_scale, temperature]] * rows, dtype=torch.float32)
    return ints, floats


def _launch(
    logits, state_ints, state_floats, out, codebook: int, interpreted: bool = INTERPRETED
) -> tuple[tuple, tuple, dict]:
    """(grid, args, meta-parameters) of one launch: shared by the op and the ahead-of-time
    compile test (`kernels/aot.py`), which passes tensor stand-ins of the same shapes."""
    n_rows, vocab = out.shape[0], logits.shape[1]
    if interpreted:
        block = triton.next_power_of_2(vocab)
        rows = min(triton.next_power_of_2(n_rows), TILE_LIMIT // block)
    else:
        rows, block = 1, min(triton.next_power_of_2(vocab), MAX_BLOCK)
    args = (logits, logits.stride()[0], out, state_ints, state_floats, vocab, n_rows, codebook)
    meta = {"ROWS": rows, "BLOCK": block}
    meta["num_warps"] = 8 if block >= MAX_BLOCK else 4
    return (triton.cdiv(n_rows, rows),), args, meta


@torch.library.custom_op("heartmula_rt::fused_sample", mutates_args=())
def fused_sample(logits: Tensor, state_ints: Tensor, state_floats: Tensor, codebook: int) -> Tensor:
    """Raw logits [R, V] of a batch's rows → each row's token, int64 [R, 1] (0 on idle rows):
    its song's draw for `codebook` at the song's frame (`new_state`, `song_state`)."""
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    out = torch.empty(logits.shape[0], 1, dtype=torch.int64, device=logits.device)
    grid, args, meta = _launch(logits, state_ints, state_floats, out, codebook)
    _fused_sample_kernel[grid](*args, **meta)
    return out


@fused_sample.register_fake
def _(logits: Tensor, state_ints: Tensor, state_floats: Tensor, codebook: int) -> Tensor:
    return logits.new_empty(logits.shape[0], 1, dtype=torch.int64)


def aot_launches() -> list[tuple[str, object, tuple, dict]]:
    """Every launch shape the engines and tests use, as a GPU launches them, for the
    ahead-of-time compile test: the 3B and the tiny fixture's audio vocabularies and the tests'
    small ones, bf16 and float32 logits (rows and guidance are values, not specialisations)."""
    from triton.runtime.jit import MockTensor

    launches = []
    for vocab in (8197, 1029, 1000, 300, 7):
        for dtype in (torch.bfloat16, torch.float32):
            logits = MockTensor(dtype, [8, vocab])
            ints = MockTensor(torch.int64, [8, INTS])
            floats = MockTensor(torch.float32, [8, FLOATS])
            out = MockTensor(torch.int64, [8, 1])
            _, args, meta = _launch(logits, ints, floats, out, 3, False)
            what = f"vocab {vocab}, {str(dtype)[6:]}"
            launches.append((what, _fused_sample_kernel, args, meta))
    return launches
