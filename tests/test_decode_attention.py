"""The split-key decode attention (kernels/decode_attention.py) against SDPA with the static
engine's mask, a row's result bit for bit whatever the cache length and the other rows, and the
LM's attention and static engine with the kernel as their fast path.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heartmula_rt.model import lm
from heartmula_rt.model.lm import attention_mask

pytest.importorskip("triton", reason="the decode attention is a Triton kernel")
from heartmula_rt.kernels.decode_attention import CHUNK, decode_attention

pytestmark = pytest.mark.kernels  # run_gpu.sh runs them on the GPU too
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(
    rows: int, heads: int, kv_heads: int, dim: int, capacity: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, dim, generator=g)
    k = torch.randn(rows, kv_heads, capacity, dim, generator=g)
    v = torch.randn(rows, kv_heads, capacity, dim, generator=g)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The plain path of lm.Attention for one query per row at device-held positions."""
    b, heads, dim = q.shape
    mask = attention_mask(pos, 1, k.shape[2], dtype=q.dtype, device=q.device)
    y = F.scaled_dot_product_attention(q.view(b, k.shape[1], -1, dim), k, v, attn_mask=mask)
    return y.reshape(b, heads, dim)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(4, 2, 16), (6, 2, 24), (3, 3, 32)],  # the tiny backbone; the 3B's group of 3; no GQA
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_equals_sdpa(heads, kv_heads, dim, dtype) -> None:
    """Rows at positions in the first chunk, on a chunk's last and first key, and past three
    chunks (the cache's last position); 24-wide heads exercise the head-size mask."""
    capacity = 3 * CHUNK + 20
    q, k, v = _inputs(5, heads, kv_heads, dim, capacity, dtype)
    pos = torch.tensor([0, 37, CHUNK - 1, CHUNK, capacity - 1], device=DEVICE)
    got = decode_attention(q, k, v, pos)
    assert got.shape == q.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, _sdpa(q, k, v, pos), rtol=1e-5, atol=1e-6)
    else:  # against float32 SDPA: the kernel rounds only its probabilities and its result
        expected = _sdpa(q.float(), k.float(), v.float(), pos)
        torch.testing.assert_close(got.float(), expected, rtol=2**-6, atol=2**-7)


def test_a_rows_result_does_not_depend_on_the_cache_length_or_other_rows() -> None:
    """One row's query, keys and values, alone over a cache of 3 chunks and in a batch of 4 over
    a longer cache (more masked chunks after it, other rows further on): equal bit for bit. The
    keys past its position hold NaN, which would poison any read of them."""
    heads, kv_heads, dim, capacity = 6, 2, 16, 3 * CHUNK
    q, k, v = _inputs(1, heads, kv_heads, dim, capacity, torch.float32)
    pos = 2 * CHUNK + 5
    k[:, :, pos + 1 :], v[:, :, pos + 1 :] = float("nan"), float("nan")
    alone = decode_attention(q, k, v, torch.tensor([pos], device=DEVICE))
    assert alone.isfinite().all()

    big_q, big_k, big_v = _inputs(4, heads, kv_heads, dim, 6 * CHUNK + 10, torch.float32, seed=1)
    big_q[2], big_k[2, :, :capacity], big_v[2, :, :capacity] = q[0], k[0], v[0]
    big_pos = torch.tensor([6 * CHUNK + 9, 0, pos, 4 * CHUNK], device=DEVICE)
    among = decode_attention(big_q, big_k, big_v, big_pos)
    assert torch.equal(among[2], alone[0])
    # A view of the first positions of the longer cache (the engine's kv_len) reads the same.
    at_pos = torch.full_like(big_pos, pos)
    shorter = decode_attention(big_q, big_k[:, :, : pos + 1], big_v[:, :, : pos + 1], at_pos)
    assert torch.equal(shorter[2], alone[0])


