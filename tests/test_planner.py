"""The memory planner on the CPU: exact sizes of the full-size models (meta device), one plan per
budget of the README's table, the speed-first order of its choices, and the --vram strings it
refuses. What a plan really uses on a GPU is measured by `heartmula-rt bench --vram`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from heartmula_rt import cli
from heartmula_rt.errors import UserError
from heartmula_rt.planner import (
    CUDA_CONTEXT_BYTES,
    TABLE_BUDGETS_GIB,
    GiB,
    LiveBytes,
    candidate_plans,
    codec_sizes,
    kv_positions,
    lm_sizes,
    parse_vram,
    plan_memory,
    preset_configs,
)

LM_CONFIG, CODEC_CONFIG = preset_configs("3B")
FRAMES_240S = 3000  # 240 s at 12.5 frames per second
BF16 = torch.bfloat16


def stored_elements(fixtures_dir: Path, name: str) -> dict[str, int]:
    """Elements of every tensor of an official checkpoint, from its key list."""
    rows = (fixtures_dir / "keys" / name).read_text().splitlines()[1:]
    shapes = dict(row.split("\t") for row in rows)
    return {
        k: math.prod(int(d) for d in v.strip("[]").split(",") if d.strip())
        for k, v in shapes.items()
    }


def plan(gib: float):
    return plan_memory(int(gib * GiB), LM_CONFIG, CODEC_CONFIG, max_frames=FRAMES_240S)


def test_lm_sizes_match_the_official_checkpoint(fixtures_dir: Path) -> None:
    elements = stored_elements(fixtures_dir, "HeartMuLa-oss-3B.keys.tsv")
    sizes = lm_sizes(LM_CONFIG, BF16, "none", 2, 4096)
    assert sizes.weights == 2 * sum(elements.values())  # every tensor in bf16
    assert sizes.text_embeddings == 2 * elements["text_embeddings.weight"]
    layer0 = sum(n for k, n in elements.items() if k.startswith("backbone.layers.0."))
    assert sizes.backbone_layer == 2 * layer0
    # k and v, 2 rows, bf16: the backbone's 28 layers × 8 kv heads × 128 dims × 4096 positions
    # and the decoder's 3 layers × 4 kv heads × 384 dims × 8 positions (SPEC §1 flavors).
    assert sizes.kv_cache == 2 * 2 * 2 * (28 * 8 * 128 * 4096 + 3 * 4 * 384 * 8)


def test_quantized_lm_is_smaller_in_the_expected_ratio() -> None:
    none, int8, int4 = (lm_sizes(LM_CONFIG, BF16, q, 2, 4096) for q in ("none", "int8", "int4"))
    matmul = none.weights - 2 * 128256 * 3072 - 2 * 8 * 8197 * 3072 - 2 * (3072 + 512 * 3072 + 3072)
    # int8: 1 byte per weight instead of 2 (plus per-channel scales); int4: about a quarter.
    assert 0.5 < (int8.weights - (none.weights - matmul)) / matmul < 0.51
    assert 0.25 < (int4.weights - (none.weights - matmul)) / matmul < 0.27


def test_codec_sizes_match_the_official_checkpoint(fixtures_dir: Path) -> None:
    elements = stored_elements(fixtures_dir, "HeartCodec-oss.keys.tsv")
    blocks = sum(
        n for k, n in elements.items() if k.startswith("flow_matching.estimator.transformer_blocks")
    )
    sizes = codec_sizes(CODEC_CONFIG, torch.float32)
    assert sizes.dit_blocks == 4 * blocks
    # The scalar decoder's last conv runs on 2 streams × 64 channels × 744 latents × 960 × 2
    # samples in float32: at least the input and output of that conv are alive at once.
    assert sizes.scalar_activations >= 2 * 4 * 2 * 64 * 744 * 960 * 2


def test_live_bytes_counts_what_is_alive_at_once() -> None:
    mode = LiveBytes()
    weight = torch.empty(1000, device="meta")  # made before: not counted
    with mode:
        a = weight * 2  # 4000 bytes
        b = a + 1  # 8000 alive
        del a
        c = b.view(10, 100)  # a view: nothing new
        d = c.sum()  # 4 more bytes
    assert mode.peak == 8000 and mode.live == 4004
    del b, c, d


def test_kv_positions_round_up_to_the_engine_step() -> None:
    assert kv_positions(LM_CONFIG, FRAMES_240S) == 4096  # 1024 + 3001 → 4096
    assert kv_positions(LM_CONFIG, 7000) == 8192  # capped at the context


@pytest.mark.parametrize("gib", TABLE_BUDGETS_GIB)
def test_every_table_budget_has_a_plan_within_it(gib: int) -> None:
    p = plan(gib)
    assert p.predicted_peak_bytes <= gib * GiB
    assert p.predicted_peak_bytes > CUDA_CONTEXT_BYTES + p.kv_bytes
    assert p.kv_positions == 4096


def test_roomy_budget_keeps_everything_on_the_gpu_unquantized() -> None:
    # bf16 LM 7.3 GiB + float32 codec 5.9 GiB + a window's activations fit 24 GiB easily.
    p = plan(24)
    assert (p.quant, p.codec_placement, p.lm_during_codec) == ("none", "resident", "kept")
    assert p.text_embeddings_on_gpu and p.offloaded_lm_layers == 0


def test_smaller_budgets_never_get_faster_plans() -> None:
    order = {}
    for gib in TABLE_BUDGETS_GIB:
        chosen = plan(gib)
        ranks = list(
            candidate_plans(
                LM_CONFIG, CODEC_CONFIG, budget_bytes=int(gib * GiB), max_frames=FRAMES_240S,
                batch=2, lm_dtype=BF16, codec_dtype=torch.float32,
            )
        )  # fmt: skip
        order[gib] = ranks.index(chosen)
        # Nothing faster fits: every earlier candidate is over the budget.
        assert all(not c.fits() for c in ranks[: order[gib]])
    ranks = [order[g] for g in TABLE_BUDGETS_GIB]
    assert ranks == sorted(ranks, reverse=True)


def test_lm_layers_are_offloaded_only_when_nothing_else_fits() -> None:
    for gib in TABLE_BUDGETS_GIB:
        p = plan(gib)
        if p.offloaded_lm_layers:
            assert p.quant == "int4"  # the smallest LM first
            assert p.codec_placement == "offload" and p.lm_during_codec == "released"
    assert plan(4).offloaded_lm_layers > 0
    assert plan(6).offloaded_lm_layers == 0


@pytest.mark.parametrize(
    "text, gib", [("12G", 12), ("12GiB", 12), ("12gb", 12), ("6.5G", 6.5), ("6144M", 6)]
)
def test_parse_vram(text: str, gib: float) -> None:
    assert parse_vram(text) == int(gib * GiB)


@pytest.mark.parametrize("text", ["12", "abc", "-3G", "0G", "12T", ""])
def test_bad_vram_strings_are_one_clear_error(text: str) -> None:
    with pytest.raises(UserError, match="--vram"):
        parse_vram(text)


def test_below_the_minimum_names_it() -> None:
    with pytest.raises(UserError, match=r"below the minimum of \d+\.\d\d GiB"):
        plan(0.5)


@pytest.mark.parametrize("vram", ["12", "abc", "-3G", "0.5G"])
def test_cli_refuses_bad_vram_in_one_line(vram: str, capsys) -> None:
    assert cli.main(["plan", f"--vram={vram}"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vram" in err


def test_cli_plan_prints_the_plan(capsys) -> None:
    # 6 GiB cannot hold the 7.3 GiB bf16 LM: it must be quantized, and int8 (4.2 GiB) fits.
    assert cli.main(["plan", "--vram", "6G", "--max-seconds", "240"]) == 0
    out = capsys.readouterr().out
    assert "quantization int8" in out and "predicted peak" in out
