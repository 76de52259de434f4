"""Memory plans for a GPU budget (`--vram 12G`): which quantization, what sits on the GPU and what
in host memory, where the codec lives, and the predicted peak, decided before any weight loads.

Every size is exact, not estimated: the LM (quantized as planned) and the codec are built on the
meta device, two layers of each stack (`TRACED_LAYERS`), and their bytes counted (`module_bytes`,
the other layers as many more of the first); the KV cache is allocated on meta as the
static engine would; activations are the peak of live tensor bytes while one prompt step, one
decode frame (what the graph engine's private pool keeps) and one codec window run on meta
(`LiveBytes`). What the meta device cannot see is `DeviceOverheads`: the CUDA context and the
libraries' workspaces, measured on the GPU at load (`measure_overheads`) or, without one,
documented figures. Every plan keeps `headroom_bytes` of the budget free beyond its peak.

A song has two phases: the LM decoding frames (its weights, KV cache, step workspace), then the
codec decoding windows (its weights and one window's activations). The plan is the fastest
layout whose larger phase fits: bf16 LM before int8 before int4 (nf4 only if smaller), the codec
resident before moved in after the LM before its DiT streamed from host memory, and the LM's own
backbone layers streamed (offload.py) only as the last resort.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .checkpoint import CODEC_DIR, LM_DIR, load_codec_config, load_lm_config
from .codec import HeartCodec
from .codec.detokenize import LATENTS_PER_CODE, WINDOW
from .config import CODEC_PRESETS, LM_PRESETS, CodecConfig, LlamaFlavor, LMConfig
from .engine import CAPACITY_STEP
from .errors import UserError
from .lm import HeartMuLa
from .quant import quantize_model
from .quant.fast import bnb_installed
from .request import DEFAULT_CODEC
from .synthetic import CODEC_FOR_LM

GiB = 2**30
MiB = 2**20
# Reserved exceeds allocated: the caching allocator rounds blocks up and cannot always split a
# cached segment for a new size. 5% covers both for our few large, long-lived tensors.
ALLOCATOR_SLACK = 0.05
# The prompt a plan makes room for: tags plus a long lyric sheet tokenize to well under this.
PROMPT_TOKENS = 1024
# Ring slots of every offloaded layer stack: one layer computing while the next one copies in.
OFFLOAD_SLOTS = 2
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

CODEC_PLACEMENTS = ("resident", "after_lm", "offload")
LM_DURING_CODEC = ("kept", "cache_freed", "released")
# Layers of each stack (the LM's backbone and depth decoder, each DiT stage) that the size counts
# build and trace on meta; the others are counted by arithmetic. The layers of a stack are one
# module at one shape, so their bytes and KV caches repeat, and so do their live bytes from the
# second layer on: the first one's input is the stack's input, which the caller holds until the
# stack returns, and every later one's input is the layer before's output, alive beside it.
TRACED_LAYERS = 2


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


def cuda_context_bytes(device: torch.device) -> int:
    """The CUDA context's bytes on `device` now (kernel images load as they are first used)."""
    free, total = torch.cuda.mem_get_info(device)
    return _unreserved(total, free, torch.cuda.memory_reserved(device))


def read_overheads(device: torch.device) -> OverheadReadings:
    """The readings behind `measure_overheads` (a CUDA device; well under a second)."""
    with torch.cuda.device(device):
        a = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
        bias, out = torch.zeros(64, device=device, dtype=a.dtype), torch.empty_like(a)
        torch.mm(a, a, out=out)  # the cuBLAS handle
        signal = torch.ones(1, 1, 64, device=device)
        F.conv1d(signal, torch.ones(1, 1, 3, device=device))  # the cuDNN handle
        # Drop every stream's workspace, so the next matmul (and addmm, which may take
        # cuBLASLt's) allocates the main stream's afresh: its allocated growth is one stream's.
        torch.cuda.synchronize(device)
        torch._C._cuda_clearCublasWorkspaces()
        before = torch.cuda.memory_allocated(device)
        torch.mm(a, a, out=out)
        torch.addmm(bias, a, a, out=out)
        workspace = torch.cuda.memory_allocated(device) - before
        try:
            from triton.runtime import driver
        except ImportError:
            autotune = 0
        else:
            autotune = driver.active.get_empty_cache_for_benchmark().nbytes
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the probe's own blocks
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
    return OverheadReadings(total, free, reserved, workspace, autotune)


