"""HeartCodec's decoding path (SPEC §5): codes [8, T] → stereo 48 kHz waveform.

`HeartCodec` mirrors the official state-dict layout (minus unused tensors, weight norm folded into
plain `.weight`), so it can be built on the meta device and loaded with `assign=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import CodecConfig
from . import detokenize as _windows
from .detokenize import sanitize_codes
from .dit import FlowMatching
from .scalar import ScalarModel

__all__ = ["HeartCodec", "sanitize_codes"]


class HeartCodec(nn.Module):
    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.flow_matching = FlowMatching(config)
        self.scalar_model = ScalarModel(config)

    @torch.inference_mode()
    def detokenize(
        self,
        codes: torch.Tensor,
        *,
        num_steps: int = 10,
        guidance_scale: float = 1.25,
        generator: torch.Generator | None = None,
        on_window: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """codes [8, T] → float32 waveform [2, int(T/12.5·48000)] on the CPU.

        `generator` (CPU) supplies each window's initial noise; None uses a fresh random one.
        `on_window(done, total)` is called after each decoded window.
        """
        return _windows.detokenize(
            self.flow_matching,
            self.scalar_model,
            self.config,
            codes,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            on_window=on_window,
        )

    @torch.inference_mode()
    def window_latents(
        self,
        codes: torch.Tensor,
        *,
        num_steps: int = 10,
        guidance_scale: float = 1.25,
        generator: torch.Generator,
    ) -> Iterator[torch.Tensor]:
        """Each window's final latents [1, 744, 256] float32, before the decoder's rounding."""
        codes, _ = sanitize_codes(codes, self.config.codebook_size, self.config.num_quantizers)
        yield from _windows.window_latents(
            self.flow_matching,
            codes,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )

    @torch.inference_mode()
    def decode_window(self, latents: torch.Tensor) -> torch.Tensor:
        """One window's latents [1, F, 256] → float32 [2, F·1920] on the latents' device."""
        streams = self.config.out_channels // self.config.latent_hidden_dim
        return _windows.decode_window(self.scalar_model, latents, streams)
