"""Memory plans with the codec on another device than the LM (`--codec-device`): each device's
budget counted on its own (`--vram 12G,8G`), the LM's GPU planned without the codec, the codec's
GPU with a plan of its own, and every way of giving budgets that does not fit the devices
refused in one line."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from heartmula_rt import cli
from heartmula_rt.cli import common
from heartmula_rt.errors import UserError
from heartmula_rt.memory.placement import Placement
from heartmula_rt.memory.planner import (
    DEFAULT_OVERHEADS,
    GiB,
    candidate_plans,
    codec_sizes,
    device_budgets,
    plan_codec_device,
    plan_memory,
    preset_configs,
)
from heartmula_rt.runtime import loader

LM_CONFIG, CODEC_CONFIG = preset_configs("3B")
FRAMES_240S = 3000
BF16 = "bfloat16"


def plan(gib: float, **kw):
    return plan_memory(int(gib * GiB), LM_CONFIG, CODEC_CONFIG, max_frames=FRAMES_240S, **kw)


def minimum_named(error: UserError) -> float:
    return float(re.search(r"minimum of (\d+\.\d+) GiB", str(error))[1])


def test_the_lms_gpu_holds_no_codec_and_never_makes_way() -> None:
    shared = next(
        candidate_plans(
            LM_CONFIG, CODEC_CONFIG, budget_bytes=24 * GiB, max_frames=FRAMES_240S, cfg_rows=2,
            lm_dtype=BF16, codec_dtype=BF16,
        )
    )  # fmt: skip
    apart = plan(24, codec_dtype=BF16, codec_apart=True)
    assert (shared.codec_placement, apart.codec_placement) == ("resident", "apart")
    assert apart.lm_during_codec == "kept" and apart.codec_device_plan is None  # a CPU codec
    assert (apart.quant, apart.text_embeddings_on_gpu) == (shared.quant, True)
    # The same LM layout, less exactly the codec's weights; and no codec phase on this GPU.
    codec_weights = codec_sizes(CODEC_CONFIG, BF16).weights
    assert shared.lm_phase_bytes - apart.lm_phase_bytes == codec_weights
    assert apart.codec_phase_peak == 0
    assert apart.predicted_peak_bytes == apart.overheads.cuda_context + apart.lm_phase_peak


def test_a_gpu_to_itself_gives_the_lm_a_faster_plan_that_streams() -> None:
    # 12G shared: the LM goes to host memory while the codec decodes, so no streaming; with the
    # codec on its own GPU, 12G keeps the bf16 LM and its text embeddings there throughout.
    shared, apart = plan(12), plan(12, codec_apart=True, codec_budget_bytes=8 * GiB)
    assert not shared.codec_beside_lm and shared.lm_during_codec == "released"
    assert apart.codec_beside_lm and apart.text_embeddings_on_gpu and apart.quant == "none"
    # 8G shared needs int8 for the LM: alone on a GPU, 8G still does (its weights and cache).
    assert plan(8).quant == plan(8, codec_apart=True).quant == "int8"
    # The LM's minimum alone is below the minimum of both on one GPU.
    with pytest.raises(UserError) as both:
        plan(0.5)
    with pytest.raises(UserError, match="for the LM's GPU is below the minimum") as lm_alone:
        plan(0.5, codec_apart=True)
    assert minimum_named(lm_alone.value) < minimum_named(both.value)


def test_the_codecs_gpu_keeps_it_resident_or_streams_its_dit() -> None:
    roomy = plan_codec_device(8 * GiB, CODEC_CONFIG, codec_dtype=BF16)
    assert not roomy.dit_streamed and roomy.fits()
    with pytest.raises(UserError, match="for the codec's GPU is below the minimum") as below:
        plan_codec_device(GiB, CODEC_CONFIG, codec_dtype=BF16)
    assert "\n" not in str(below.value)
    # The minimum named is the smallest budget with a plan, and that plan streams the DiT.
    least = minimum_named(below.value)
    frugal = plan_codec_device(int(least * GiB), CODEC_CONFIG, codec_dtype=BF16)
    assert frugal.dit_streamed and frugal.fits()
    with pytest.raises(UserError):
        plan_codec_device(int((least - 0.01) * GiB), CODEC_CONFIG, codec_dtype=BF16)
    assert frugal.codec_phase_bytes < roomy.codec_phase_bytes
    # The codec's GPU is planned with its own overheads: a larger context there moves its peak.
    o = dataclasses.replace(DEFAULT_OVERHEADS, cuda_context=GiB)
    more = plan_codec_device(8 * GiB, CODEC_CONFIG, codec_dtype=BF16, overheads=o)
    assert (
        more.predicted_peak_bytes - roomy.predicted_peak_bytes
        == GiB - DEFAULT_OVERHEADS.cuda_context
    )


def test_a_split_plan_carries_the_codecs_gpu_plan() -> None:
    split = plan(12, codec_apart=True, codec_budget_bytes=5 * GiB)
    own = split.codec_device_plan
    assert own is not None and own.budget_bytes == 5 * GiB and own.dit_streamed
    assert split.codec_windows_planned  # one window at a time on that GPU
    assert not plan(12, codec_apart=True).codec_windows_planned  # a CPU codec batches
    with pytest.raises(ValueError):
        plan(12, codec_budget_bytes=5 * GiB)  # a codec budget without the codec apart


@pytest.mark.parametrize(
    "vram, apart, on_gpu, budgets",
    [
        ("12G", False, True, (12, None)),
        ("12G", True, False, (12, None)),  # the codec on the CPU: the LM's GPU only
        ("12G", True, True, (12, 12)),  # one budget, two GPUs: each one's
        ("12G,8G", True, True, (12, 8)),
    ],
)
def test_device_budgets(vram: str, apart: bool, on_gpu: bool, budgets: tuple) -> None:
    got = device_budgets(vram, codec_apart=apart, codec_on_gpu=on_gpu)
    assert got == tuple(None if b is None else b * GiB for b in budgets)


@pytest.mark.parametrize(
    "vram, apart, on_gpu, says",
    [
        ("12G,8G", False, True, "with --codec-device cuda:N"),
        ("12G,8G", True, False, "the codec's device is the CPU"),
        ("12G,8G,4G", True, True, "gives 3 budgets"),
        ("12G,x", True, True, "is not a memory size"),
    ],
)
def test_budgets_that_do_not_fit_the_devices_are_refused(vram, apart, on_gpu, says) -> None:
    with pytest.raises(UserError, match=re.escape(says)) as refused:
        device_budgets(vram, codec_apart=apart, codec_on_gpu=on_gpu)
    assert "\n" not in str(refused.value)


def test_cli_plan_prints_both_gpus(capsys) -> None:
    assert cli.main(["plan", "--vram", "12G,8G"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan for --vram 12G on the LM's GPU")
    assert "codec: bfloat16 DiT, on a GPU of its own (below)" in out
    assert "codec's GPU, --vram 8G:" in out and "codec: resident (bfloat16 DiT" in out
    assert cli.main(["plan", "--vram", "12G", "--codec-device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "float32 DiT, on the CPU (not planned)" in out and "codec's GPU" not in out
    assert cli.main(["plan", "--vram", "12G", "--codec-device", "gpu"]) == 0
    assert "codec's GPU, --vram 12G:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["--vram", "12G,8G,4G"], ["--vram", "12G,8G", "--codec-device", "cpu"], ["--vram", "12G,1G"]],
)
def test_cli_plan_refuses_budgets_in_one_line(argv: list[str], capsys) -> None:
    assert cli.main(["plan", *argv]) == common.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vram" in err


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """PipelineConfig's checks as on a machine with two GPUs (nothing is loaded)."""
    monkeypatch.setattr(loader, "parse_device", torch.device)
    monkeypatch.setattr(loader, "check_engine", lambda name, device: None)
    monkeypatch.setattr(loader, "check_fast_path", lambda quant, device: None)
    monkeypatch.setattr(loader, "measure_overheads", lambda device: DEFAULT_OVERHEADS)