@pytest.fixture
def split_on_cpu(monkeypatch) -> list[int]:
    """The split kernel as lm.Attention's path on this device too; counts its calls."""
    from heartmula_rt.kernels import decode_attention as kernels

    calls: list[int] = []
    op = kernels.decode_attention

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(lm, "SPLIT_DECODE_DEVICES", lm.SPLIT_DECODE_DEVICES | {DEVICE.type})
    monkeypatch.setattr(kernels, "decode_attention", counted)
    return calls


def test_the_static_engine_with_the_split_kernel(
    split_on_cpu, monkeypatch, tiny_lm, gen, tokenizer
) -> None:
    """The static engine's steps through the kernel: a guided song makes the same frames in a
    one-song batch (which reads its cache only to its bucket's end) as in a batch that reads the
    whole cache, and alone in 3 rows as beside another song (SDPA would need both batches to
    read the whole cache for that); its greedy frames are the SDPA path's."""
    from heartmula_rt.model.prompt import build_prompt
    from heartmula_rt.request import SamplingParams
    from heartmula_rt.runtime.engine import StaticEngine
    from heartmula_rt.runtime.scheduler import Scheduler, SongRun

    model = tiny_lm.to(DEVICE)
    engine = StaticEngine(model, gen, graphs=False, bucket=16, sync_every=3)
    song = (
        build_prompt(tokenizer, gen, "piano,happy", "[Verse]\nhello\n"),
        SamplingParams(max_frames=3, topk=1, cfg_scale=1.5, seed=1),
    )
    other = (
        build_prompt(tokenizer, gen, "rock", "[Verse]\n" + "la la la\n" * 6),
        SamplingParams(max_frames=2, topk=20, temperature=1.3, cfg_scale=1.0, seed=2),
    )

    def run(rows: int, songs: list[tuple], one_song: bool = False) -> torch.Tensor:
        scheduler = Scheduler(rows, 96, one_song=one_song)
        runs = [scheduler.submit(SongRun(*s)) for s in songs]
        engine.run(scheduler)
        return torch.stack(runs[0].frames, dim=1)

    bucketed = run(2, [song], one_song=True)
    assert split_on_cpu and bucketed.shape[1] == 4
    assert torch.equal(run(2, [song]), bucketed)
    assert torch.equal(run(3, [song, other]), run(3, [song]))
    calls = len(split_on_cpu)
    monkeypatch.setattr(lm, "SPLIT_DECODE_DEVICES", frozenset())  # SDPA
    assert torch.equal(run(2, [song], one_song=True), bucketed)
    assert len(split_on_cpu) == calls


# -- rope_attention: RoPE, the KV-cache write and the attention in one kernel ------------------


def _new_step(rows: int, t: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed=0):
    """q [B, T, H, D], k, v [B, T, H_kv, D] as views of one merged q/k/v output, and a cache of
    4 chunks (random where nothing is written)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, t, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    shape = (rows, kv_heads, 4 * CHUNK, dim)
    cache = [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2)]
    return (
        q.view(rows, t, heads, dim),
        k.view(rows, t, kv_heads, dim),
        v.view(rows, t, kv_heads, dim),
        *cache,
    )


def _attend(rope, step, at, kv_len, dim: int):
    """`rope.attend` of one step on a copy of its cache: (output, keys, values)."""
    from heartmula_rt.model.lm import AttentionMask, KVCache, RotaryEmbedding

    q, k, v, k_cache, v_cache = step
    cache = KVCache(k_cache.clone(), v_cache.clone())
    cos, sin = RotaryEmbedding(dim, 8 * CHUNK, 500000.0, 32.0).tables(DEVICE)
    if isinstance(at, torch.Tensor):
        cos, sin = cos[at], sin[at]
    else:
        cos, sin = cos[at : at + q.shape[1]], sin[at : at + q.shape[1]]
    mask = AttentionMask(at, q.shape[1], kv_len, q.dtype, q.device)
    return rope.attend(q, k, v, at, cos, sin, cache, kv_len, mask), cache.k, cache.v


@pytest.fixture
def fused_attention_here(monkeypatch) -> list[int]:
    """The fused decode attention as the fused twin's path on this device too; counts calls."""
    monkeypatch.setattr(lm, "SPLIT_DECODE_DEVICES", lm.SPLIT_DECODE_DEVICES | {DEVICE.type})
    from heartmula_rt.model.fused import FusedRope

    FusedRope()  # registers the op
    calls: list[int] = []
    op = torch.ops.heartmula_rt.rope_attention

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(torch.ops.heartmula_rt, "rope_attention", counted)
    return calls


