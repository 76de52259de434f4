"""The memory planner on the CPU: exact sizes of the full-size models (meta device), one plan per
budget of the README's table, the speed-first order of its choices, the songs at once a plan
holds, and the --vram strings it refuses. What a plan really uses on a GPU is measured by
`heartmula-rt bench --vram`."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heartmula_rt import cli
from heartmula_rt.cli import common
from heartmula_rt.config import CODEC_PRECISIONS, CODEC_PRESETS
from heartmula_rt.errors import UserError
from heartmula_rt.memory import planner, report, sizing
from heartmula_rt.memory.offload import HostCopy
from heartmula_rt.memory.planner import (
    DEFAULT_OVERHEADS,
    HEADROOM_MIN_BYTES,
    MAX_SONGS,
    TABLE_BUDGETS_GIB,
    GiB,
    MiB,
    OverheadReadings,
    candidate_plans,
    checkpoint_configs,
    codec_sizes,
    kv_positions,
    lm_sizes,
    overheads_from,
    parse_vram,
    plan_memory,
    preset_configs,
)
from heartmula_rt.memory.sizing import LiveBytes, measure_overheads
from heartmula_rt.model import lm
from heartmula_rt.model.codec import dit

LM_CONFIG, CODEC_CONFIG = preset_configs("3B")
FRAMES_240S = 3000  # 240 s at 12.5 frames per second
BF16 = "bfloat16"
# 4G is below the minimum once the context, workspaces and headroom are all counted.
PLANNED_GIB = tuple(g for g in TABLE_BUDGETS_GIB if g > 4)


def stored_elements(fixtures_dir: Path, name: str) -> dict[str, int]:
    """Elements of every tensor of an official checkpoint, from its key list."""
    rows = (fixtures_dir / "keys" / name).read_text().splitlines()[1:]
    shapes = dict(row.split("\t") for row in rows)
    return {
        k: math.prod(int(d) for d in v.strip("[]").split(",") if d.strip())
        for k, v in shapes.items()
    }


def plan(gib: float, **kw):
    return plan_memory(int(gib * GiB), LM_CONFIG, CODEC_CONFIG, max_frames=FRAMES_240S, **kw)


def minimum_gib(**kw) -> float:
    """The minimum budget the planner names when a plan is asked for below it."""
    with pytest.raises(UserError) as below:
        plan(0.5, **kw)
    return float(re.search(r"minimum of (\d+\.\d+) GiB", str(below.value))[1])


def layout(p: planner.MemoryPlan) -> tuple:
    """What a plan chooses, whatever it is sized for."""
    chosen = ("quant", "text_embeddings_on_gpu", "codec_placement", "lm_during_codec")
    return (*(getattr(p, name) for name in chosen), p.offloaded_lm_layers)


def at_songs(p: planner.MemoryPlan, songs: int) -> planner.MemoryPlan:
    """`p`'s layout as the planner sizes it for `songs` songs at once."""
    candidates = candidate_plans(
        LM_CONFIG, CODEC_CONFIG, budget_bytes=p.budget_bytes, max_frames=p.max_frames,
        cfg_rows=p.rows_per_song, lm_dtype=p.lm_dtype, codec_dtype=p.codec_dtype, songs=songs,
    )  # fmt: skip
    return next(c for c in candidates if layout(c) == layout(p))


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
    sizes = codec_sizes(CODEC_CONFIG, "float32")
    assert sizes.dit_blocks == 4 * blocks
    # The scalar decoder's last conv runs on 2 streams × 64 channels × 744 latents × 960 × 2
    # samples in float32: at least the input and output of that conv are alive at once.
    assert sizes.scalar_activations >= 2 * 4 * 2 * 64 * 744 * 960 * 2