def measure_overheads(device: torch.device) -> DeviceOverheads:
    """`DeviceOverheads` measured on a CUDA device: run once before a plan is made there."""
    return overheads_from(read_overheads(device))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors made and still alive while the mode is on (inputs, weights and
    views of them excluded): the eager activation peak, countable on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()  # one Python object per storage, freed with it
            key = id(storage)
            if key in inputs or key in self._counted:
                continue
            self._counted.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (a quantized module's packed weights too)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _activation_peak(run: Callable[[], object]) -> int:
    mode = LiveBytes()
    with torch.no_grad(), mode:
        run()
    return mode.peak


@dataclass(frozen=True)
class LMSizes:
    """Bytes of one LM layout, counted on the meta device."""

    weights: int  # everything, text embeddings included
    text_embeddings: int
    backbone_layer: int  # one backbone layer (all are identical)
    num_backbone_layers: int
    kv_cache: int  # the static engine's caches for the planned song
    workspace: int  # the activation peak of the prompt step (the largest step)
    frame_workspace: int  # a decode frame's at a full cache: the graph engine's pool keeps it


@dataclass(frozen=True)
class CodecSizes:
    weights: int  # DiT (VQ, conditioning, estimator) and scalar decoder
    dit_blocks: int  # both stages' transformer blocks: what offload streams
    dit_ring: int  # OFFLOAD_SLOTS blocks of each stage
    dit_activations: int  # one guided ODE step over a window
    scalar_activations: int  # the scalar decoder over a window


def _traced_flavor(flavor: LlamaFlavor) -> LlamaFlavor:
    """`flavor` with only the layers the size counts trace (`TRACED_LAYERS`)."""
    return replace(flavor, num_layers=min(flavor.num_layers, TRACED_LAYERS))


def kv_positions(config: LMConfig, max_frames: int) -> int:
    """Cache positions of the static engine for a PROMPT_TOKENS prompt and `max_frames` frames
    (rounded up to its CAPACITY_STEP, at most the context)."""
    positions = PROMPT_TOKENS + max_frames + 1
    return min(math.ceil(positions / CAPACITY_STEP) * CAPACITY_STEP, config.backbone.max_seq_len)


@functools.lru_cache(maxsize=32)
def lm_sizes(
    config: LMConfig, dtype: torch.dtype, quant: str, rows: int, positions: int
) -> LMSizes:
    traced = replace(
        config, backbone=_traced_flavor(config.backbone), decoder=_traced_flavor(config.decoder)
    )
    with torch.device("meta"):
        lm = HeartMuLa(traced).to(dtype)
    quantize_model(lm, quant)
    cache = lm.new_cache(rows, positions)
    # Each stack's bytes and KV cache as built, and its layers left out, counted as its first.
    weights, kv = module_bytes(lm), 0
    for stack, caches, flavor in (
        (lm.backbone, cache.backbone, config.backbone),
        (lm.decoder, cache.decoder, config.decoder),
    ):
        left_out = flavor.num_layers - len(stack.layers)
        weights += left_out * module_bytes(stack.layers[0])
        kv += (len(caches) + left_out) * (caches[0].k.nbytes + caches[0].v.nbytes)

    def prompt_step() -> None:
        ids = torch.zeros(min(PROMPT_TOKENS, positions), dtype=torch.long, device="meta")
        last, _ = lm.backbone_step(lm.embed_prompt(ids, 0, rows), 0, cache)
        token = torch.zeros(rows, 2, config.backbone.embed_dim, dtype=dtype, device="meta")
        lm.decoder_step(token + last[:, None], 0, cache, 1)

    def frame_step() -> None:
        """One frame's backbone step reading every cached position, then its first decoder
        step (the widest; sampling's few [rows, vocab] rows are below both). On meta, SDPA
        takes its math path (float32 copies of K and V) and quantized linears their plain one,
        so this bounds the GPU's fused kernels from above."""
        frame = torch.zeros(rows, config.audio_num_codebooks, dtype=torch.long, device="meta")
        last, _ = lm.backbone_step(lm.embed_frame(frame), positions - 1, cache)
        token = torch.zeros(rows, 2, config.backbone.embed_dim, dtype=dtype, device="meta")
        lm.decoder_step(token + last[:, None], 0, cache, 1)

    return LMSizes(
        weights=weights,
        text_embeddings=module_bytes(lm.text_embeddings),
        backbone_layer=module_bytes(lm.backbone.layers[0]),
        num_backbone_layers=config.backbone.num_layers,
        kv_cache=kv,
        workspace=_activation_peak(prompt_step),
        frame_workspace=_activation_peak(frame_step),
    )


@functools.lru_cache(maxsize=8)
def codec_sizes(config: CodecConfig, dtype: torch.dtype) -> CodecSizes:
    blocks = (config.num_layers, config.num_layers_2)  # of each DiT stage
    built = [min(n, TRACED_LAYERS) for n in blocks]
    with torch.device("meta"):
        codec = HeartCodec(replace(config, num_layers=built[0], num_layers_2=built[1]))
        codec.to(dtype)
    for part in codec.float32_parts():  # as checkpoint.load_codec
        part.float()
    est = codec.flow_matching.estimator
    block_bytes = [module_bytes(s[0]) for s in (est.transformer_blocks, est.transformer_blocks_2)]
    stages = list(zip(blocks, built, block_bytes, strict=True))
    frames = LATENTS_PER_CODE * WINDOW
    latents = torch.zeros(1, frames, config.out_channels, device="meta")
    mu = torch.zeros(1, frames, config.dim, dtype=dtype, device="meta")
    streams = config.out_channels // config.latent_hidden_dim

    def ode_step() -> None:
        codec.flow_matching.sample(
            mu, latents, latents, 0, num_steps=1, guidance_scale=DEFAULT_CODEC.guidance_scale
        )

    def scalar() -> None:
        codec.scalar_model(torch.zeros(streams, config.latent_hidden_dim, frames, device="meta"))

    return CodecSizes(
        weights=module_bytes(codec) + sum((n - k) * b for n, k, b in stages),
        dit_blocks=sum(n * b for n, _, b in stages),
        dit_ring=sum(min(OFFLOAD_SLOTS, n) * b for n, _, b in stages),
        dit_activations=_activation_peak(ode_step),
        scalar_activations=_activation_peak(scalar),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Where everything lives for one budget, and what the planner predicts it costs."""

    budget_bytes: int
    max_frames: int
    lm_dtype: torch.dtype
    codec_dtype: torch.dtype
    quant: str
    text_embeddings_on_gpu: bool
    offloaded_lm_layers: int  # backbone layers streamed from pinned host memory
    num_backbone_layers: int
    codec_placement: str  # CODEC_PLACEMENTS
    lm_during_codec: str  # LM_DURING_CODEC
    kv_positions: int
    kv_rows: int
    kv_bytes: int
    lm_phase_bytes: int  # model tensors allocated by torch while the LM makes frames
    codec_phase_bytes: int  # model tensors allocated by torch while the codec decodes
    overheads: DeviceOverheads = DEFAULT_OVERHEADS  # the context and workspaces planned with

    @property
    def lm_phase_peak(self) -> int:
        """Reserved by torch while the LM makes frames: its tensors with the allocator's
        slack, and the workspaces beside them."""
        return _with_slack(self.lm_phase_bytes) + self.overheads.lm_phase(self.quant)

    @property
    def codec_phase_peak(self) -> int:
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
        """Whether the codec can decode while the LM runs (streaming): both stay on the GPU."""
        return self.codec_placement == "resident" and self.lm_during_codec == "kept"


def _with_slack(allocated: int) -> int:
    return math.ceil(allocated * (1 + ALLOCATOR_SLACK))


def _phases(plan: MemoryPlan, lm: LMSizes, codec: CodecSizes) -> MemoryPlan:
    """The plan with both phases' bytes filled in."""
    k = plan.offloaded_lm_layers
    lm_weights = lm.weights - k * lm.backbone_layer
    if not plan.text_embeddings_on_gpu:
        lm_weights -= lm.text_embeddings
    lm_ring = min(OFFLOAD_SLOTS, k) * lm.backbone_layer
    # The graph pool stays between songs, so the next prompt step runs beside it.
    lm_running = lm_weights + lm.kv_cache + lm.frame_workspace + lm.workspace + lm_ring
    lm_phase = lm_running + (codec.weights if plan.codec_placement == "resident" else 0)
    lm_left = {"kept": lm_running, "cache_freed": lm_weights, "released": 0}[plan.lm_during_codec]
    if plan.codec_placement == "offload":
        # The ring is freed after each pass, so the scalar decoder can reuse its memory.
        resident = codec.weights - codec.dit_blocks
        codec_running = resident + max(
            codec.dit_ring + codec.dit_activations, codec.scalar_activations
        )
    else:
        codec_running = codec.weights + max(codec.dit_activations, codec.scalar_activations)
    return replace(plan, lm_phase_bytes=lm_phase, codec_phase_bytes=lm_left + codec_running)


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


def _quant_order(config: LMConfig, dtype: torch.dtype, rows: int, positions: int) -> Iterator[str]:
    """none, int8, int4, then nf4 only where it is smaller than int4 and bitsandbytes, its
    only fast path on a GPU, is installed. Lazily: the sizes of int4 and nf4 are counted only
    once a plan gets past int4, which most budgets never do."""
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
    lm_dtype: torch.dtype,
    codec_dtype: torch.dtype,
    overheads: DeviceOverheads = DEFAULT_OVERHEADS,
) -> Iterator[MemoryPlan]:
    """Every plan the planner considers, fastest first (the last is the most frugal)."""
    positions = kv_positions(lm_config, max_frames)
    codec = codec_sizes(codec_config, codec_dtype)
    base = {
        "budget_bytes": budget_bytes,
        "max_frames": max_frames,
        "lm_dtype": lm_dtype,
        "codec_dtype": codec_dtype,
        "kv_positions": positions,
        "kv_rows": cfg_rows,
        "num_backbone_layers": lm_config.backbone.num_layers,
        "lm_phase_bytes": 0,
        "codec_phase_bytes": 0,
        "overheads": overheads,
    }

    def plan(quant: str, layout: tuple[bool, str, str], offloaded: int = 0) -> MemoryPlan:
        lm = lm_sizes(lm_config, lm_dtype, quant, cfg_rows, positions)
        text, placement, during = layout
        bare = MemoryPlan(
            **base,
            quant=quant,
            kv_bytes=lm.kv_cache,
            text_embeddings_on_gpu=text,
            offloaded_lm_layers=offloaded,
            codec_placement=placement,
            lm_during_codec=during,
        )
        return _phases(bare, lm, codec)

    for layouts in (_CHEAP_LAYOUTS, _CODEC_OFFLOAD_LAYOUTS):
        for quant in _quant_order(lm_config, lm_dtype, cfg_rows, positions):
            for layout in layouts:
                yield plan(quant, layout)
    smallest = min(
        _quant_order(lm_config, lm_dtype, cfg_rows, positions),
        key=lambda q: lm_sizes(lm_config, lm_dtype, q, cfg_rows, positions).weights,
    )
    for offloaded in range(1, lm_config.backbone.num_layers + 1):
        yield plan(smallest, _CODEC_OFFLOAD_LAYOUTS[-1], offloaded)


def plan_memory(
    budget_bytes: int,
    lm_config: LMConfig,
    codec_config: CodecConfig,
    *,
    max_frames: int,
    cfg_rows: int = 2,
    lm_dtype: torch.dtype = torch.bfloat16,
    codec_dtype: torch.dtype = torch.float32,
    overheads: DeviceOverheads = DEFAULT_OVERHEADS,
) -> MemoryPlan:
    """The fastest plan that fits `budget_bytes` with its headroom (`overheads`: measured on
    the GPU where there is one, `measure_overheads`); UserError naming the minimum if none
    does."""
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
    ):
        if last.fits():
            return last
    need = math.ceil(_minimum_budget(last) / GiB * 100) / 100  # as printed, and enough
    raise UserError(
        f"--vram {budget_bytes / GiB:.2f} GiB is below the minimum of {need:.2f} GiB "
        f"for this model and songs of {max_frames} frames"
    )


