"""Counting the kernel launches of one LM frame on the meta device (runtime/launches.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from heartmula_rt.runtime.launches import (
    BOOL_MASK_LAUNCHES,
    SDPA,
    FrameLaunches,
    LaunchCounter,
    _AttentionAsOneKernel,
    count_frame_launches,
    meta_lm,
)

pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from count_kernels import main as count_kernels_main  # noqa: E402


def _count(fn, *args) -> FrameLaunches:
    launches = FrameLaunches()
    counter = LaunchCounter(launches)
    with counter, _AttentionAsOneKernel(counter):
        fn(*args)
    return launches


def test_views_and_allocations_launch_nothing() -> None:
    x = torch.empty(4, 6, device="meta")

    def metadata_only(x: torch.Tensor) -> None:
        y = x.view(2, 12).reshape(4, 6).transpose(0, 1).t().unsqueeze(0).expand(3, 4, 6)
        y[1, :2].unbind(0)
        x.detach().float()  # float32 already: no copy
        torch.empty_like(x)
        x.new_empty(5)

    assert _count(metadata_only, x).total == 0


def test_compute_copies_and_in_place_ops_launch_one_each() -> None:
    x, w = torch.empty(4, 6, device="meta"), torch.empty(8, 6, device="meta")

    def compute(x: torch.Tensor, w: torch.Tensor) -> None:
        F.linear(x, w)  # one mm
        (x + 1).add_(2)
        x.to(torch.bfloat16)
        x.t().contiguous()  # a real copy
        torch.stack([x, x])

    launches = _count(compute, x, w)
    assert launches.part_ops("rest") == {
        "aten.mm.default": 1,
        "aten.add.Tensor": 1,
        "aten.add_.Tensor": 1,
        "aten._to_copy.default": 1,
        "aten.clone.default": 1,
        "aten.stack.default": 1,
    }


def test_attention_counts_as_the_fused_kernel() -> None:
    q, kv = torch.empty(2, 4, 1, 16, device="meta"), torch.empty(2, 4, 32, 16, device="meta")
    assert _count(F.scaled_dot_product_attention, q, kv, kv).ops == {("rest", SDPA): 1}
    mask = torch.ones(1, 1, 1, 32, dtype=torch.bool, device="meta")
    with_mask = _count(F.scaled_dot_product_attention, q, kv, kv, mask)
    assert with_mask.total == 1 + BOOL_MASK_LAUNCHES


@pytest.mark.parametrize("cfg", [True, False])
def test_frame_parts(cfg: bool) -> None:
    model = meta_lm("tiny", torch.float32)
    launches = count_frame_launches(model, cfg=cfg)
    codebooks = model.config.audio_num_codebooks
    assert launches.part_ops("sampler") == {"heartmula_rt.fused_sample.default": codebooks}
    assert launches.backbone_layers == len(model.backbone.layers)
    assert launches.decoder_layer_steps == len(model.decoder.layers) * (codebooks - 1)
    # every layer does the same work: its 7 matmuls and one attention at least
    mms = launches.part_ops("backbone layers")["aten.mm.default"]
    assert mms == 7 * launches.backbone_layers
    assert launches.part_ops("decoder layers")[SDPA] == launches.decoder_layer_steps
    assert (
        sum(launches.part(p) for p in ("backbone layers", "decoder layers", "sampler", "rest"))
        == launches.total
    )
    # counting is repeatable: nothing built lazily is counted
    assert count_frame_launches(model, cfg=cfg).ops == launches.ops


def test_the_tool_prints_the_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert count_kernels_main(["--preset", "tiny", "--dtype", "float32", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "launches per frame" in out
    assert "per layer × 2" in out and "sampler: 8" in out
