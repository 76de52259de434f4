"""Memory plans for a GPU budget (`--vram 12G`): which quantization, what sits on the GPU and what
in host memory, where the codec lives, and the predicted peak, decided before any weight loads.

Every size is exact, not estimated: the LM (quantized as planned) and the codec are built on the
meta device and their bytes counted (`module_bytes`); the KV cache is allocated on meta as
the static engine would; activations are the peak of live tensor bytes while one prompt step
and one codec window run on meta (`LiveBytes`). What the meta device cannot see is named below.

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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .checkpoint import CODEC_DIR, LM_DIR, load_codec_config, load_lm_config
from .codec import HeartCodec
from .codec.detokenize import LATENTS_PER_CODE, WINDOW
from .config import CODEC_PRESETS, LM_PRESETS, CodecConfig, LMConfig
from .engine import CAPACITY_STEP
from .errors import UserError
from .fused import use_fused_layers
from .lm import HeartMuLa
from .offload import HostCopy, OffloadedLayers
from .quant import quantize_model
from .quant.fast import use_fast_kernels
from .synthetic import CODEC_FOR_LM

GiB = 2**30
# The CUDA context, cuBLAS/cuDNN handles and loaded kernel images: device memory that torch's
# caching allocator never sees, so `max_memory_reserved` leaves it out. About 0.5 GiB on an H100
# with torch 2.x (lazy module loading); measured with nvidia-smi against an idle process.
CUDA_CONTEXT_BYTES = GiB // 2
# Reserved exceeds allocated: the caching allocator rounds blocks up and cannot always split a
# cached segment for a new size. 5% covers both for our few large, long-lived tensors.
ALLOCATOR_SLACK = 0.05
# The prompt a plan makes room for: tags plus a long lyric sheet tokenize to well under this.
PROMPT_TOKENS = 1024
# Ring slots of every offloaded layer stack: one layer computing while the next one copies in.
OFFLOAD_SLOTS = 2
# Budgets the README's table lists; 24G and more all give the everything-resident plan.
TABLE_BUDGETS_GIB = (4, 6, 8, 12, 16, 24)

CODEC_PLACEMENTS = ("resident", "after_lm", "offload")
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


@dataclass(frozen=True)
class CodecSizes:
    weights: int  # DiT (VQ, conditioning, estimator) and scalar decoder
    dit_blocks: int  # both stages' transformer blocks: what offload streams
    dit_ring: int  # OFFLOAD_SLOTS blocks of each stage
    dit_activations: int  # one guided ODE step over a window
    scalar_activations: int  # the scalar decoder over a window


def kv_positions(config: LMConfig, max_frames: int) -> int:
    """Cache positions of the static engine for a PROMPT_TOKENS prompt and `max_frames` frames
    (rounded up to its CAPACITY_STEP, at most the context)."""
    positions = PROMPT_TOKENS + max_frames + 1
    return min(math.ceil(positions / CAPACITY_STEP) * CAPACITY_STEP, config.backbone.max_seq_len)


@functools.lru_cache(maxsize=32)
def lm_sizes(
    config: LMConfig, dtype: torch.dtype, quant: str, batch: int, positions: int
) -> LMSizes:
    with torch.device("meta"):
        lm = HeartMuLa(config).to(dtype)
    quantize_model(lm, quant)
    cache = lm.new_cache(batch, positions)
    kv = sum(t.nbytes for c in cache.backbone + cache.decoder for t in (c.k, c.v))

    def prompt_step() -> None:
        ids = torch.zeros(min(PROMPT_TOKENS, positions), dtype=torch.long, device="meta")
        last, _ = lm.backbone_step(lm.embed_prompt(ids, 0, batch), 0, cache)
        token = torch.zeros(batch, 2, config.backbone.embed_dim, dtype=dtype, device="meta")
        lm.decoder_step(token + last[:, None], 0, cache, 1)

    return LMSizes(
        weights=module_bytes(lm),
        text_embeddings=module_bytes(lm.text_embeddings),
        backbone_layer=module_bytes(lm.backbone.layers[0]),
        num_backbone_layers=config.backbone.num_layers,
        kv_cache=kv,
        workspace=_activation_peak(prompt_step),
    )


@functools.lru_cache(maxsize=8)
def codec_sizes(config: CodecConfig, dtype: torch.dtype) -> CodecSizes:
    with torch.device("meta"):
        codec = HeartCodec(config).to(dtype)
    for part in codec.float32_parts():  # as checkpoint.load_codec
        part.float()
    est = codec.flow_matching.estimator
    stages = (est.transformer_blocks, est.transformer_blocks_2)
    frames = LATENTS_PER_CODE * WINDOW
    latents = torch.zeros(1, frames, config.out_channels, device="meta")
    mu = torch.zeros(1, frames, config.dim, dtype=dtype, device="meta")
    streams = config.out_channels // config.latent_hidden_dim

    def ode_step() -> None:
        codec.flow_matching.sample(mu, latents, latents, 0, num_steps=1, guidance_scale=1.25)

    def scalar() -> None:
        codec.scalar_model(torch.zeros(streams, config.latent_hidden_dim, frames, device="meta"))

    return CodecSizes(
        weights=module_bytes(codec),
        dit_blocks=sum(module_bytes(s) for s in stages),
        dit_ring=sum(min(OFFLOAD_SLOTS, len(s)) * module_bytes(s[0]) for s in stages),
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
    kv_batch: int
    kv_bytes: int
    lm_phase_bytes: int  # allocated by torch while the LM makes frames
    codec_phase_bytes: int  # allocated by torch while the codec decodes

    @property
    def predicted_peak_bytes(self) -> int:
        """What nvidia-smi would show at the worst moment: the larger phase with the
        allocator's slack, plus the CUDA context."""
        allocated = max(self.lm_phase_bytes, self.codec_phase_bytes)
        return CUDA_CONTEXT_BYTES + math.ceil(allocated * (1 + ALLOCATOR_SLACK))

    def fits(self) -> bool:
        return self.predicted_peak_bytes <= self.budget_bytes

    @property
    def codec_beside_lm(self) -> bool:
        """Whether the codec can decode while the LM runs (streaming): both stay on the GPU."""
        return self.codec_placement == "resident" and self.lm_during_codec == "kept"