class _Unfused:
    """The fused RoPE with cache write, then the split-key kernel: what the one launch replaces."""

    def __new__(cls):
        from heartmula_rt.model.fused import FusedRope
        from heartmula_rt.model.lm import Rope

        class Unfused(FusedRope):
            attend = Rope.attend

        return Unfused()


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 16), (6, 2, 24), (8, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_attention_is_the_two_launches_it_replaces(
    fused_attention_here, heads, kv_heads, dim, dtype
) -> None:
    """At device-held positions (in the first chunk, on a chunk's edges, past two chunks): the
    output and the whole cache, bit for bit."""
    from heartmula_rt.model.fused import FusedRope

    step = _new_step(4, 1, heads, kv_heads, dim, dtype)
    pos = torch.tensor([3, CHUNK - 1, CHUNK, 2 * CHUNK + 7], device=DEVICE)
    fused = _attend(FusedRope(), step, pos, 3 * CHUNK, dim)
    assert fused_attention_here == [1]
    unfused = _attend(_Unfused(), step, pos, 3 * CHUNK, dim)
    assert fused_attention_here == [1] and fused[0].shape == (4, 1, heads, dim)
    for got, expected in zip(fused, unfused, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(("t", "start"), [(1, 5), (2, 0), (2, CHUNK - 2), (1, 2 * CHUNK + 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_attention_at_a_start_equals_the_plain_path(
    fused_attention_here, t: int, start: int, dtype
) -> None:
    """Every row at start.. (the depth decoder's steps, two positions in its first; one past a
    chunk: the combination without positions): the fused RoPE and cache write then SDPA, to
    the rounding of the attention (bf16: the kernel rounds its probabilities, as flash
    attention does); the whole cache bit for bit."""
    from heartmula_rt.model.fused import FusedRope

    heads, kv_heads, dim = 8, 4, 32  # the 3B's depth decoder's group of 2
    step = _new_step(3, t, heads, kv_heads, dim, dtype)
    got, k_got, v_got = _attend(FusedRope(), step, start, None, dim)
    assert fused_attention_here == [1]
    expected, k_expected, v_expected = _attend(_Unfused(), step, start, None, dim)
    assert got.shape == (3, t, heads, dim)
    f32 = dtype == torch.float32
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if f32 else {"rtol": 2**-6, "atol": 2**-7}
    torch.testing.assert_close(got, expected, **tolerance)
    assert torch.equal(k_got, k_expected) and torch.equal(v_got, v_expected)


def test_rope_attention_of_a_row_does_not_depend_on_the_batch(fused_attention_here) -> None:
    """A row alone over the cache's first 2 chunks and among others over 4: equal bit for bit."""
    from heartmula_rt.model.fused import FusedRope

    heads, kv_heads, dim = 6, 2, 16
    step = _new_step(3, 1, heads, kv_heads, dim, torch.bfloat16)
    pos = torch.tensor([4 * CHUNK - 1, CHUNK + 9, 0], device=DEVICE)
    among, k_among, _ = _attend(FusedRope(), step, pos, 4 * CHUNK, dim)
    one = [x[1:2] for x in step]
    alone, k_alone, _ = _attend(FusedRope(), one, pos[1:2], 2 * CHUNK, dim)
    assert torch.equal(among[1], alone[0]) and torch.equal(k_among[1], k_alone[0])
