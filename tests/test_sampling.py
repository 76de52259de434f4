"""The plain sampler (SPEC §4)."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from heartmula_rt.model.sampling import cfg_mix, sample_topk


def test_topk1_is_argmax() -> None:
    logits = torch.randn(64, 1029, generator=torch.Generator().manual_seed(1))
    for temperature in (0.3, 1.0, 5.0):
        token = sample_topk(logits, 1, temperature, None)
        assert token.shape == (64, 1) and token.dtype == torch.int64
        assert torch.equal(token[:, 0], logits.argmax(-1))


def test_topk_distribution_and_ties() -> None:
    """Draws follow softmax(l / T) over the top k, ties at the k-th included, nothing else."""
    vocab, topk, temperature = 300, 50, 0.7
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0))
    order = logits.argsort(descending=True)
    logits[order[topk]] = logits[order[topk - 1]]  # a tie at the k-th largest survives
    survivors = order[: topk + 1]
    expected = torch.softmax(logits[survivors].double() / temperature, dim=0)

    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(vocab, dtype=torch.long)
    for _ in range(10):
        draws = sample_topk(logits.expand(20_000, vocab), topk, temperature, gen)
        counts += torch.bincount(draws[:, 0], minlength=vocab)
    n = int(counts.sum())
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[survivors] = False
    assert counts[outside].sum() == 0
    assert counts[order[topk]] > 0
    assert chisquare(counts[survivors].numpy(), (expected * n).numpy()).pvalue > 1e-3


def test_generator_makes_draws_reproducible() -> None:
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(2))
    a = sample_topk(logits, 50, 1.0, torch.Generator().manual_seed(7))
    b = sample_topk(logits, 50, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_topk_larger_than_vocab_samples_everything() -> None:
    logits = torch.zeros(20_000, 3)
    draws = sample_topk(logits, 50, 1.0, torch.Generator().manual_seed(3))
    assert set(draws[:, 0].tolist()) == {0, 1, 2}


def test_bf16_logits_are_sampled_in_float32() -> None:
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(4))
    a = sample_topk(logits.bfloat16(), 50, 0.9, torch.Generator().manual_seed(5))
    b = sample_topk(logits.bfloat16().float(), 50, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_cfg_mix() -> None:
    cond, uncond = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(cfg_mix(cond, uncond, 1.5), torch.tensor([[2.5, -2.0]]))
    assert cfg_mix(cond.bfloat16(), uncond.bfloat16(), 1.5).dtype == torch.float32