def test_a_pipeline_config_plans_each_device(two_gpus) -> None:
    config = loader.PipelineConfig(
        synthetic="3B", device="cuda:0", codec_device="cuda:1", vram="12G,6G"
    )
    split = loader.plan_for(config)
    assert split.budget_bytes == 12 * GiB and split.codec_placement == "apart"
    assert split.codec_device_plan.budget_bytes == 6 * GiB
    on_cpu = loader.plan_for(
        loader.PipelineConfig(synthetic="3B", device="cuda", codec_device="cpu", vram="12G")
    )
    assert on_cpu.codec_placement == "apart" and on_cpu.codec_device_plan is None
    # "cuda" and "cuda:0" are one GPU: one plan for both models.
    same = loader.PipelineConfig(synthetic="3B", device="cuda", codec_device="cuda:0", vram="12G")
    assert same.codec_device == same.device and loader.plan_for(same).codec_placement != "apart"
    with pytest.raises(UserError, match="two budgets is for two GPUs"):
        loader.PipelineConfig(synthetic="3B", device="cuda", vram="12G,8G")


def test_placement_checks_the_codec_device_against_the_plan() -> None:
    apart = plan(12, codec_apart=True)
    with pytest.raises(ValueError, match="codec device of its own"):
        Placement(apart, torch.device("cpu"))
    with pytest.raises(ValueError, match="codec device of its own"):
        Placement(plan(12), torch.device("cpu"), torch.device("meta"))


@pytest.mark.gpu
def test_a_split_plan_on_a_gpu_decodes_on_the_codec_device(tiny_ckpt) -> None:
    """The LM planned on the GPU, the codec on the CPU: the frames cross once, and the codec
    gives the audio a CPU-only pipeline gives the same frames."""
    split = loader.load_pipeline(tiny_ckpt, device="cuda", codec_device="cpu", vram="4G")
    assert split.plan.codec_placement == "apart" and split.plan.codec_beside_lm
    assert next(split.codec.parameters()).device.type == "cpu"
    assert next(split.lm.parameters()).device.type == "cuda"
    frames = split.generate_frames("piano", "[verse]\nla la", max_seconds=2, seed=3)
    on_cpu = loader.load_pipeline(tiny_ckpt, device="cpu", threads=split.threads)
    assert torch.equal(split.decode_frames(frames, seed=1), on_cpu.decode_frames(frames, seed=1))
