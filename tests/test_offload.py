"""Layer-wise offload on the CPU (the same code path as on a GPU, without streams): outputs equal
to the plain model's, a ring that never holds more than its slots, and a plan applied to the
tiny checkpoint giving the same frames and audio as the unplanned models."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from heartmula_rt.errors import UserError
from heartmula_rt.memory.offload import HostCopy, OffloadedLayers
from heartmula_rt.memory.placement import Placement
from heartmula_rt.memory.planner import CodecDevicePlan, MemoryPlan
from heartmula_rt.model.checkpoint import load_codec, load_lm
from heartmula_rt.model.folder import CODEC_DIR, LM_DIR
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.model.synthetic import synthetic_gen_config
from heartmula_rt.request import CodecParams, SamplingParams
from heartmula_rt.runtime import loader
from heartmula_rt.runtime.engine import PlainEngine, check_engine_over_streaming
from heartmula_rt.runtime.pipeline import check_streamable

CPU = torch.device("cpu")
TWO_STEPS = CodecParams(num_steps=2)


def linear_stack(n: int, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(8, 8) for _ in range(n))


@pytest.mark.parametrize(
    "slots, resident", [(2, 0), (3, 0), (2, 2), (4, 1), (3, 5), (2, 6), (2, 7)]
)
def test_layers_stream_in_order_through_at_most_slots_buffers(slots: int, resident: int) -> None:
    layers = linear_stack(7)
    expected = [(m.weight.clone(), m.bias.clone()) for m in layers]
    offloaded = OffloadedLayers(layers, CPU, slots=slots, resident=resident)
    assert len(offloaded) == 7
    for _ in range(2):  # a second pass refills the ring from the host copies
        streamed_buffers = set()
        # Compared while the pass is on: the slots are dropped when it ends.
        for i, (layer, (w, b)) in enumerate(zip(offloaded, expected, strict=True)):
            assert torch.equal(layer.weight, w) and torch.equal(layer.bias, b)
            if i >= resident:
                streamed_buffers.add(layer.weight.untyped_storage().data_ptr())
        assert len(streamed_buffers) <= slots


def test_stack_runs_like_the_plain_one() -> None:
    x = torch.randn(3, 8)
    plain = linear_stack(5)
    offloaded = OffloadedLayers(linear_stack(5), CPU, slots=2)
    y_plain, y_off = x, x
    for layer in plain:
        y_plain = torch.tanh(layer(y_plain))
    for layer in offloaded:
        y_off = torch.tanh(layer(y_off))
    assert torch.equal(y_plain, y_off)


def test_slots_are_dropped_after_each_pass() -> None:
    offloaded = OffloadedLayers(linear_stack(4), CPU, slots=2)
    list(offloaded)
    assert all(t.device.type == "meta" for t in offloaded._templates[0].parameters())


def test_refuses_layers_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="identical"):
        OffloadedLayers(nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)]), CPU)
    with pytest.raises(ValueError, match="2 slots"):
        OffloadedLayers(linear_stack(3), CPU, slots=1)


def frugal_plan(num_layers: int, offloaded: int) -> MemoryPlan:
    """The most frugal layout (the smallest budgets'), on the CPU: every placement path runs."""
    return MemoryPlan(
        budget_bytes=0,
        max_frames=0,
        lm_dtype=torch.float32,
        codec_dtype=torch.float32,
        quant="none",
        text_embeddings_on_gpu=False,
        offloaded_lm_layers=offloaded,
        num_backbone_layers=num_layers,
        codec_placement="offload",
        lm_during_codec="released",
        kv_positions=0,
        kv_rows=2,
        kv_bytes=0,
        lm_phase_bytes=0,
        codec_phase_bytes=0,
    )


def greedy_frames(lm, gen_config) -> torch.Tensor:
    prompt = Prompt(ids=torch.arange(2, 30), slot_index=5)
    engine = PlainEngine(lm, gen_config)
    return engine.generate_frames(
        prompt, SamplingParams(max_frames=12, topk=1, cfg_scale=1.5, seed=0)
    )


@pytest.mark.parametrize("offloaded", [1, 2])
def test_planned_lm_makes_the_same_frames(tiny_ckpt: Path, offloaded: int) -> None:
    plain, _ = load_lm(tiny_ckpt / LM_DIR)
    gen_config = synthetic_gen_config(load_codec(tiny_ckpt / CODEC_DIR)[1])
    planned, config = load_lm(tiny_ckpt / LM_DIR)
    Placement(frugal_plan(config.backbone.num_layers, offloaded), CPU).place_lm(planned)
    assert isinstance(planned.backbone.layers, OffloadedLayers)
    assert torch.equal(greedy_frames(planned, gen_config), greedy_frames(plain, gen_config))


def test_planned_codec_decodes_the_same_audio(tiny_ckpt: Path) -> None:
    codes = torch.randint(0, 1024, (8, 150), generator=torch.Generator().manual_seed(3))
    plain, _ = load_codec(tiny_ckpt / CODEC_DIR)
    expected = plain.detokenize(codes, TWO_STEPS, generator=torch.Generator().manual_seed(1))
    lm, config = load_lm(tiny_ckpt / LM_DIR)
    placement = Placement(frugal_plan(config.backbone.num_layers, 1), CPU)
    placement.place_lm(lm)
    codec, _ = load_codec(tiny_ckpt / CODEC_DIR)
    placement.place_codec(codec)
    released = []
    with placement.codec_turn(lm, codec, lambda: released.append(True)):
        wav = codec.detokenize(codes, TWO_STEPS, generator=torch.Generator().manual_seed(1))
    assert released == [True]
    assert torch.equal(wav, expected)
    # The resident layout decodes the same way, and leaves the LM's cache alone.
    resident = replace(placement.plan, codec_placement="resident", lm_during_codec="kept")
    with Placement(resident, CPU).codec_turn(lm, plain, lambda: released.append(True)):
        again = plain.detokenize(codes, TWO_STEPS, generator=torch.Generator().manual_seed(1))
    assert released == [True] and torch.equal(again, expected)


def test_a_codec_apart_decodes_the_same_audio_on_its_own_device(tiny_ckpt: Path) -> None:
    codes = torch.randint(0, 1024, (8, 150), generator=torch.Generator().manual_seed(3))
    plain, _ = load_codec(tiny_ckpt / CODEC_DIR)
    expected = plain.detokenize(codes, TWO_STEPS, generator=torch.Generator().manual_seed(1))
    lm, config = load_lm(tiny_ckpt / LM_DIR)
    own = CodecDevicePlan(
        budget_bytes=0, codec_dtype="float32", dit_streamed=True, codec_phase_bytes=0
    )
    plan = replace(
        frugal_plan(config.backbone.num_layers, 0),
        codec_placement="apart",
        lm_during_codec="kept",
        codec_device_plan=own,
    )
    # The LM's device is another one (not used here); the codec's is the CPU, its DiT streamed.
    placement = Placement(plan, torch.device("meta"), CPU)
    codec, _ = load_codec(tiny_ckpt / CODEC_DIR)
    placement.place_codec(codec)
    assert isinstance(codec.flow_matching.estimator.transformer_blocks, OffloadedLayers)
    released = []
    with placement.codec_turn(lm, codec, lambda: released.append(True)):
        wav = codec.detokenize(codes, TWO_STEPS, generator=torch.Generator().manual_seed(1))
    assert released == [] and not placement._mirrors  # no turn taken: nothing moved
    assert torch.equal(wav, expected)


def test_placed_models_go_with_their_placement(tiny_ckpt: Path) -> None:
    lm, config = load_lm(tiny_ckpt / LM_DIR)
    codec, _ = load_codec(tiny_ckpt / CODEC_DIR)
    plan = replace(frugal_plan(config.backbone.num_layers, 0), codec_placement="after_lm")
    placement = Placement(plan, CPU)  # what a Pipeline holds
    placement.place_lm(lm)
    placement.place_codec(codec)
    with placement.codec_turn(lm, codec, lambda: None):  # makes both host mirrors
        pass
    models = weakref.ref(lm), weakref.ref(codec)
    del lm, codec, placement
    gc.collect()
    assert [m() for m in models] == [None, None]


def test_only_plans_that_keep_both_models_on_the_gpu_stream() -> None:
    plan = frugal_plan(4, 0)
    with pytest.raises(UserError, match="cannot stream") as e:
        check_streamable(plan)
    assert "\n" not in str(e.value)
    check_streamable(replace(plan, codec_placement="resident", lm_during_codec="kept"))
    check_streamable(None)  # no plan: everything on the device


def test_compile_engine_over_streamed_layers_is_refused_before_loading(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_engine_over_streaming("graph", 5)
    check_engine_over_streaming("compile", 0)
    with pytest.raises(UserError, match="use --engine graph") as refused:
        check_engine_over_streaming("compile", 5)
    assert "\n" not in str(refused.value)

    # load_pipeline's --vram path needs a GPU: stand in for it with a plan that streams layers.
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the engine was checked against the plan")

    monkeypatch.setattr(loader, "parse_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(loader, "check_engine", lambda name, device: None)
    monkeypatch.setattr(loader, "plan_for", lambda *args: frugal_plan(4, 1))
    monkeypatch.setattr(loader.checkpoint, "load_lm", no_loading)
    with pytest.raises(UserError, match="use --engine graph"):
        loader.load_pipeline(tiny_ckpt, engine="compile", vram="4G")


def test_host_copy_evicts_to_its_mirror_and_restores_equal_tensors() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(4, 8))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    copy = HostCopy(model, CPU, exclude=("1.",))  # the embedding stays as it is
    embedding = model[1].weight
    copy.evict()
    assert model[0].weight.data_ptr() == copy.host["0.weight"].data_ptr()
    assert model[1].weight is embedding and "1.weight" not in copy.host
    copy.restore()  # on the CPU the mirror itself: restoring copies only to another device
    assert isinstance(model[0].weight, nn.Parameter)
    for key, t in model.state_dict().items():
        assert torch.equal(t, before[key]), key


@pytest.mark.gpu
def test_host_copy_frees_the_gpu_and_comes_back_pinned() -> None:
    gpu = torch.device("cuda")
    model = nn.Linear(1024, 1024).to(gpu)
    x = torch.randn(2, 1024, device=gpu)
    expected = model(x)
    copy = HostCopy(model, gpu)
    assert all(t.is_pinned() for t in copy.host.values())
    held = torch.cuda.memory_allocated(gpu)
    copy.evict()
    assert torch.cuda.memory_allocated(gpu) <= held - 1024 * 1024 * 4
    copy.restore()
    assert model.weight.is_cuda and torch.equal(model(x), expected)
