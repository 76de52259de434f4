"""q/k/v and w1/w3 merged into one matmul each (lm.merge_projections), as every pipeline loads
an LM: the plain path computes what the parts computed, bit for bit on the CPU, in every
quantization format; the streamed quantized load and its cache hold the merged layout; LoRA
adapters keyed by the parts' names merge into and run per row over the merged matmuls."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from heartmula_rt.quant import cache as quant_cache
from heartmula_rt.quant.formats import quantize_model

from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.folder import LM_DIR
from heartmula_rt.model.lm import HeartMuLa, merge_projections, merged_part
from heartmula_rt.model.lora import LoraAdapter, LoraModule, merge_lora
from heartmula_rt.model.lora_rows import apply_lora_rows
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import PlainEngine


def _outputs(model: HeartMuLa) -> list[torch.Tensor]:
    """A prompt over the backbone, a decode step at device-held positions and a decoder step."""
    g = torch.Generator().manual_seed(0)
    dim = model.config.backbone.embed_dim
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        prompt = model.backbone(torch.randn(2, 6, dim, generator=g), 0, cache.backbone)
        step = model.backbone(
            torch.randn(2, 1, dim, generator=g), torch.tensor([6, 6]), cache.backbone, 16
        )
        logits = model.decoder_step(torch.randn(2, 2, dim, generator=g), 0, cache, 1)
    return [prompt, step, logits, cache.backbone[-1].k, cache.backbone[-1].v]


def test_merging_replaces_the_parts(tiny_lm: HeartMuLa) -> None:
    merged = merge_projections(copy.deepcopy(tiny_lm))
    attn, mlp = merged.backbone.layers[0].attn, merged.decoder.layers[0].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "w1")
    f = tiny_lm.config.backbone
    assert attn.qkv_proj.weight.shape == ((f.num_heads + 2 * f.num_kv_heads) * f.head_dim, 64)
    plain = tiny_lm.backbone.layers[0].attn
    parts = [plain.q_proj.weight, plain.k_proj.weight, plain.v_proj.weight]
    assert torch.equal(attn.qkv_proj.weight, torch.cat(parts))
    name, rows = merged_part(merged, "decoder.layers.0.mlp.w3")
    assert name == "decoder.layers.0.mlp.w13"
    assert torch.equal(mlp.w13.weight[rows], tiny_lm.decoder.layers[0].mlp.w3.weight)
    assert merged_part(tiny_lm, "decoder.layers.0.mlp.w3") is None  # not merged there
    assert merge_projections(merged) is merged  # a no-op once merged


@pytest.mark.parametrize("quant", ["none", "int8", "nf4", "int4"])
def test_the_merged_plain_path_computes_the_parts_bit_for_bit(
    tiny_lm: HeartMuLa, quant: str
) -> None:
    parts = quantize_model(copy.deepcopy(tiny_lm), quant)
    merged = quantize_model(merge_projections(copy.deepcopy(tiny_lm)), quant)
    for a, b in zip(_outputs(parts), _outputs(merged), strict=True):
        assert torch.equal(a, b)


def test_merged_greedy_frames_equal_the_parts(tiny_lm: HeartMuLa, tokenizer, gen) -> None:
    prompt = build_prompt(tokenizer, gen, "piano,happy", "[verse]\nla la la\n")
    sampling = SamplingParams(max_frames=8, topk=1, cfg_scale=1.5)
    merged = merge_projections(copy.deepcopy(tiny_lm))
    frames = [PlainEngine(m, gen).generate_frames(prompt, sampling) for m in (tiny_lm, merged)]
    assert torch.equal(frames[0], frames[1])


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_the_streamed_quantized_load_and_its_cache_hold_the_merged_layout(
    tiny_ckpt: Path, tmp_path: Path, mode: str
) -> None:
    expected = quantize_model(merge_projections(load_lm(tiny_ckpt / LM_DIR)[0]), mode)
    cpu = torch.device("cpu")
    kw = {"device": cpu, "dtype": torch.float32, "cache_dir": tmp_path}
    made = quant_cache.load_quantized_lm(tiny_ckpt / LM_DIR, mode, **kw)  # quantized, cached
    again = quant_cache.load_quantized_lm(tiny_ckpt / LM_DIR, mode, **kw)  # from the cache
    assert quant_cache.CACHE_FORMAT == 2
    state = expected.state_dict()
    assert any(".qkv_proj." in k for k in state) and not any(".q_proj." in k for k in state)
    for model in (made, again):
        assert model.state_dict().keys() == state.keys()
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[key]), key


def _adapter(model: HeartMuLa, names: list[str], seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i, name in enumerate(names):
        target, rows = merged_part(model, name) or (name, slice(None))
        weight = model.get_submodule(target).weight[rows]
        r = 2 + i % 3
        modules[name] = LoraModule(
            0.05 * torch.randn(r, weight.shape[1], generator=g),
            0.05 * torch.randn(weight.shape[0], r, generator=g),
            scaling=0.5,
        )
    return LoraAdapter(f"a{seed}", Path(f"a{seed}"), modules, f"fp{seed}")


TARGETS = [
    "backbone.layers.0.attn.q_proj",
    "backbone.layers.0.attn.v_proj",
    "backbone.layers.1.mlp.w3",
    "backbone.layers.1.mlp.w2",
    "decoder.layers.0.attn.k_proj",
    "decoder.layers.0.mlp.w1",
    "decoder.layers.0.mlp.w3",
]


def test_a_lora_merges_into_the_parts_rows(tiny_lm: HeartMuLa) -> None:
    adapter = _adapter(tiny_lm, TARGETS, seed=1)
    before = merge_projections(merge_lora(copy.deepcopy(tiny_lm), [adapter]))
    after = merge_lora(merge_projections(copy.deepcopy(tiny_lm)), [adapter])
    for key, tensor in before.state_dict().items():
        assert torch.equal(tensor, after.state_dict()[key]), key


def test_per_row_loras_over_merged_matmuls_equal_those_over_the_parts(
    tiny_lm: HeartMuLa,
) -> None:
    adapters = [_adapter(tiny_lm, TARGETS, seed=2), _adapter(tiny_lm, TARGETS[2:], seed=3)]
    parts, merged = copy.deepcopy(tiny_lm), merge_projections(copy.deepcopy(tiny_lm))
    outputs = []
    for model in (parts, merged):
        rows = apply_lora_rows(model, adapters, rows=2)
        rows.assign(0, 1, "a2")
        rows.assign(1, 1, "a3", scale=0.5)
        outputs.append(_outputs(model))
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    wrapped = merged.get_submodule("backbone.layers.1.mlp.w13")
    assert type(wrapped).__name__ == "RowLoraLinear"