def _phases(plan: MemoryPlan, lm: LMSizes, codec: CodecSizes) -> MemoryPlan:
    """The plan with both phases' bytes filled in."""
    k = plan.offloaded_lm_layers
    lm_weights = lm.weights - k * lm.backbone_layer
    if not plan.text_embeddings_on_gpu:
        lm_weights -= lm.text_embeddings
    lm_ring = min(OFFLOAD_SLOTS, k) * lm.backbone_layer
    lm_running = lm_weights + lm.kv_cache + lm.workspace + lm_ring
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


def _quant_order(config: LMConfig, dtype: torch.dtype, batch: int, positions: int) -> list[str]:
    """none, int8, int4, then nf4 only where it is smaller than int4."""
    order = ["none", "int8", "int4"]
    nf4, int4 = (lm_sizes(config, dtype, q, batch, positions).weights for q in ("nf4", "int4"))
    return order + ["nf4"] * (nf4 < int4)


def candidate_plans(
    lm_config: LMConfig,
    codec_config: CodecConfig,
    *,
    budget_bytes: int,
    max_frames: int,
    batch: int,
    lm_dtype: torch.dtype,
    codec_dtype: torch.dtype,
) -> Iterator[MemoryPlan]:
    """Every plan the planner considers, fastest first (the last is the most frugal)."""
    positions = kv_positions(lm_config, max_frames)
    quants = _quant_order(lm_config, lm_dtype, batch, positions)
    codec = codec_sizes(codec_config, codec_dtype)
    base = {
        "budget_bytes": budget_bytes,
        "max_frames": max_frames,
        "lm_dtype": lm_dtype,
        "codec_dtype": codec_dtype,
        "kv_positions": positions,
        "kv_batch": batch,
        "num_backbone_layers": lm_config.backbone.num_layers,
        "lm_phase_bytes": 0,
        "codec_phase_bytes": 0,
    }

    def plan(quant: str, layout: tuple[bool, str, str], offloaded: int = 0) -> MemoryPlan:
        lm = lm_sizes(lm_config, lm_dtype, quant, batch, positions)
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
        for quant in quants:
            for layout in layouts:
                yield plan(quant, layout)
    smallest = min(quants, key=lambda q: lm_sizes(lm_config, lm_dtype, q, batch, positions).weights)
    for offloaded in range(1, lm_config.backbone.num_layers + 1):
        yield plan(smallest, _CODEC_OFFLOAD_LAYOUTS[-1], offloaded)


def plan_memory(
    budget_bytes: int,
    lm_config: LMConfig,
    codec_config: CodecConfig,
    *,
    max_frames: int,
    batch: int = 2,
    lm_dtype: torch.dtype = torch.bfloat16,
    codec_dtype: torch.dtype = torch.float32,
) -> MemoryPlan:
    """The fastest plan that fits `budget_bytes`; UserError naming the minimum if none does."""
    last = None
    for last in candidate_plans(
        lm_config,
        codec_config,
        budget_bytes=budget_bytes,
        max_frames=max_frames,
        batch=batch,
        lm_dtype=lm_dtype,
        codec_dtype=codec_dtype,
    ):
        if last.fits():
            return last
    need = last.predicted_peak_bytes
    raise UserError(
        f"--vram {budget_bytes / GiB:.2f} GiB is below the minimum of {need / GiB:.2f} GiB "
        f"for this model and songs of {max_frames} frames"
    )


def preset_configs(lm_preset: str = "3B") -> tuple[LMConfig, CodecConfig]:
    """The full-size configs of a built-in preset (no weights needed)."""
    return LMConfig.from_dict(LM_PRESETS[lm_preset]), CODEC_PRESETS[CODEC_FOR_LM[lm_preset]]