def _minimum_budget(plan: MemoryPlan) -> int:
    """The smallest budget `plan` fits with its headroom (which grows with the budget)."""
    peak = plan.predicted_peak_bytes
    return max(peak + HEADROOM_MIN_BYTES, math.ceil(peak / (1 - HEADROOM_FRACTION)))


def preset_configs(lm_preset: str = "3B") -> tuple[LMConfig, CodecConfig]:
    """The full-size configs of a built-in preset (no weights needed)."""
    return LMConfig.from_dict(LM_PRESETS[lm_preset]), CODEC_PRESETS[CODEC_FOR_LM[lm_preset]]


def checkpoint_configs(root: Path) -> tuple[LMConfig, CodecConfig]:
    """A checkpoint folder's configs, from config.json and the safetensors headers only."""
    return load_lm_config(Path(root) / LM_DIR), load_codec_config(Path(root) / CODEC_DIR)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a few lines for the terminal."""
    n, k = plan.num_backbone_layers, plan.offloaded_lm_layers
    dtype = str(plan.lm_dtype).removeprefix("torch.")
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
    }[plan.codec_placement]
    during = {
        "kept": "kept",
        "cache_freed": "weights kept, KV cache freed",
        "released": "moved to host memory",
    }[plan.lm_during_codec]
    o = plan.overheads
    lm_extra = "" if plan.quant != "int8" else f", Triton autotune {_mib(o.triton_autotune)}"
    source = "measured on this GPU" if o.measured else "default figures, no GPU measured"
    return "\n".join(
        [
            f"memory plan for --vram {plan.budget_bytes / GiB:g}G "
            f"(songs of up to {plan.max_frames} frames):",
            f"  LM: {dtype}, quantization {plan.quant}; {layers}; text embeddings {text}",
            f"  KV cache: {plan.kv_positions} positions × {plan.kv_rows} rows (2: guidance), "
            f"{_gib(plan.kv_bytes)}",
            f"  codec: {str(plan.codec_dtype).removeprefix('torch.')} DiT, {codec}; "
            f"LM during codec decode: {during}",
            f"  overheads ({source}): CUDA context {_gib(o.cuda_context)}; cuBLAS workspaces "
            f"{o.matmul_streams} streams × {_mib(o.cublas_workspace)}; cuDNN workspace "
            f"{_mib(o.cudnn_workspace)} (codec phase); Triton autotune "
            f"{_mib(o.triton_autotune)} (int8 LM phase)",
            f"  LM phase: {_gib(plan.lm_phase_peak)} (tensors {_gib(plan.lm_phase_bytes)} "
            f"+{ALLOCATOR_SLACK:.0%} allocator slack, cuBLAS workspaces{lm_extra})",
            f"  codec phase: {_gib(plan.codec_phase_peak)} (tensors "
            f"{_gib(plan.codec_phase_bytes)} +{ALLOCATOR_SLACK:.0%} allocator slack, cuBLAS "
            "and cuDNN workspaces)",
            f"  predicted peak: {_gib(plan.predicted_peak_bytes)} (the larger phase + the CUDA "
            f"context); headroom kept free: {_gib(plan.headroom_bytes)} "
            f"(max({HEADROOM_FRACTION:.0%} of the budget, {_mib(HEADROOM_MIN_BYTES)}))",
        ]
    )
