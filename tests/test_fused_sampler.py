"""The fused Triton sampler against the plain one (SPEC §4), on the CPU via TRITON_INTERPRET."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from heartmula_rt.sampling import cfg_mix, sample_topk

sampling = pytest.importorskip("heartmula_rt.kernels.sampling", reason="needs triton")
# On a GPU machine the kernel runs compiled; elsewhere under Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _state(seed: int, topk: int, cfg_scale: float = 1.5, temperature: float = 1.0):
    return sampling.new_state(
        seed=seed, topk=topk, cfg_scale=cfg_scale, temperature=temperature, device=DEVICE
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [True, False])
def test_topk1_is_the_plain_argmax(dtype: torch.dtype, cfg: bool) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        logits = (3 * torch.randn(2, 8197, generator=g)).to(DEVICE, dtype)
        if trial % 2:  # a tie for the maximum: both pick the first
            logits[:, 4000] = logits[:, 17] = logits.max() + 1
        ints, floats = _state(trial, topk=1, cfg_scale=1.5)
        token = sampling.fused_sample(logits if cfg else logits[:1], ints, floats, cfg)
        plain = cfg_mix(logits[:1], logits[1:], 1.5) if cfg else logits[:1]
        assert token.shape == (1, 1) and token.dtype == torch.int64
        assert torch.equal(token, sample_topk(plain, 1, 1.0))


def _expected_probs(logits: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    scaled = logits.double() / temperature
    kth = scaled.topk(topk).values[-1]
    return torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1).cpu()


def _draws(rows: torch.Tensor, n: int, topk: int, temperature: float, seed: int) -> torch.Tensor:
    """n draws from CFG rows [cond, uncond], 2048 per launch (each output row of a launch has
    its own Philox counters; each launch advances the counter)."""
    cond, uncond = rows
    logits = torch.cat([cond.expand(2048, -1), uncond.expand(2048, -1)])
    ints, floats = _state(seed, topk, cfg_scale=1.5, temperature=temperature)
    calls = -(-n // 2048)
    draws = [sampling.fused_sample(logits, ints, floats, True)[:, 0] for _ in range(calls)]
    return torch.cat(draws)[:n].cpu()


def test_draws_follow_the_top_k_distribution() -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(2, 300, generator=g).to(DEVICE)
    # A tie at the k-th value: both tied tokens must stay drawable.
    mixed = cfg_mix(rows[:1], rows[1:], 1.5)[0]
    kth, outside = mixed.topk(50).indices[49], mixed.argmin()
    rows[:, outside] = rows[:, kth]
    mixed = cfg_mix(rows[:1], rows[1:], 1.5)[0]
    probs = _expected_probs(mixed, 50, 0.7)
    assert int((probs > 0).sum()) == 51

    draws = _draws(rows, 20_480, topk=50, temperature=0.7, seed=3)
    counts = torch.bincount(draws, minlength=300).double()
    assert counts[probs == 0].sum() == 0  # nothing outside the top k
    kept = probs > 0
    assert chisquare(counts[kept], probs[kept] * counts.sum()).pvalue > 1e-3
    # The test has power: the same draws are far from the T=0.8 distribution.
    wrong = _expected_probs(mixed, 50, 0.8)[kept]
    assert chisquare(counts[kept], wrong * counts.sum()).pvalue < 1e-6


def test_topk_at_least_vocab_keeps_every_token() -> None:
    rows = torch.zeros(2, 7, device=DEVICE)  # uniform over 7 tokens
    counts = torch.bincount(_draws(rows, 7000, topk=50, temperature=1.0, seed=5), minlength=7)
    assert chisquare(counts.double()).pvalue > 1e-3


def test_rng_state_lives_in_device_memory() -> None:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ints, floats = _state(seed=7, topk=50)
    first = [int(sampling.fused_sample(logits, ints, floats, True)) for _ in range(30)]
    assert int(ints[1]) == 30  # the counter advanced once per call
    ints[1] = 0
    again = [int(sampling.fused_sample(logits, ints, floats, True)) for _ in range(30)]
    assert again == first  # a seed repeats
    assert len(set(first)) > 10  # successive calls draw fresh numbers
    ints[0], ints[1] = 8, 0
    other = [int(sampling.fused_sample(logits, ints, floats, True)) for _ in range(30)]
    assert other != first  # the seed is read from memory


def test_settings_are_read_from_memory() -> None:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ints, floats = _state(seed=1, topk=1, cfg_scale=1.5)
    floats[0] = 3.0
    token = sampling.fused_sample(logits, ints, floats, True)
    assert torch.equal(token, cfg_mix(logits[:1], logits[1:], 3.0).argmax(-1, keepdim=True))


def test_compiles_without_graph_breaks() -> None:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ints, floats = _state(seed=2, topk=50)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def two_draws(x: torch.Tensor) -> torch.Tensor:
        a = sampling.fused_sample(x, ints, floats, True)
        return torch.cat([a, sampling.fused_sample(x, ints, floats, True)])

    compiled = two_draws(logits)
    assert int(ints[1]) == 2
    ints[1] = 0
    eager = torch.cat([sampling.fused_sample(logits, ints, floats, True) for _ in range(2)])
    assert torch.equal(compiled, eager)


def _chunked(logits: torch.Tensor, ints, floats, cfg: bool, block: int) -> torch.Tensor:
    """The kernel launched as on a GPU (one program per row), reading rows `block` at a time."""
    n_out = logits.shape[0] // 2 if cfg else logits.shape[0]
    out = torch.empty(n_out, 1, dtype=torch.int64, device=logits.device)
    grid, args, meta = sampling._launch(logits, ints, floats, out, cfg, interpreted=False)
    meta.update(BLOCK=block, ONE_CHUNK=block >= logits.shape[1])
    sampling._fused_sample_kernel[grid](*args, **meta)
    return out


@pytest.mark.parametrize(("topk", "cfg"), [(1, True), (5, False), (50, True)])
def test_chunked_rows_draw_what_one_tile_draws(topk: int, cfg: bool) -> None:
    """GPU launches read each row in chunks, one program per row; the tokens must not depend on
    the layout, and the counter must advance once per call whatever the number of programs."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6 if cfg else 3, 150, generator=g).to(DEVICE)
    logits[:, 130] = logits[:, 20] = logits.max() + 1  # a tie for the maximum across chunks
    for seed in range(2):
        ints, floats = _state(seed, topk, temperature=0.8)
        whole = sampling.fused_sample(logits, ints, floats, cfg)
        ints2, _ = _state(seed, topk, temperature=0.8)
        chunked = _chunked(logits, ints2, floats, cfg, block=64)
        assert torch.equal(chunked, whole)
        assert torch.equal(ints2, ints) and int(ints2[1]) == 1 and int(ints2[3]) == 0