def tiny_configs(tiny_ckpt: Path, layers: int):
    """The tiny checkpoint's configs with `layers` layers in every stack (LM and DiT)."""
    lm_config, codec_config = checkpoint_configs(tiny_ckpt)
    return (
        dataclasses.replace(
            lm_config,
            backbone=dataclasses.replace(lm_config.backbone, num_layers=layers),
            decoder=dataclasses.replace(lm_config.decoder, num_layers=layers),
        ),
        dataclasses.replace(codec_config, num_layers=layers, num_layers_2=layers),
    )


def counted(forward, calls: collections.Counter, name: str):
    """`forward` counting its calls in `calls[name]`."""

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return forward(*args, **kwargs)

    return wrapper


def test_a_plan_runs_no_layer(tiny_ckpt, monkeypatch) -> None:
    # Tracing layers on meta made the first `heartmula-rt plan` of a song length take seconds.
    ran = collections.Counter()
    for block in (lm.TransformerBlock, dit.Block):
        monkeypatch.setattr(block, "forward", counted(block.forward, ran, block.__name__))
    with pytest.raises(UserError, match="below the minimum"):  # every candidate considered
        plan_memory(GiB // 4, *tiny_configs(tiny_ckpt, 7), max_frames=100)
    assert not ran


# The sizes worked out (footprint.py) against the same sizes counted on meta (sizing.py): every
# preset small enough to trace here, both LM dtypes' kinds, every quantization, 1 and 2 rows a
# song; and a few batches of several songs (their own KV rows each, one frame over every row).
TRACED_LAYOUTS = [
    (preset, dtype, quant, rows, 1)
    for preset in ("tiny", "mid", "3B")
    for dtype in ("float32", "bfloat16")
    for quant in ("none", "int8", "nf4", "int4")
    for rows in (1, 2)
] + [
    ("3B", "bfloat16", "none", 2, 2),
    ("3B", "float32", "int8", 1, 4),
    ("tiny", "bfloat16", "nf4", 2, 3),
]


def within_bound(worked_out: int, traced: int) -> bool:
    """An activation bound: never below the trace, and not far above it."""
    return traced <= worked_out <= 1.4 * traced + 4 * MiB


@pytest.mark.parametrize(("preset", "dtype", "quant", "rows", "songs"), TRACED_LAYOUTS)
def test_lm_sizes_worked_out_agree_with_the_meta_trace(preset, dtype, quant, rows, songs) -> None:
    config = preset_configs(preset)[0]
    for positions in {min(p, config.backbone.max_seq_len) for p in (1024, 8192)}:
        worked_out = lm_sizes(config, dtype, quant, rows, positions, songs)
        traced = sizing.lm_sizes(config, getattr(torch, dtype), quant, rows, positions, songs)
        exact = ("weights", "text_embeddings", "backbone_layer", "num_backbone_layers", "kv_cache")
        for name in exact:
            assert getattr(worked_out, name) == getattr(traced, name), name
        for name in ("workspace", "frame_workspace"):
            assert within_bound(getattr(worked_out, name), getattr(traced, name)), name


@pytest.mark.parametrize("preset", ["tiny", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_codec_sizes_worked_out_agree_with_the_meta_trace(preset: str, dtype: str) -> None:
    config = CODEC_PRESETS[preset]
    worked_out, traced = (
        codec_sizes(config, dtype),
        sizing.codec_sizes(config, getattr(torch, dtype)),
    )
    for name in ("weights", "dit_blocks", "dit_ring"):
        assert getattr(worked_out, name) == getattr(traced, name), name
    for name in ("dit_activations", "scalar_activations"):
        assert within_bound(getattr(worked_out, name), getattr(traced, name)), name


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_layers_counted_not_traced_give_the_sizes_of_tracing_them(
    tiny_ckpt, monkeypatch, quant: str
) -> None:
    lm_config, codec_config = tiny_configs(tiny_ckpt, 5)
    dtype = torch.bfloat16
    counted_sizes = (
        sizing.lm_sizes(lm_config, dtype, quant, 2, 256),
        sizing.codec_sizes(codec_config, dtype),
    )
    monkeypatch.setattr(sizing, "TRACED_LAYERS", 5)  # every layer built and traced
    assert counted_sizes == (
        sizing.lm_sizes(lm_config, dtype, quant, 2, 256),
        sizing.codec_sizes(codec_config, dtype),
    )


def test_plan_does_not_import_bitsandbytes(tiny_ckpt) -> None:
    # Importing it takes seconds; a plan needs to know only that it is installed. A budget
    # below the minimum makes the planner consider every quantization, nf4's too.
    code = (
        "import sys; from heartmula_rt import cli; "
        "rc = cli.main(['plan', '--vram', '0.25G', '--model-path', sys.argv[1]]); "
        "print(rc, 'bitsandbytes' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_ckpt)], capture_output=True, text=True, check=True
    )
    assert "below the minimum" in done.stderr
    assert done.stdout.split() == [str(common.EXIT_USER_ERROR), "False"]


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


@pytest.mark.parametrize("gib", PLANNED_GIB)
def test_every_table_budget_has_a_plan_within_it(gib: int) -> None:
    p = plan(gib)
    assert p.predicted_peak_bytes + p.headroom_bytes <= gib * GiB
    assert p.predicted_peak_bytes > p.overheads.cuda_context + p.kv_bytes
    assert p.kv_positions == 4096
    assert p.overheads == DEFAULT_OVERHEADS  # no GPU measured


def test_every_plan_keeps_the_headroom_free() -> None:
    # A plan is chosen only with max(5% of the budget, 256 MiB) left beyond its peak.
    for gib in PLANNED_GIB:
        p = plan(gib)
        assert p.headroom_bytes == max(math.ceil(0.05 * gib * GiB), HEADROOM_MIN_BYTES)
        skipped = list(
            candidate_plans(
                LM_CONFIG, CODEC_CONFIG, budget_bytes=gib * GiB, max_frames=FRAMES_240S,
                cfg_rows=2, lm_dtype=BF16, codec_dtype=torch.float32,
            )
        )  # fmt: skip
        for c in skipped[: [layout(c) for c in skipped].index(layout(p))]:
            assert c.predicted_peak_bytes + c.headroom_bytes > gib * GiB
    # A budget of exactly a plan's peak gets a more frugal plan, one that leaves the headroom.
    roomy = plan(8)
    tight = plan_memory(roomy.predicted_peak_bytes, LM_CONFIG, CODEC_CONFIG, max_frames=FRAMES_240S)
    assert tight.predicted_peak_bytes + tight.headroom_bytes <= roomy.predicted_peak_bytes


def test_overheads_are_in_the_predicted_peak() -> None:
    # Every overhead moves the peak of the phase it belongs to by exactly its bytes.
    p = plan(8)
    assert p.quant == "int8"
    more = {
        "cuda_context": 100 * MiB,
        "cublas_workspace": 10 * MiB,
        "triton_autotune": 50 * MiB,
        "cudnn_workspace": 70 * MiB,
    }
    for field, extra in more.items():
        o = dataclasses.replace(p.overheads, **{field: getattr(p.overheads, field) + extra})
        q = dataclasses.replace(p, overheads=o)
        lm = {"cuda_context": 0, "cublas_workspace": 3 * extra, "triton_autotune": extra}
        codec = {"cuda_context": 0, "cublas_workspace": 3 * extra, "cudnn_workspace": extra}
        assert q.lm_phase_peak - p.lm_phase_peak == lm.get(field, 0)
        assert q.codec_phase_peak - p.codec_phase_peak == codec.get(field, 0)
    # The Triton autotune buffer is only int8's (the autotuned kernel).
    int4 = dataclasses.replace(p, quant="int4")
    assert p.lm_phase_peak - int4.lm_phase_peak == p.overheads.triton_autotune


def test_the_graph_pool_is_counted_in_the_lm_phase() -> None:
    sizes = lm_sizes(LM_CONFIG, BF16, "none", 2, 4096)
    # One frame's activations are smaller than the prompt step's, but not nothing: at a full
    # cache attention reads 4096 positions of every layer.
    assert 0 < sizes.frame_workspace < sizes.workspace
    assert sizes.frame_workspace > 2 * 8 * 4096 * 128 * 2  # one layer's K, 2 rows, bf16
    p = plan(24)
    assert p.lm_phase_bytes == (
        sizes.weights + sizes.kv_cache + sizes.workspace + sizes.frame_workspace
        + codec_sizes(CODEC_CONFIG, "float32").weights
    )  # fmt: skip


def test_kv_cache_and_frame_workspace_scale_with_songs() -> None:
    one, four = (lm_sizes(LM_CONFIG, BF16, "none", 2, 4096, songs) for songs in (1, 4))
    assert four.kv_cache == 4 * one.kv_cache  # every song its own 2 rows
    assert four.workspace == one.workspace  # a prompt step is one song's, over its own rows
    assert four.frame_workspace > one.frame_workspace  # a frame runs every row
    p1, p4 = plan(24), plan(24, songs=4)
    assert (p4.songs, p4.kv_rows, p4.rows_per_song) == (4, 8, 2)
    assert p4.kv_bytes == 4 * p1.kv_bytes
    assert layout(p4) == layout(p1)  # 24G holds 4 songs in the everything-resident layout
    grown = 3 * p1.kv_bytes + four.frame_workspace - one.frame_workspace
    assert p4.lm_phase_bytes - p1.lm_phase_bytes == grown
    unguided = plan(24, songs=4, cfg_rows=1)
    assert (unguided.kv_rows, 2 * unguided.kv_bytes) == (4, p4.kv_bytes)


@pytest.mark.parametrize(("gib", "songs"), [(8, 2), (12, 1), (24, 1), (24, 4)])
def test_max_songs_is_the_most_the_layout_holds(gib: int, songs: int) -> None:
    p = plan(gib, songs=songs)
    assert songs <= p.max_songs < MAX_SONGS
    assert at_songs(p, p.max_songs).fits()
    assert not at_songs(p, p.max_songs + 1).fits()
    # Nothing faster held `songs`, so the planner gives this layout for max_songs songs too.
    assert layout(plan(gib, songs=p.max_songs)) == layout(p)


def test_max_songs_stops_at_the_cap() -> None:
    p = plan_memory(80 * GiB, LM_CONFIG, CODEC_CONFIG, max_frames=375, cfg_rows=1)
    assert p.max_songs == MAX_SONGS and at_songs(p, MAX_SONGS + 1).fits()
    assert f"room for {MAX_SONGS} or more songs of up to 375 frames" in report.format_plan(p)


def test_a_budget_for_one_song_refuses_sixteen_naming_what_fits() -> None:
    assert plan(12).fits()
    with pytest.raises(UserError) as refused:
        plan(12, songs=16)
    said = re.fullmatch(
        r"--vram 12\.00 GiB is below the minimum of (\d+\.\d\d) GiB for this model and 16 "
        r"songs of 3000 frames at once; it holds at most (\d+) such songs",
        str(refused.value),
    )
    assert said, str(refused.value)
    need, fit = float(said[1]), int(said[2])
    assert plan(need, songs=16).fits()
    with pytest.raises(UserError, match="below the minimum"):
        plan(need - 0.01, songs=16)
    assert plan(12, songs=fit).fits()
    with pytest.raises(UserError, match="below the minimum"):
        plan(12, songs=fit + 1)
    # Below even one song's minimum, it names that one.
    with pytest.raises(UserError, match=rf"; one needs {minimum_gib():.2f} GiB$"):
        plan(4, songs=2)


def test_overheads_from_gpu_readings() -> None:
    readings = OverheadReadings(
        total=80 * GiB, free=70 * GiB, reserved=9 * GiB, workspace=32 * MiB, triton_autotune=0
    )
    o = overheads_from(readings)
    assert o.measured and not DEFAULT_OVERHEADS.measured
    assert o.cuda_context == GiB  # used, less what torch reserved
    assert o.cublas_workspace == 32 * MiB and o.triton_autotune == 0
    assert o.cudnn_workspace == DEFAULT_OVERHEADS.cudnn_workspace  # not measured
    assert o.matmul_streams == DEFAULT_OVERHEADS.matmul_streams
    # A larger measured context costs the plan exactly its difference.
    default, measured = plan(12), plan(12, overheads=o)
    diff = o.cuda_context - DEFAULT_OVERHEADS.cuda_context
    assert measured.predicted_peak_bytes - default.predicted_peak_bytes == diff
    assert "measured on this GPU" in report.format_plan(measured)


@pytest.mark.gpu
def test_measure_overheads_on_the_gpu() -> None:
    o = measure_overheads(torch.device("cuda"))
    assert o.measured
    assert 64 * MiB < o.cuda_context < 4 * GiB
    # torch's cuBLAS workspace: 8 MiB and 128 KiB, or 32 MiB on Hopper and Blackwell, maybe
    # with cuBLASLt's beside it.
    assert 4 * MiB <= o.cublas_workspace <= 2 * DEFAULT_OVERHEADS.cublas_workspace
    assert o.triton_autotune in (0, 256 * MiB)


def test_roomy_budget_keeps_everything_on_the_gpu_unquantized() -> None:
    # bf16 LM 7.3 GiB + float32 codec 5.9 GiB + a window's activations fit 24 GiB easily.
    p = plan(24)
    assert (p.quant, p.codec_placement, p.lm_during_codec) == ("none", "resident", "kept")
    assert p.text_embeddings_on_gpu and p.offloaded_lm_layers == 0


def test_smaller_budgets_never_get_faster_plans() -> None:
    order = {}
    for gib in PLANNED_GIB:
        chosen = plan(gib)
        ranks = list(
            candidate_plans(
                LM_CONFIG, CODEC_CONFIG, budget_bytes=int(gib * GiB), max_frames=FRAMES_240S,
                cfg_rows=2, lm_dtype=BF16, codec_dtype=torch.float32,
            )
        )  # fmt: skip
        order[gib] = [layout(c) for c in ranks].index(layout(chosen))
        # Nothing faster fits: every earlier candidate is over the budget.
        assert all(not c.fits() for c in ranks[: order[gib]])
    ranks = [order[g] for g in PLANNED_GIB]
    assert ranks == sorted(ranks, reverse=True)


def test_lm_layers_are_offloaded_only_when_nothing_else_fits() -> None:
    lowest = minimum_gib()
    for gib in (lowest, *PLANNED_GIB):
        p = plan(gib)
        if p.offloaded_lm_layers:
            assert p.quant == "int4"  # the smallest LM first
            assert p.codec_placement == "offload" and p.lm_during_codec == "released"
    assert plan(lowest).offloaded_lm_layers > 0
    assert plan(6).offloaded_lm_layers == 0


def test_the_minimum_named_is_the_smallest_budget_with_a_plan() -> None:
    lowest = minimum_gib()
    assert 4 < lowest < 6  # with every overhead and the headroom counted
    assert plan(lowest).fits()
    with pytest.raises(UserError, match="below the minimum"):
        plan(lowest - 0.01)
    with pytest.raises(UserError, match="below the minimum"):
        plan(4)


def test_nf4_is_never_planned_without_bitsandbytes(monkeypatch) -> None:
    # Make nf4 the smallest LM, so only bitsandbytes' absence keeps it out of the plans.
    real = planner.lm_sizes

    def sizes(config, dtype, quant, rows, positions, songs=1):
        s = real(config, dtype, quant, rows, positions, songs)
        return dataclasses.replace(s, weights=s.weights // 2) if quant == "nf4" else s

    monkeypatch.setattr(planner, "lm_sizes", sizes)
    monkeypatch.setattr(planner, "bnb_installed", lambda: True)
    assert "nf4" in planner._quant_order(LM_CONFIG, BF16, 2, 4096)
    monkeypatch.setattr(planner, "bnb_installed", lambda: False)
    assert "nf4" not in planner._quant_order(LM_CONFIG, BF16, 2, 4096)
    assert all(c.quant != "nf4" for c in candidate_plans(
        LM_CONFIG, CODEC_CONFIG, budget_bytes=4 * GiB, max_frames=FRAMES_240S, cfg_rows=2,
        lm_dtype=BF16, codec_dtype=torch.float32))  # fmt: skip


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
    assert cli.main(["plan", f"--vram={vram}"]) == common.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vram" in err


def test_cli_plan_prints_the_plan(capsys) -> None:
    # 8 GiB cannot hold the 7.3 GiB bf16 LM with its cache: it must be quantized, and int8
    # (4.2 GiB) fits; no GPU is measured, so the plan says its figures are the defaults.
    assert cli.main(["plan", "--vram", "8G", "--max-seconds", "240"]) == 0
    out = capsys.readouterr().out
    assert "quantization int8" in out and "predicted peak" in out
    for overhead in ("CUDA context 0.50 GiB", "3 streams × 32 MiB", "cuDNN workspace 256 MiB"):
        assert overhead in out
    assert "Triton autotune 256 MiB" in out and "default figures" in out
    assert "headroom kept free: 0.40 GiB" in out  # 5% of 8 GiB


def test_cli_plan_names_the_rows_and_the_most_songs(capsys) -> None:
    assert cli.main(["plan", "--vram", "24G", "--songs", "4"]) == 0
    out = capsys.readouterr().out
    assert "(4 songs of up to 3000 frames at once)" in out
    assert "KV cache: 4096 positions × 8 rows (4 songs × 2: guidance), " in out
    room = re.search(
        r"room for up to (\d+) songs of up to 3000 frames at once in this plan \((\d+) LM rows\)",
        out,
    )
    assert room, out
    mixed = CODEC_PRECISIONS["mixed"][0]  # the codec a plan is for without --codec-dtype
    most = plan(24, songs=4, codec_dtype=mixed).max_songs
    assert (int(room[1]), int(room[2])) == (most, 2 * most) and most >= 4


@pytest.mark.parametrize("songs", ["0", "-2"])
def test_cli_refuses_fewer_than_one_song_in_one_line(songs: str, capsys) -> None:
    assert cli.main(["plan", "--vram", "24G", f"--songs={songs}"]) == common.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "songs at once must be a whole number" in err


def test_planning_changes_no_module() -> None:
    """The planner sizes, searches and formats; what applies a plan (placement, host copies,
    layer streaming) lives in placement.py and offload.py, held by the pipeline."""
    appliers = {"Placement", "HostCopy", "OffloadedLayers", "use_fast_kernels", "use_fused_layers"}
    module_state = {k: v for k, v in vars(planner).items() if not k.startswith("__")}
    assert not appliers & module_state.keys()
    held = [
        k
        for k, v in module_state.items()
        if isinstance(v, dict | list | set)
        and any(
            isinstance(x, torch.nn.Module | HostCopy)
            for x in (v.values() if isinstance(v, dict) else v)
        )
    ]
    assert not held  # no registry of models or host copies


PLAN_12G = """
import sys
from heartmula_rt.cli import main
code = main(["plan", "--vram", "12G", *sys.argv[1:]])
print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
sys.exit(code)
"""


def test_plan_imports_no_torch(tiny_ckpt) -> None:
    """A plan is arithmetic on the configs: no torch (seconds to import), for the default model
    and for a checkpoint folder, whatever the song length."""
    for args in ([], ["--max-seconds", "60"], ["--model-path", str(tiny_ckpt)]):
        done = subprocess.run(
            [sys.executable, "-c", PLAN_12G, *args], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "LM" in done.stdout and done.stderr.strip().splitlines()[-1] == "no torch"
