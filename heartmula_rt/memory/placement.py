"""A memory plan applied: what changes modules to follow a `planner.MemoryPlan` (placement on the
GPU, host copies for the turns between the LM and the codec, layer streaming by offload.py).

The planner decides on the meta device and changes nothing; a `Placement` is the plan at work,
an object the pipeline holds, so the host copies it makes live and go with that pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from heartmula_rt.config import OFFLOAD_SLOTS
from heartmula_rt.memory.offload import HostCopy, OffloadedLayers
from heartmula_rt.memory.planner import MemoryPlan
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.fused import use_fused_layers
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.quant.fast import use_fast_kernels


class Placement:
    """A plan applied on `device` (the LM's, and the codec's unless the plan puts it apart on
    `codec_device`): places the host-loaded models, and takes turns between them around each
    codec decode.

    It holds each model's `HostCopy` (the pinned host mirror made at its first turn), so the
    mirrors live as long as their owner (the Pipeline) and go with it.
    """

    def __init__(
        self, plan: MemoryPlan, device: torch.device, codec_device: torch.device | None = None
    ) -> None:
        self.plan, self.device = plan, torch.device(device)
        self.codec_device = self.device if codec_device is None else torch.device(codec_device)
        if (plan.codec_placement == "apart") != (self.codec_device != self.device):
            raise ValueError("a plan with the codec apart needs a codec device of its own")
        self._mirrors: dict[str, HostCopy] = {}  # "lm", "codec"

    def place_lm(self, lm: HeartMuLa) -> None:
        """Move a host-loaded LM onto the device as planned: offloaded backbone layers wrapped
        in a ring, text embeddings left in host memory if planned so, and the quantized linears
        that now sit on the GPU swapped for their fast kernels (`quant.fast`); on a GPU the
        fused layers (`heartmula_rt.model.fused`) are swapped in first, while every layer is a
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
        use_fast_kernels(lm, getattr(torch, plan.lm_dtype))

    def place_codec(self, codec: HeartCodec) -> None:
        """Put a host-loaded codec where the plan keeps it between songs: on the GPU if
        resident; with its DiT blocks wrapped in rings if offloaded (the rest moves in per
        song); apart, on its own device, the DiT blocks in rings if that GPU's plan streams
        them, the rest there for good."""
        placement, own = self.plan.codec_placement, self.plan.codec_device_plan
        if placement == "offload" or (own is not None and own.dit_streamed):
            est = codec.flow_matching.estimator
            for name in ("transformer_blocks", "transformer_blocks_2"):
                blocks = getattr(est, name)
                if not isinstance(blocks, OffloadedLayers):
                    ring = OffloadedLayers(blocks, self.codec_device, slots=OFFLOAD_SLOTS)
                    setattr(est, name, ring)
        if placement in ("resident", "apart"):
            codec.to(self.codec_device)

    @contextmanager
    def codec_turn(
        self, lm: HeartMuLa, codec: HeartCodec, release_lm_cache: Callable[[], None]
    ) -> Iterator[None]:
        """Make room for the codec as planned around one decode, and restore the LM after it.

        `release_lm_cache` frees the engine's KV cache and graphs (`engine.release`). Moves
        between host and GPU go through each model's `HostCopy`: the LM's weights leave the GPU
        without a copy back, and each return is one pinned host-to-device copy. A codec apart
        on its own device takes no turn: nothing moves.
        """
        plan = self.plan
        turns = plan.codec_placement != "apart"
        cuda = turns and self.device.type == "cuda"
        moves = plan.codec_placement in ("after_lm", "offload")
        if plan.lm_during_codec != "kept":
            release_lm_cache()
        if plan.lm_during_codec == "released":
            exclude = () if plan.text_embeddings_on_gpu else ("text_embeddings.",)
            self._mirror("lm", lm, exclude).evict()  # offloaded layers stay pinned as they are
        if moves:
            self._mirror("codec", codec).restore()
        if cuda:
            torch.cuda.empty_cache()  # what the LM left cached goes back for the codec
        try:
            yield
        finally:
            if moves:
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
