"""The fused Triton sampler against the plain one (SPEC §4), on the CPU via TRITON_INTERPRET: a
batch of songs in one launch, each with its own rows, settings, seed and frame."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from heartmula_rt.model.sampling import cfg_mix, sample_topk

sampling = pytest.importorskip("heartmula_rt.kernels.sampling", reason="needs triton")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
# On a GPU machine the kernel runs compiled; elsewhere under Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _state(songs: list[dict], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """State of `rows` rows holding `songs` (each: first, rows, seed, topk, cfg_scale,
    temperature, and optionally frame)."""
    ints, floats = sampling.new_state(rows, DEVICE)
    for song in songs:
        first, count = song["first"], song["rows"]
        settings = {k: song[k] for k in ("seed", "topk", "cfg_scale", "temperature")}
        song_ints, song_floats = sampling.song_state(
            first, count, **settings, frame=song.get("frame", 0)
        )
        ints[first : first + count] = song_ints.to(DEVICE)
        floats[first : first + count] = song_floats.to(DEVICE)
    return ints, floats


def _song(first: int, rows: int = 2, **settings) -> dict:
    return {"first": first, "rows": rows, "seed": 0, "topk": 50, "cfg_scale": 1.5,
            "temperature": 1.0, **settings}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk1_is_the_plain_argmax_for_every_song(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        logits = (3 * torch.randn(6, 8197, generator=g)).to(DEVICE, dtype)
        if trial % 2:  # a tie for the maximum: every song picks the first
            logits[:, 4000] = logits[:, 17] = logits.max() + 1
        # A guided song in rows 0-1, an unguided one in row 2, row 3 idle, another guided one
        # at rows 4-5 with its own scale.
        songs = [
            _song(0, topk=1),
            _song(2, 1, topk=1, cfg_scale=1.0),
            _song(4, topk=1, cfg_scale=3.0),
        ]
        tokens = sampling.fused_sample(logits, *_state(songs, 6), trial)
        assert tokens.shape == (6, 1) and tokens.dtype == torch.int64
        expected = [
            sample_topk(cfg_mix(logits[0:1], logits[1:2], 1.5), 1, 1.0),
            sample_topk(logits[2:3], 1, 1.0),
            torch.zeros(1, 1, dtype=torch.long, device=DEVICE),
            sample_topk(cfg_mix(logits[4:5], logits[5:6], 3.0), 1, 1.0),
        ]
        rows = [0, 0, 1, 2, 3, 3]  # each row's entry of `expected`
        assert torch.equal(tokens, torch.cat([expected[i] for i in rows]))


def _expected_probs(logits: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    scaled = logits.double() / temperature
    kth = scaled.topk(topk).values[-1]
    return torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1).cpu()


def _draws(rows: torch.Tensor, songs: int, topk: int, temperature: float) -> torch.Tensor:
    """One draw each of `songs` guided songs (seeds 0..songs-1) from rows [cond, uncond]."""
    logits = rows.repeat(songs, 1)
    settings = {"topk": topk, "temperature": temperature}
    state = _state([_song(2 * i, seed=i, **settings) for i in range(songs)], 2 * songs)
    tokens = sampling.fused_sample(logits, *state, 0)[:, 0].cpu()
    assert torch.equal(tokens[0::2], tokens[1::2])  # a song's two rows draw its one token
    return tokens[0::2]


def test_draws_follow_the_top_k_distribution() -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(2, 300, generator=g).to(DEVICE)
    # A tie at the k-th value: both tied tokens must stay drawable.
    mixed = cfg_mix(rows[:1], rows[1:], 1.5)[0]
    kth, outside = mixed.topk(50).indices[49], mixed.argmin()
    rows[:, outside] = rows[:, kth]
    mixed = cfg_mix(rows[:1], rows[1:], 1.5)[0]
    probs = _expected_probs(mixed, 50, 0.5)
    assert int((probs > 0).sum()) == 51

    draws = _draws(rows, 4096, topk=50, temperature=0.5)
    counts = torch.bincount(draws, minlength=300).double()
    assert counts[probs == 0].sum() == 0  # nothing outside the top k
    kept = probs > 0
    assert chisquare(counts[kept], probs[kept] * counts.sum()).pvalue > 1e-3
    # The test has power: the same draws are far from the T=0.6 distribution.
    wrong = _expected_probs(mixed, 50, 0.6)[kept]
    assert chisquare(counts[kept], wrong * counts.sum()).pvalue < 1e-6


def test_topk_at_least_vocab_keeps_every_token() -> None:
    rows = torch.zeros(2, 7, device=DEVICE)  # uniform over 7 tokens
    counts = torch.bincount(_draws(rows, 2048, topk=50, temperature=1.0), minlength=7)
    assert chisquare(counts.double()).pvalue > 1e-3


def test_a_draw_depends_on_the_songs_seed_frame_and_codebook_only() -> None:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def token(first: int = 0, rows: int = 8, codebook: int = 0, **song) -> int:
        padded = torch.zeros(rows, 1000, device=DEVICE)
        padded[first : first + 2] = logits
        state = _state([_song(first, **song)], rows)
        return int(sampling.fused_sample(padded, *state, codebook)[first])

    seeds = [token(seed=s) for s in range(12)]
    assert len(set(seeds)) > 6  # the seed is read from memory
    assert token(seed=3) == seeds[3]  # and repeats
    assert [token(seed=3, first=4), token(seed=3, first=2, rows=4)] == [seeds[3]] * 2
    frames = [token(seed=3, frame=f) for f in range(12)]
    codebooks = [token(seed=3, codebook=k) for k in range(8)]
    assert len(set(frames)) > 6 and len(set(codebooks)) > 4


def test_settings_are_read_from_memory() -> None:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ints, floats = _state([_song(0, topk=1)], 2)
    floats[0, 0] = 3.0
    token = sampling.fused_sample(logits, ints, floats, 0)
    assert torch.equal(token[:1], cfg_mix(logits[:1], logits[1:], 3.0).argmax(-1, keepdim=True))


def test_compiles_without_graph_breaks() -> None:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ints, floats = _state([_song(0, seed=2)], 2)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def two_draws(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([sampling.fused_sample(x, ints, floats, k) for k in (0, 1)])

    eager = torch.cat([sampling.fused_sample(logits, ints, floats, k) for k in (0, 1)])
    assert torch.equal(two_draws(logits), eager)


def _chunked(logits: torch.Tensor, ints, floats, block: int, codebook: int = 0) -> torch.Tensor:
    """The kernel launched as on a GPU (one program per row), reading rows `block` at a time."""
    out = torch.empty(logits.shape[0], 1, dtype=torch.int64, device=logits.device)
    grid, args, meta = sampling._launch(logits, ints, floats, out, codebook, interpreted=False)
    meta.update(BLOCK=block)
    sampling._fused_sample_kernel[grid](*args, **meta)
    return out


@pytest.mark.parametrize("topk", [1, 5, 50])
def test_chunked_rows_draw_what_one_tile_draws(topk: int) -> None:
    """GPU launches read each row in chunks, one program per row; the tokens must not depend on
    the layout."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 150, generator=g).to(DEVICE)
    logits[:, 130] = logits[:, 20] = logits.max() + 1  # a tie for the maximum across chunks
    songs = [_song(0, topk=topk, temperature=0.8), _song(2, 1, topk=topk, cfg_scale=1.0)]
    for seed in range(2):
        state = _state([dict(s, seed=seed) for s in songs], 5)
        whole = sampling.fused_sample(logits, *state, 0)
        assert torch.equal(_chunked(logits, *state, block=64), whole)


