"""How a memory plan reads: the lines `heartmula-rt plan`, `gen --vram` and `bench --vram`
print (`format_plan`), and what embedding a reference clip takes (`format_embedder`)."""

from __future__ import annotations

from heartmula_rt.memory.footprint import embedder_sizes
from heartmula_rt.memory.planner import (
    ALLOCATOR_SLACK,
    HEADROOM_FRACTION,
    HEADROOM_MIN_BYTES,
    MAX_SONGS,
    CodecDevicePlan,
    GiB,
    MemoryPlan,
    MiB,
)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a few lines for the terminal."""
    n, k = plan.num_backbone_layers, plan.offloaded_lm_layers
    dtype = plan.lm_dtype
    layers = (
        f"{k} of {n} backbone layers streamed from pinned host memory"
        if k
        else f"all {n} backbone layers on the GPU"
    )
    text = "on the GPU" if plan.text_embeddings_on_gpu else "in host memory"
    codec = {
        "resident": "on the GPU throughout",
        "after_lm": "moved onto the GPU after the LM",
        "offload": "DiT blocks streamed from pinned host memory, the rest moved in after the LM",
        "apart": "on a GPU of its own (below)"
        if plan.codec_device_plan
        else "on the CPU (not planned)",
    }[plan.codec_placement]
    during = {
        "kept": "kept",
        "cache_freed": "weights kept, KV cache freed",
        "released": "moved to host memory",
    }[plan.lm_during_codec]
    whose = " on the LM's GPU" if plan.codec_placement == "apart" else ""
    if plan.codec_placement == "apart":
        codec_phase = "  codec phase: none on this GPU (the LM goes on while the codec decodes)"
    else:
        codec_phase = (
            f"  codec phase: {_gib(plan.codec_phase_peak)} (tensors "
            f"{_gib(plan.codec_phase_bytes)} +{ALLOCATOR_SLACK:.0%} allocator slack, cuBLAS "
            "and cuDNN workspaces)"
        )
    o = plan.overheads
    lm_extra = "" if plan.quant != "int8" else f", Triton autotune {_mib(o.triton_autotune)}"
    source = "measured on this GPU" if o.measured else "default figures, no GPU measured"
    planned = "songs" if plan.songs == 1 else f"{plan.songs} songs"
    at_once = "" if plan.songs == 1 else " at once"
    per_song = plan.rows_per_song
    guidance = "guidance" if per_song == 2 else "no guidance"
    most = plan.max_songs
    room = f"up to {_count(most, 'song')}" if most < MAX_SONGS else f"{most} or more songs"
    counted = "" if most < MAX_SONGS else f" for {most}, the most counted"
    return "\n".join(
        [
            f"memory plan for --vram {plan.budget_bytes / GiB:g}G{whose} "
            f"({planned} of up to {plan.max_frames} frames{at_once}):",
            f"  LM: {dtype}, quantization {plan.quant}; {layers}; text embeddings {text}"
            + (f"; per-song LoRAs {_mib(plan.lora_bytes)}" if plan.lora_bytes else ""),
            f"  KV cache: {plan.kv_positions} positions × {_count(plan.kv_rows, 'row')} "
            f"({_count(plan.songs, 'song')} × {per_song}: {guidance}), {_gib(plan.kv_bytes)}",
            f"  codec: {plan.codec_dtype} DiT, {codec}; LM during codec decode: {during}",
            f"  overheads ({source}): CUDA context {_gib(o.cuda_context)}; cuBLAS workspaces "
            f"{o.matmul_streams} streams × {_mib(o.cublas_workspace)}; cuDNN workspace "
            f"{_mib(o.cudnn_workspace)} (codec phase); Triton autotune "
            f"{_mib(o.triton_autotune)} (int8 LM phase)",
            f"  LM phase: {_gib(plan.lm_phase_peak)} (tensors {_gib(plan.lm_phase_bytes)} "
            f"+{ALLOCATOR_SLACK:.0%} allocator slack, cuBLAS workspaces{lm_extra})",
            codec_phase,
            f"  predicted peak: {_gib(plan.predicted_peak_bytes)} (the larger phase + the CUDA "
            f"context); headroom kept free: {_gib(plan.headroom_bytes)} "
            f"(max({HEADROOM_FRACTION:.0%} of the budget, {_mib(HEADROOM_MIN_BYTES)}))",
            f"  room for {room} of up to {plan.max_frames} frames at once in this plan "
            f"({most * per_song} LM rows{counted})",
            *_codec_device_lines(plan.codec_device_plan),
        ]
    )


def _codec_device_lines(plan: CodecDevicePlan | None) -> list[str]:
    """The codec's own GPU's plan, for `format_plan`."""
    if plan is None:
        return []
    where = (
        f"{plan.codec_dtype} DiT blocks streamed from pinned host memory, the rest resident"
        if plan.dit_streamed
        else f"resident ({plan.codec_dtype} DiT blocks)"
    )
    source = "measured on that GPU" if plan.overheads.measured else "default figures"
    return [
        f"codec's GPU, --vram {plan.budget_bytes / GiB:g}G:",
        f"  codec: {where}; one window at a time",
        f"  codec phase: {_gib(plan.codec_phase_peak)} (tensors {_gib(plan.codec_phase_bytes)} "
        f"+{ALLOCATOR_SLACK:.0%} allocator slack, cuBLAS and cuDNN workspaces, {source})",
        f"  predicted peak: {_gib(plan.predicted_peak_bytes)} (+ the CUDA context); headroom "
        f"kept free: {_gib(plan.headroom_bytes)}",
    ]


def embedder_bytes(device: str = "cpu") -> dict[str, int]:
    """Peak bytes that embedding a reference clip takes, by where they are: "cpu" (host
    memory) and, with the embedder on a GPU (`device` "cuda…"), "gpu". It runs before the LM
    and codec load and is freed before them, so it adds to no plan of theirs; a GPU it runs
    on needs its weights and one clip's workspace free at that time. Loading is on the host
    either way."""
    sizes = embedder_sizes()
    if device == "cpu":
        return {"cpu": max(sizes.load_peak, sizes.running)}
    return {"cpu": sizes.load_peak, "gpu": sizes.running}


def format_embedder(device: str = "cpu", budget_bytes: int | None = None) -> str:
    """One line for `--ref-audio`'s plan: what embedding the clip takes, where; with the GPU's
    `budget_bytes`, whether it fits that GPU (it is freed before the LM loads, so it adds to
    neither the LM's peak nor the codec's)."""
    sizes = embedder_bytes(device)
    where = ", ".join(f"{_gib(n)} {kind}" for kind, n in sizes.items())
    line = f"reference embedder (MuQ-MuLan, float32, run and freed before the LM loads): {where}"
    if "gpu" in sizes and budget_bytes is not None and sizes["gpu"] > budget_bytes:
        line += f"; more than the GPU's {_gib(budget_bytes)}: embed on the CPU (--ref-device cpu)"
    return line