def checkpoint_configs(root: Path) -> tuple[LMConfig, CodecConfig]:
    """A checkpoint folder's configs, from config.json and the safetensors headers only."""
    return load_lm_config(Path(root) / LM_DIR), load_codec_config(Path(root) / CODEC_DIR)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


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
    return "\n".join(
        [
            f"memory plan for --vram {plan.budget_bytes / GiB:g}G "
            f"(songs of up to {plan.max_frames} frames, batch {plan.kv_batch}):",
            f"  LM: {dtype}, quantization {plan.quant}; {layers}; text embeddings {text}",
            f"  KV cache: {plan.kv_positions} positions, {_gib(plan.kv_bytes)}",
            f"  codec: {str(plan.codec_dtype).removeprefix('torch.')} DiT, {codec}; "
            f"LM during codec decode: {during}",
            f"  predicted peak: {_gib(plan.predicted_peak_bytes)} (LM phase "
            f"{_gib(plan.lm_phase_bytes)}, codec phase {_gib(plan.codec_phase_bytes)}, "
            f"+{ALLOCATOR_SLACK:.0%} allocator slack, +{_gib(CUDA_CONTEXT_BYTES)} CUDA context)",
        ]
    )


# -- applying a plan ----------------------------------------------------------------------


class Placement:
    """A plan applied on `device`: places the host-loaded models, and takes turns between them
    around each codec decode.

    It holds each model's `HostCopy` (the pinned host mirror made at its first turn), so the
    mirrors live as long as their owner (the Pipeline) and go with it.
    """

    def __init__(self, plan: MemoryPlan, device: torch.device) -> None:
        self.plan, self.device = plan, torch.device(device)
        self._mirrors: dict[str, HostCopy] = {}  # "lm", "codec"

    def place_lm(self, lm: HeartMuLa) -> None:
        """Move a host-loaded LM onto the device as planned: offloaded backbone layers wrapped
        in a ring, text embeddings left in host memory if planned so, and the quantized linears
        that now sit on the GPU swapped for their fast kernels (`quant.fast`); on a GPU the
        fused layers (`heartmula_rt.fused`) are swapped in first, while every layer is a
        submodule."""
        plan = self.plan
        if self.device.type == "cuda":
            use_fused_layers(lm)
        n, k = plan.num_backbone_layers, plan.offloaded_lm_layers
        if k and not isinstance(lm.backbone.layers, OffloadedLayers):
            lm.backbone.layers = OffloadedLayers(
                lm.backbone.layers, self.device, slots=OFFLOAD_SLOTS, resident=n - k
            )
        text = lm.text_embeddings
        if not plan.text_embeddings_on_gpu:
            lm.text_embeddings = None  # detached while the rest moves: it stays where it is
        lm.to(self.device)
        lm.text_embeddings = text
        use_fast_kernels(lm, plan.lm_dtype)

    def place_codec(self, codec: HeartCodec) -> None:
        """Put a host-loaded codec where the plan keeps it between songs: on the GPU if
        resident; with its DiT blocks wrapped in rings if offloaded (the rest moves in per
        song)."""
        if self.plan.codec_placement == "resident":
            codec.to(self.device)
        elif self.plan.codec_placement == "offload":
            est = codec.flow_matching.estimator
            for name in ("transformer_blocks", "transformer_blocks_2"):
                blocks = getattr(est, name)
                if not isinstance(blocks, OffloadedLayers):
                    setattr(est, name, OffloadedLayers(blocks, self.device, slots=OFFLOAD_SLOTS))

    @contextmanager
    def codec_turn(
        self, lm: HeartMuLa, codec: HeartCodec, release_lm_cache: Callable[[], None]
    ) -> Iterator[None]:
        """Make room for the codec as planned around one decode, and restore the LM after it.

        `release_lm_cache` frees the engine's KV cache and graphs (`engine.release`). Moves
        between host and GPU go through each model's `HostCopy`: the LM's weights leave the GPU
        without a copy back, and each return is one pinned host-to-device copy.
        """
        plan, cuda = self.plan, self.device.type == "cuda"
        if plan.lm_during_codec != "kept":
            release_lm_cache()
        if plan.lm_during_codec == "released":
            exclude = () if plan.text_embeddings_on_gpu else ("text_embeddings.",)
            self._mirror("lm", lm, exclude).evict()  # offloaded layers stay pinned as they are
        if plan.codec_placement != "resident":
            self._mirror("codec", codec).restore()
        if cuda:
            torch.cuda.empty_cache()  # what the LM left cached goes back for the codec
        try:
            yield
        finally:
            if plan.codec_placement != "resident":
                self._mirror("codec", codec).evict()
            if plan.lm_during_codec == "released":
                self._mirror("lm", lm).restore()
            if cuda:
                torch.cuda.empty_cache()

    def _mirror(self, role: str, module: nn.Module, exclude: tuple[str, ...] = ()) -> HostCopy:
        """The host mirror of `module`, made at its first turn (again if another module now
        plays `role`)."""
        mirror = self._mirrors.get(role)
        if mirror is None or mirror.module is not module:
            mirror = self._mirrors[role] = HostCopy(module, self.device, exclude)
        return mirror
