"""Sizes counted on the meta device, and what the planner measures on a GPU.

`lm_sizes` and `codec_sizes` are the traced twins of footprint.py's arithmetic, which the tests
hold to them: the LM (quantized as planned) and the codec are built on the meta device,
`TRACED_LAYERS` layers of each stack, and their bytes counted (`module_bytes`, the other layers
as many more of the first); the KV cache is allocated on meta as the static engine would, for
every row of a batch; activations are the peak of live tensor bytes while one song's prompt step,
one decode frame of every row (what the graph engine's private pool keeps) and one codec window
run on meta (`LiveBytes`).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from heartmula_rt.config import (
    LATENTS_PER_CODE,
    OFFLOAD_SLOTS,
    PROMPT_TOKENS,
    WINDOW,
    CodecConfig,
    LlamaFlavor,
    LMConfig,
)
from heartmula_rt.memory.footprint import CodecSizes, LMSizes
from heartmula_rt.memory.planner import (
    DeviceOverheads,
    OverheadReadings,
    _unreserved,
    overheads_from,
)
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.lm import HeartMuLa, merge_projections
from heartmula_rt.quant import quantize_model
from heartmula_rt.request import DEFAULT_CODEC

# Layers of each stack (the LM's backbone and depth decoder, each DiT stage) that the size counts
# build and trace on meta; the others are counted by arithmetic. The layers of a stack are one
# module at one shape, so their bytes and KV caches repeat, and so do their live bytes from the
# second layer on: the first one's input is the stack's input, which the caller holds until the
# stack returns, and every later one's input is the layer before's output, alive beside it.
TRACED_LAYERS = 2


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


def _traced_flavor(flavor: LlamaFlavor) -> LlamaFlavor:
    """`flavor` with only the layers the size counts trace (`TRACED_LAYERS`)."""
    return replace(flavor, num_layers=min(flavor.num_layers, TRACED_LAYERS))


def lm_sizes(
    config: LMConfig, dtype: torch.dtype, quant: str, rows: int, positions: int, songs: int = 1
) -> LMSizes:
    """The bytes of one LM layout for `songs` songs at once of `rows` rows each, counted
    (footprint.lm_sizes works them out)."""
    traced = replace(
        config, backbone=_traced_flavor(config.backbone), decoder=_traced_flavor(config.decoder)
    )
    with torch.device("meta"):
        lm = HeartMuLa(traced).to(dtype)
    quantize_model(merge_projections(lm), quant)  # as loaded (pipeline.py)
    batch = songs * rows
    cache = lm.new_cache(batch, positions)
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
        """One song's prompt over its own rows of the batch's cache (decode.prefill)."""
        song = cache.rows_view(0, rows)
        ids = torch.zeros(min(PROMPT_TOKENS, positions), dtype=torch.long, device="meta")
        last, _ = lm.backbone_step(lm.embed_prompt(ids, 0, rows), 0, song)
        token = torch.zeros(rows, 2, config.backbone.embed_dim, dtype=dtype, device="meta")
        lm.decoder_step(token + last[:, None], 0, song, 1)

    def frame_step() -> None:
        """One frame of every row reading every cached position, each row masked at its own
        device-held position (the graph engine, and any batch of songs), then its first
        decoder step (the widest; sampling's few [rows, vocab] rows are below both). On meta,
        SDPA takes its math path (float32 copies of K and V) and quantized linears their plain
        one, so this bounds the GPU's fused kernels from above."""
        frame = torch.zeros(batch, config.audio_num_codebooks, dtype=torch.long, device="meta")
        at = torch.full((batch,), positions - 1, dtype=torch.long, device="meta")
        last, _ = lm.backbone_step(lm.embed_frame(frame), at, cache, positions)
        token = torch.zeros(batch, 2, config.backbone.embed_dim, dtype=dtype, device="meta")
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


def codec_sizes(config: CodecConfig, dtype: torch.dtype) -> CodecSizes:
    """The bytes of the codec at `dtype`, counted (footprint.codec_sizes works them out)."""
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
