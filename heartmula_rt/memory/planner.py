"""Memory plans for a GPU budget (`--vram 12G`): which quantization, what sits on the GPU and what
in host memory, where the codec lives, and the predicted peak, decided before any weight loads.

The sizes come from footprint.py, arithmetic on the configs: weights, KV caches and DiT blocks
exact, activations bounded from above (tests hold both to counts on the meta device, sizing.py).
Nothing here imports torch, so a plan takes milliseconds. What the configs cannot say is
`DeviceOverheads`: the CUDA context and the libraries' workspaces, measured on the GPU at load
(`sizing.measure_overheads`) or, without one, documented figures. Every plan keeps
`headroom_bytes` of the budget free beyond its peak.

A song has two phases: the LM decoding frames (its weights, KV cache, step workspace), then the
codec decoding windows (its weights and one window's activations). The plan is the fastest
layout whose larger phase fits: bf16 LM before int8 before int4 (nf4 only if smaller), the codec
resident before moved in after the LM before its DiT streamed from host memory, and the LM's own
backbone layers streamed (offload.py) only as the last resort.

With the codec on another device (`--codec-device`), each device is planned on its own budget
(`--vram 12G,8G`: the LM's GPU, then the codec's): the LM's plan holds no codec
(`codec_placement` "apart", the two never take turns), and the codec's GPU has a
`CodecDevicePlan`, its codec resident or its DiT streamed; a codec on the CPU is not planned.

A plan is for `songs` songs at once (scheduler.py): each has its own KV cache rows (1, or 2 with
guidance), a decode frame runs every row over the whole cache, and a prompt step one song's rows.
Each plan also says how many songs of its length its layout holds in the budget (`max_songs`).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from heartmula_rt.config import (
    CAPACITY_STEP,
    CODEC_FOR_LM,
    CODEC_PRESETS,
    LM_PRESETS,
    OFFLOAD_SLOTS,
    PROMPT_TOKENS,
    SHORT_PROMPT_TOKENS,
    CodecConfig,
    LMConfig,
)
from heartmula_rt.errors import UserError
from heartmula_rt.memory.footprint import CodecSizes, codec_sizes, lm_sizes
from heartmula_rt.request import check_songs

GiB = 2**30
MiB = 2**20
# Reserved exceeds allocated: the caching allocator rounds blocks up and cannot always split a
# cached segment for a new size. 5% covers both for our few large, long-lived tensors.
ALLOCATOR_SLACK = 0.05
# Kept free on top of every predicted peak, for what no figure here counts: kernel images that
# load lazily after the probe (each module on its first launch: Triton's, attention's, the
# codec's convolutions; tens of MiB each on an H100), fragmentation beyond ALLOCATOR_SLACK, and
# other processes that start on the GPU. A share of the budget, since fragmentation grows with
# what is allocated, but at least 256 MiB, which covers one more workspace of the largest kind
# below (Triton's autotune buffer, cuDNN's) if a second one is ever alive at once.
HEADROOM_FRACTION = 0.05
HEADROOM_MIN_BYTES = 256 * MiB
# Budgets the README's table lists; 24G and more all give the everything-resident plan.
TABLE_BUDGETS_GIB = (4, 6, 8, 12, 16, 24)
# The most songs at once a plan counts room for: more rows than a batch usefully runs, and a
# bound on the search (a roomy GPU holds hundreds of short unguided songs).
MAX_SONGS = 64

# "apart": on another device than the LM's, with its own plan there (`CodecDevicePlan`) or none.
CODEC_PLACEMENTS = ("resident", "after_lm", "offload", "apart")
LM_DURING_CODEC = ("kept", "cache_freed", "released")


def parse_vram(text: str) -> int:
    """A budget such as "12G", "12GiB", "6.5G" or "4096M" → bytes (G and M are binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GM])(?:i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise UserError(
            f"--vram {text!r} is not a memory size; write a number and a unit, such as 12G or 6144M"
        )
    value = float(m[1]) * (GiB if m[2].upper() == "G" else 2**20)
    if value <= 0:
        raise UserError(f"--vram {text!r} must be more than zero")
    return int(value)


def device_budgets(vram: str, *, codec_apart: bool, codec_on_gpu: bool) -> tuple[int, int | None]:
    """`--vram`'s budgets in bytes: the LM's GPU's, and the codec's GPU's where the codec has a
    GPU of its own (`codec_apart` and `codec_on_gpu`; None otherwise). One budget with two GPUs
    is each one's; two are the LM's, then the codec's."""
    budgets = [parse_vram(b) for b in vram.split(",")]
    if len(budgets) > 2:
        raise UserError(
            f"--vram {vram!r} gives {len(budgets)} budgets; give one, or two: the LM's GPU's, "
            "then the codec's"
        )
    if len(budgets) == 2 and not codec_apart:
        raise UserError(
            "--vram with two budgets is for two GPUs, the LM's then the codec's: put the codec "
            "on a GPU of its own with --codec-device cuda:N"
        )
    if len(budgets) == 2 and not codec_on_gpu:
        raise UserError(
            "--vram with two budgets is for two GPUs, and the codec's device is the CPU: give "
            "the LM's GPU's budget alone"
        )
    codec_budget = budgets[-1] if codec_apart and codec_on_gpu else None
    return budgets[0], codec_budget


def headroom_bytes(budget_bytes: int) -> int:
    """What a plan for `budget_bytes` leaves free beyond its predicted peak."""
    return max(math.ceil(budget_bytes * HEADROOM_FRACTION), HEADROOM_MIN_BYTES)


@dataclass(frozen=True)
class DeviceOverheads:
    """Device memory that no model tensor accounts for. The context lies outside torch's caching
    allocator (not in `memory_reserved`); the workspaces are allocated through it."""

    cuda_context: int  # context, cuBLAS/cuDNN handles, loaded kernel images
    cublas_workspace: int  # per stream a matmul ran on; torch keeps it for the process's life
    matmul_streams: int
    cudnn_workspace: int  # one convolution's, during the call (the codec's scalar decoder)
    triton_autotune: int  # Triton's L2-flush buffer while tuning (the int8 kernel, LM phase)
    measured: bool  # probed on the GPU, or the documented figures

    @property
    def cublas_workspaces(self) -> int:
        return self.cublas_workspace * self.matmul_streams

    def lm_phase(self, quant: str) -> int:
        """Workspaces alive beside the LM's tensors: int8's kernel is the autotuned one."""
        return self.cublas_workspaces + (self.triton_autotune if quant == "int8" else 0)

    def codec_phase(self) -> int:
        """Workspaces alive beside the codec's tensors (the cuBLAS ones are never freed)."""
        return self.cublas_workspaces + self.cudnn_workspace


# The figures planned with where no GPU is measured (`heartmula-rt plan`, tests), each the
# largest it is on the GPUs we target.
DEFAULT_OVERHEADS = DeviceOverheads(
    # nvidia-smi against torch's own reserved bytes, an H100 with torch 2.x and lazy module
    # loading, after the first matmul and convolution: about 0.5 GiB.
    cuda_context=GiB // 2,
    # torch's cuBLAS workspace per (handle, stream): 32 MiB on Hopper and Blackwell, 8 MiB and
    # 128 KiB elsewhere (CUBLAS_WORKSPACE_CONFIG's default); the larger.
    cublas_workspace=32 * MiB,
    # The main stream, the graph engine's side stream for first frames (engine.py), and the
    # codec's own stream while streaming (stream.py); offload's copy stream runs no matmul.
    matmul_streams=3,
    # Not measured yet: cuDNN chooses an algorithm per shape and allocates its workspace during
    # the call. As large as the scalar decoder's largest chunk activation (217.5 MiB), rounded
    # up: no algorithm torch picks by heuristics for these 1-D convolutions should need more
    # scratch than the data it convolves. `bench --vram` checks it against the measured peak.
    cudnn_workspace=256 * MiB,
    # triton.testing's benchmarker zeroes a 256 MiB buffer, allocated through torch, between
    # timed runs while `@triton.autotune` tunes a new shape (Triton 3.x).
    triton_autotune=256 * MiB,
    measured=False,
)


@dataclass(frozen=True)
class OverheadReadings:
    """What `measure_overheads` reads on the GPU after the first matmul and convolution."""

    total: int  # torch.cuda.mem_get_info
    free: int  # the same, at the same moment as `reserved`
    reserved: int  # torch.cuda.memory_reserved
    workspace: int  # allocated growth of one matmul on a stream without a workspace yet
    triton_autotune: int  # bytes of Triton's benchmark buffer, 0 without triton


def overheads_from(readings: OverheadReadings) -> DeviceOverheads:
    """Overheads from GPU readings; the figures nothing cheap can measure stay the defaults."""
    return replace(
        DEFAULT_OVERHEADS,
        cuda_context=_unreserved(readings.total, readings.free, readings.reserved),
        cublas_workspace=readings.workspace,
        triton_autotune=readings.triton_autotune,
        measured=True,
    )


def _unreserved(total: int, free: int, reserved: int) -> int:
    # Everything used on the device that torch did not reserve: the context, and memory of
    # other processes, which this one cannot have either.
    return total - free - reserved


def kv_positions(config: LMConfig, max_frames: int) -> int:
    """Cache positions of the static engine for a PROMPT_TOKENS prompt and `max_frames` frames
    (rounded up to its CAPACITY_STEP, at most the context)."""
    positions = PROMPT_TOKENS + max_frames + 1
    return min(math.ceil(positions / CAPACITY_STEP) * CAPACITY_STEP, config.backbone.max_seq_len)


def context_frames(config: LMConfig, prompt_tokens: int = SHORT_PROMPT_TOKENS) -> int:
    """Frames after frame 0 that the backbone's context holds after a prompt of
    `prompt_tokens` (the longest song the model makes without `extend`; <= 0: none)."""
    return config.backbone.max_seq_len - prompt_tokens - 1


def planned_frames(
    config: LMConfig, max_frames: int, prompt_tokens: int = SHORT_PROMPT_TOKENS
) -> int:
    """The frames a plan is for: `max_frames`, or fewer if the model's context holds fewer
    (a plan for songs `gen` would refuse is no plan); UserError if it holds none."""
    fits = context_frames(config, prompt_tokens)
    if fits < 1:
        raise UserError(
            f"the model's context of {config.backbone.max_seq_len} positions holds no song "
            f"after a prompt of {prompt_tokens} tokens"
        )
    return min(max_frames, fits)


def dtype_name(dtype: object) -> str:
    """A torch dtype's name ("bfloat16"), from the dtype or the name, without importing torch."""
    return str(dtype).removeprefix("torch.")


def bnb_installed() -> bool:
    """Whether bitsandbytes is installed, found without importing it (the import takes seconds):
    all a plan needs to know (`quant.fast.bnb_available` imports it, before NF4 runs)."""
    return importlib.util.find_spec("bitsandbytes") is not None


@dataclass(frozen=True)
class MemoryPlan:
    """Where everything lives for one budget, and what the planner predicts it costs."""

    budget_bytes: int
    max_frames: int
    lm_dtype: str  # torch's names: "bfloat16", ...
    codec_dtype: str  # the codec DiT blocks'
    quant: str
    text_embeddings_on_gpu: bool
    offloaded_lm_layers: int  # backbone layers streamed from pinned host memory
    num_backbone_layers: int
    codec_placement: str  # CODEC_PLACEMENTS
    lm_during_codec: str  # LM_DURING_CODEC
    kv_positions: int
    kv_rows: int  # songs × each song's rows (1, or 2 with guidance)
    kv_bytes: int
    lm_phase_bytes: int  # model tensors allocated by torch while the LM makes frames
    codec_phase_bytes: int  # model tensors allocated by torch while the codec decodes
    overheads: DeviceOverheads = DEFAULT_OVERHEADS  # the context and workspaces planned with
    songs: int = 1  # songs at once, planned for
    # The most songs of max_frames at once (at most MAX_SONGS) that this layout holds in the
    # budget; plan_memory fills it.
    max_songs: int = 1
    # With codec_placement "apart" on a GPU: that GPU's plan (None: the codec is on the CPU).
    codec_device_plan: CodecDevicePlan | None = None
    # LoRA adapters run per song (lora_rows.apply_lora_rows): their stacked A and B on the LM's GPU
    # (`lora_rows.lora_rows_bytes`), resident beside the weights whenever they are.
    lora_bytes: int = 0

    def __post_init__(self) -> None:  # dtypes given as torch dtypes are kept by name
        object.__setattr__(self, "lm_dtype", dtype_name(self.lm_dtype))
        object.__setattr__(self, "codec_dtype", dtype_name(self.codec_dtype))

    @property
    def rows_per_song(self) -> int:
        return self.kv_rows // self.songs

    @property
    def lm_phase_peak(self) -> int:
        """Reserved by torch while the LM makes frames: its tensors with the allocator's
        slack, and the workspaces beside them."""
        return _with_slack(self.lm_phase_bytes) + self.overheads.lm_phase(self.quant)

    @property
    def codec_phase_peak(self) -> int:
        """Reserved by torch on this GPU while the codec decodes (nothing when it is apart:
        the LM's phase goes on meanwhile)."""
        if self.codec_placement == "apart":
            return 0
        return _with_slack(self.codec_phase_bytes) + self.overheads.codec_phase()

    @property
    def predicted_peak_bytes(self) -> int:
        """What nvidia-smi would show at the worst moment: the larger phase, plus the CUDA
        context."""
        return self.overheads.cuda_context + max(self.lm_phase_peak, self.codec_phase_peak)

    @property
    def headroom_bytes(self) -> int:
        return headroom_bytes(self.budget_bytes)

    def fits(self) -> bool:
        return self.predicted_peak_bytes + self.headroom_bytes <= self.budget_bytes

    @property
    def codec_beside_lm(self) -> bool:
        """Whether the codec can decode while the LM runs (streaming): both stay on the GPU,
        or the codec has a device of its own."""
        apart = self.codec_placement == "apart"
        return apart or (self.codec_placement == "resident" and self.lm_during_codec == "kept")

    @property
    def codec_windows_planned(self) -> bool:
        """Whether a GPU's memory is planned for the codec's windows (one at a time): not when
        it runs on the CPU."""
        return self.codec_placement != "apart" or self.codec_device_plan is not None


@dataclass(frozen=True)
class CodecDevicePlan:
    """The codec alone on a GPU of its own, within that GPU's budget: resident, or its DiT
    blocks streamed from pinned host memory (the rest resident) where it does not fit."""

    budget_bytes: int
    codec_dtype: str  # the DiT blocks'
    dit_streamed: bool
    codec_phase_bytes: int  # model tensors allocated by torch while it decodes a window
    overheads: DeviceOverheads = DEFAULT_OVERHEADS  # that GPU's

    @property
    def codec_phase_peak(self) -> int:
        return _with_slack(self.codec_phase_bytes) + self.overheads.codec_phase()

    @property
    def predicted_peak_bytes(self) -> int:
        return self.overheads.cuda_context + self.codec_phase_peak

    @property
    def headroom_bytes(self) -> int:
        return headroom_bytes(self.budget_bytes)

    def fits(self) -> bool:
        return self.predicted_peak_bytes + self.headroom_bytes <= self.budget_bytes


def _with_slack(allocated: int) -> int:
    return math.ceil(allocated * (1 + ALLOCATOR_SLACK))


def _sized(plan: MemoryPlan, lm_config: LMConfig, codec_config: CodecConfig) -> MemoryPlan:
    """`plan` with its KV cache and both phases' bytes worked out for its layout and songs."""
    lm = lm_sizes(
        lm_config, plan.lm_dtype, plan.quant, plan.rows_per_song, plan.kv_positions, plan.songs
    )
    codec = codec_sizes(codec_config, plan.codec_dtype)
    k = plan.offloaded_lm_layers
    lm_weights = lm.weights - k * lm.backbone_layer
    if not plan.text_embeddings_on_gpu:
        lm_weights -= lm.text_embeddings
    lm_ring = min(OFFLOAD_SLOTS, k) * lm.backbone_layer
    # The graph pool stays between songs, so the next prompt step runs beside it.
    lm_weights += plan.lora_bytes
    lm_running = lm_weights + lm.kv_cache + lm.frame_workspace + lm.workspace + lm_ring
    lm_phase = lm_running + (codec.weights if plan.codec_placement == "resident" else 0)
    lm_left = {"kept": lm_running, "cache_freed": lm_weights, "released": 0}[plan.lm_during_codec]
    codec_here = 0
    if plan.codec_placement != "apart":
        codec_here = _codec_running(codec, dit_streamed=plan.codec_placement == "offload")
    return replace(
        plan,
        kv_bytes=lm.kv_cache,
        lm_phase_bytes=lm_phase,
        codec_phase_bytes=lm_left + codec_here,
    )


def _codec_running(codec: CodecSizes, *, dit_streamed: bool) -> int:
    """The codec's tensors while it decodes a window: its weights on the GPU (all, or all but
    the DiT blocks and their ring) and the larger stage's activations."""
    if dit_streamed:
        # The ring is freed after each pass, so the scalar decoder can reuse its memory.
        resident = codec.weights - codec.dit_blocks
        return resident + max(codec.dit_ring + codec.dit_activations, codec.scalar_activations)
    return codec.weights + max(codec.dit_activations, codec.scalar_activations)


def plan_codec_device(
    budget_bytes: int,
    codec_config: CodecConfig,
    *,
    codec_dtype: object = "float32",
    overheads: DeviceOverheads = DEFAULT_OVERHEADS,
) -> CodecDevicePlan:
    """The codec alone on a GPU of `budget_bytes`: resident if it fits with its headroom, else
    its DiT blocks streamed; UserError naming the minimum if neither fits."""
    dtype = dtype_name(codec_dtype)
    codec = codec_sizes(codec_config, dtype)
    plan = None
    for streamed in (False, True):
        plan = CodecDevicePlan(
            budget_bytes=budget_bytes,
            codec_dtype=dtype,
            dit_streamed=streamed,
            codec_phase_bytes=_codec_running(codec, dit_streamed=streamed),
            overheads=overheads,
        )
        if plan.fits():
            return plan
    raise UserError(
        f"--vram {budget_bytes / GiB:.2f} GiB for the codec's GPU is below the minimum of "
        f"{_minimum_gib(plan)} for this codec"
    )


def _with_songs(
    plan: MemoryPlan, songs: int, lm_config: LMConfig, codec_config: CodecConfig
) -> MemoryPlan:
    """`plan`'s layout for `songs` songs at once."""
    resized = replace(plan, songs=songs, kv_rows=songs * plan.rows_per_song)
    return _sized(resized, lm_config, codec_config)


def _most_songs(plan: MemoryPlan, lm_config: LMConfig, codec_config: CodecConfig) -> int:
    """The most songs at once (at most MAX_SONGS) that `plan`'s layout holds in its budget,
    counted up from its own songs: 0 if not even those fit. Bytes only grow with songs."""
    if not plan.fits():
        return 0
    most = plan.songs
    while most < MAX_SONGS and _with_songs(plan, most + 1, lm_config, codec_config).fits():
        most += 1
    return most


# Layouts from fastest to most frugal: (text embeddings on the GPU, codec placement, the LM
# during codec decode). Text embeddings on the CPU cost nothing but the prompt's lookup there.
_CHEAP_LAYOUTS = (
    (True, "resident", "kept"),
    (False, "resident", "kept"),
    (False, "resident", "cache_freed"),
    (False, "after_lm", "cache_freed"),
    (False, "after_lm", "released"),  # the LM's weights go to host memory and come back
)
# Streaming the DiT from host memory costs a copy of its blocks per ODE step.
_CODEC_OFFLOAD_LAYOUTS = ((False, "offload", "cache_freed"), (False, "offload", "released"))
# The codec on another device: the LM has its GPU to itself and never makes way.
_APART_LAYOUTS = ((True, "apart", "kept"), (False, "apart", "kept"))


def _quant_order(config: LMConfig, dtype: str, rows: int, positions: int) -> Iterator[str]:
    """none, int8, int4, then nf4 only where it is smaller than int4 and bitsandbytes, its
    only fast path on a GPU, is installed."""
    yield from ("none", "int8", "int4")
    if bnb_installed():
        nf4, int4 = (lm_sizes(config, dtype, q, rows, positions).weights for q in ("nf4", "int4"))
        if nf4 < int4:
            yield "nf4"


def candidate_plans(
    lm_config: LMConfig,
    codec_config: CodecConfig,
    *,
    budget_bytes: int,
    max_frames: int,
    cfg_rows: int,
    lm_dtype: object,
    codec_dtype: object,
    overheads: DeviceOverheads = DEFAULT_OVERHEADS,
    songs: int = 1,
    codec_apart: bool = False,
    lora_bytes: int = 0,
) -> Iterator[MemoryPlan]:
    """Every plan the planner considers for `songs` songs at once, fastest first (the last is
    the most frugal); with `codec_apart`, plans of the LM's GPU alone. The dtypes are torch
    dtypes or their names."""
    lm_dtype, codec_dtype = dtype_name(lm_dtype), dtype_name(codec_dtype)
    positions = kv_positions(lm_config, max_frames)
    base = {
        "budget_bytes": budget_bytes,
        "max_frames": max_frames,
        "lm_dtype": lm_dtype,
        "codec_dtype": codec_dtype,
        "kv_positions": positions,
        "kv_rows": songs * cfg_rows,
        "songs": songs,
        "num_backbone_layers": lm_config.backbone.num_layers,
        "kv_bytes": 0,
        "lm_phase_bytes": 0,
        "codec_phase_bytes": 0,
        "overheads": overheads,
        "lora_bytes": lora_bytes,
    }

    def plan(quant: str, layout: tuple[bool, str, str], offloaded: int = 0) -> MemoryPlan:
        text, placement, during = layout
        bare = MemoryPlan(
            **base,
            quant=quant,
            text_embeddings_on_gpu=text,
            offloaded_lm_layers=offloaded,
            codec_placement=placement,
            lm_during_codec=during,
        )
        return _sized(bare, lm_config, codec_config)

    groups = (_APART_LAYOUTS,) if codec_apart else (_CHEAP_LAYOUTS, _CODEC_OFFLOAD_LAYOUTS)
    for layouts in groups:
        for quant in _quant_order(lm_config, lm_dtype, cfg_rows, positions):
            for layout in layouts:
                yield plan(quant, layout)
    smallest = min(
        _quant_order(lm_config, lm_dtype, cfg_rows, positions),
        key=lambda q: lm_sizes(lm_config, lm_dtype, q, cfg_rows, positions).weights,
    )
    for offloaded in range(1, lm_config.backbone.num_layers + 1):
        yield plan(smallest, groups[-1][-1], offloaded)


def plan_memory(
    budget_bytes: int,
    lm_config: LMConfig,
    codec_config: CodecConfig,
    *,
    max_frames: int,
    cfg_rows: int = 2,
    songs: int = 1,
    lm_dtype: object = "bfloat16",
    codec_dtype: object = "float32",
    overheads: DeviceOverheads = DEFAULT_OVERHEADS,
    codec_apart: bool = False,
    codec_budget_bytes: int | None = None,
    codec_overheads: DeviceOverheads = DEFAULT_OVERHEADS,
    prompt_tokens: int = SHORT_PROMPT_TOKENS,
    lora_bytes: int = 0,
) -> MemoryPlan:
    """The fastest plan that fits `songs` songs at once of `max_frames` frames in
    `budget_bytes` with its headroom (`overheads`: measured on the GPU where there is one,
    `measure_overheads`), with the most songs its layout holds (`max_songs`); UserError naming
    the minimum if none does, and for several songs how many fit.

    `codec_apart`: the codec runs on another device, so the budget is the LM's alone; on a GPU
    of its own with `codec_budget_bytes` (and that GPU's `codec_overheads`), planned there
    (`plan_codec_device`, the plan's `codec_device_plan`), else on the CPU, unplanned.

    The plan is for songs of `max_frames`, or of what the model's context holds after a prompt
    of `prompt_tokens` if that is less (the plan's `max_frames` says which). `lora_bytes`: LoRA
    adapters run per song (`lora_rows.lora_rows_bytes`), counted with the LM's weights."""
    check_songs(songs)
    max_frames = planned_frames(lm_config, max_frames, prompt_tokens)
    if codec_budget_bytes is not None and not codec_apart:
        raise ValueError("a codec budget is for a codec apart from the LM")
    codec_device_plan = None
    if codec_budget_bytes is not None:
        codec_device_plan = plan_codec_device(
            codec_budget_bytes, codec_config, codec_dtype=codec_dtype, overheads=codec_overheads
        )
    last = None
    for last in candidate_plans(
        lm_config,
        codec_config,
        budget_bytes=budget_bytes,
        max_frames=max_frames,
        cfg_rows=cfg_rows,
        lm_dtype=lm_dtype,
        codec_dtype=codec_dtype,
        overheads=overheads,
        songs=songs,
        codec_apart=codec_apart,
        lora_bytes=lora_bytes,
    ):
        if last.fits():
            most = _most_songs(last, lm_config, codec_config)
            return replace(last, max_songs=most, codec_device_plan=codec_device_plan)
    gpu = " for the LM's GPU" if codec_apart else ""
    below = f"--vram {budget_bytes / GiB:.2f} GiB{gpu} is below the minimum of {_minimum_gib(last)}"
    if songs == 1:
        raise UserError(f"{below} for this model and songs of {max_frames} frames")
    one = _with_songs(last, 1, lm_config, codec_config)
    fit = _most_songs(one, lm_config, codec_config)
    holds = f"it holds at most {fit} such songs" if fit else f"one needs {_minimum_gib(one)}"
    raise UserError(
        f"{below} for this model and {songs} songs of {max_frames} frames at once; {holds}"
    )


def _minimum_budget(plan: MemoryPlan | CodecDevicePlan) -> int:
    """The smallest budget `plan` fits with its headroom (which grows with the budget)."""
    peak = plan.predicted_peak_bytes
    return max(peak + HEADROOM_MIN_BYTES, math.ceil(peak / (1 - HEADROOM_FRACTION)))


def _minimum_gib(plan: MemoryPlan | CodecDevicePlan) -> str:
    """`_minimum_budget` as printed, rounded up so that it is enough."""
    return f"{math.ceil(_minimum_budget(plan) / GiB * 100) / 100:.2f} GiB"


def preset_configs(lm_preset: str = "3B") -> tuple[LMConfig, CodecConfig]:
    """The full-size configs of a built-in preset (no weights needed)."""
    return LMConfig.from_dict(LM_PRESETS[lm_preset]), CODEC_PRESETS[CODEC_FOR_LM[lm_preset]]


def checkpoint_configs(root: Path) -> tuple[LMConfig, CodecConfig]:
    """A checkpoint folder's configs, from config.json and the safetensors headers only."""
    from heartmula_rt.model.folder import CODEC_DIR, LM_DIR, load_codec_config, load_lm_config

    return load_lm_config(Path(root) / LM_DIR), load_codec_config(Path(root) / CODEC_DIR)