@triton.jit
def _draw_inputs_kernel(
    logits_ptr, row_stride, ints_ptr, floats_ptr, vocab, codebook, x_ptr, noise_ptr, kth_ptr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Of each row's song, through the fused kernel's own functions: its guided logits over its
    temperature, their Gumbel noise, and the k-th largest of their keys (one program a row)."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    _, seed, k, frame, scale, temperature, cond, cfg = sampling._settings(
        ints_ptr, floats_ptr, rows, rows >= 0, row_stride
    )
    cols = tl.arange(0, BLOCK)[None, :]
    valid = cols < vocab
    at = rows[:, None] * vocab + cols
    x = sampling._guided(logits_ptr, cols, cond, cfg, valid, scale, temperature)
    tl.store(x_ptr + at, x, mask=valid)
    noise = sampling._gumbel(seed, cols + rows[:, None] * 0, frame, codebook)
    tl.store(noise_ptr + at, noise, mask=valid)
    kth = sampling._kth_key(logits_ptr, cols, cond, cfg, scale, temperature, k, vocab, 1, BLOCK)
    tl.store(kth_ptr + rows, kth.to(tl.int64))


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """The order-preserving uint32 keys of float32 values, as int64."""
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)


def _rows_of(n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """`n` rows of logits: Gaussian, a handful of values (heavy ties), or few values with masked
    (-inf) entries, by thirds."""
    normal = 3 * torch.randn(n, vocab, generator=g)
    few = torch.randint(-3, 4, (n, vocab), generator=g).float()
    masked = few.masked_fill(torch.rand(n, vocab, generator=g) < 0.4, float("-inf"))
    kind = torch.arange(n)[:, None] % 3
    return torch.where(kind == 0, normal, torch.where(kind == 1, few, masked))


@pytest.mark.parametrize(("vocab", "block"), [(300, None), (300, 128), (8197, None)])
def test_radix_select_keeps_the_top_k_rule(vocab: int, block: int | None) -> None:
    """On many rows, heavy ties and masked entries among them, with top-k from 1 to past the
    vocabulary: the k-th largest key is torch.topk's, and each token is the Gumbel-max over the
    entries at or above it with the kernel's own noise (the rule the bisection kept), in one tile
    and chunked."""
    g = torch.Generator().manual_seed(11)
    songs, rows = [], 0
    for i in range(36):
        topk = [1, 2, 3, 50, vocab - 1, vocab, vocab + 7][i % 7] if i < 28 else None
        topk = topk or int(torch.randint(2, vocab, (1,), generator=g))
        count = 1 + i % 2
        settings = {"seed": i, "topk": topk, "cfg_scale": 1.0 + count * 0.5, "frame": i}
        # Greedy rows skip the temperature (the argmax of the raw guided logits).
        settings["temperature"] = 1.0 if topk == 1 else [0.7, 1.0, 1.3][i % 3]
        songs.append(_song(rows, count, **settings))
        rows += count + (i % 5 == 0)  # an idle row now and then
    logits = _rows_of(rows, vocab, g)
    for song in songs[1::2]:  # masked in cond rows only: guidance makes no NaN
        logits[song["first"] + 1].nan_to_num_(neginf=0.0)
    logits = logits.to(DEVICE)
    state = _state(songs, rows)
    codebook = 5

    x = torch.empty(rows, vocab, device=DEVICE)
    noise, kth = torch.empty_like(x), torch.empty(rows, dtype=torch.int64, device=DEVICE)
    args = (logits, logits.stride(0), *state, vocab, codebook, x, noise, kth)
    _draw_inputs_kernel[(rows,)](*args, BLOCK=triton.next_power_of_2(vocab))
    x, noise, kth, ints = x.cpu(), noise.cpu(), kth.cpu(), state[0].cpu()

    keys = _order_keys(x)
    expected = torch.zeros(rows, 1, dtype=torch.int64)
    for song in songs:
        first, topk = song["first"], song["topk"]
        k = min(topk, vocab)
        assert kth[first] == keys[first].topk(k).values[-1]
        kept = keys[first] >= kth[first]
        scores = torch.where(kept, x[first] + noise[first], float("-inf"))
        token = x[first].argmax() if topk == 1 else scores.argmax()
        expected[first : first + song["rows"]] = token
    assert (ints[:, 0] == -1).sum() == 8  # the idle rows draw 0
    if block is None:
        tokens = sampling.fused_sample(logits, *state, codebook)
    else:
        tokens = _chunked(logits, *state, block=block, codebook=codebook)
    assert torch.equal(tokens.cpu(), expected)
