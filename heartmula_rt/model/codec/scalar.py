"""The scalar conv decoder of HeartCodec (SPEC §5.6): latents of one mono stream → 48 kHz samples.

The checkpoint's weight norm is folded at load, so every conv holds a plain `.weight`. The
decoder computes in its weights' dtype: float32 (the default, and what `codec_dtype="mixed"`
keeps) or bfloat16 (`codec_dtype="bfloat16"`); it returns float32 either way.

It is causal but for `decoder.0`'s two frames of look-ahead, so it can run in time chunks, each
with the left context its receptive field needs: one window's activations then stay bounded by
the chunk (`decode_chunked`), and the output equals the unchunked one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from heartmula_rt.config import DILATIONS, IN_KERNEL_SIZE, KERNEL_SIZE, CodecConfig

QUANT_LEVELS = 9  # latents are rounded to multiples of 1/9
DECODE_CHUNK = 186  # latent frames per chunk: a 744-frame window in 4 chunks


class Conv1d(nn.Conv1d):
    """A Conv1d; `causal` left-pads by dilation·(k−1) instead of padding."""

    def __init__(self, *args, causal: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.causal:
            x = F.pad(x, (self.dilation[0] * (self.kernel_size[0] - 1), 0))
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def history(self, reach: int) -> int:
        """Input samples before an output sample that outputs `reach` samples back depend on."""
        left = self.dilation[0] * (self.kernel_size[0] - 1) if self.causal else self.padding[0]
        return reach + left


class UpConv(nn.Module):
    """ConvTranspose1d with kernel 2·stride, dropping the last `stride` samples: exactly ×stride."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.ConvTranspose1d(in_ch, out_ch, 2 * stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.layer.stride[0]
        out = F.conv_transpose1d(x, self.layer.weight, self.layer.bias, stride)
        return out[..., :-stride]

    def history(self, reach: int) -> int:
        # Output sample j reads input frames j // stride and the one before it.
        return math.ceil(reach / self.layer.stride[0]) + 1


class ResidualUnit(nn.Module):
    """x + PReLU(conv_k1(PReLU(dilated causal conv_k7(x))))."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = Conv1d(channels, channels, KERNEL_SIZE, dilation=dilation, causal=True)
        self.activation1 = nn.PReLU()
        self.conv2 = Conv1d(channels, channels, 1)
        self.activation2 = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.activation2(self.conv2(self.activation1(self.conv1(x))))

    def history(self, reach: int) -> int:
        return self.conv1.history(reach)


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.up_conv = UpConv(in_ch, out_ch, stride)
        self.convs = nn.ModuleList(ResidualUnit(out_ch, d) for d in DILATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up_conv(x)
        for unit in self.convs:
            x = unit(x)
        return x

    def history(self, reach: int) -> int:
        for unit in self.convs:
            reach = unit.history(reach)
        return self.up_conv.history(reach)


class PostProcessor(nn.Module):
    """Repeat every time step `num_samples` times (interleaved), causal conv, PReLU."""

    def __init__(self, channels: int, num_samples: int) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.conv = Conv1d(channels, channels, KERNEL_SIZE, causal=True)
        self.activation = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x.repeat_interleave(self.num_samples, dim=-1)))

    def history(self, reach: int) -> int:
        return math.ceil(self.conv.history(reach) / self.num_samples)


class ScalarModel(nn.Module):
    """Holds `decoder` as the checkpoint names it; the encoder is not needed for inference."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        ch = cfg.decoder_channels  # one more entry than upsample_factors
        self.decoder = nn.Sequential(
            Conv1d(cfg.latent_hidden_dim, ch[0], IN_KERNEL_SIZE, padding=IN_KERNEL_SIZE // 2),
            *(UpBlock(ch[i], ch[i + 1], s) for i, s in enumerate(cfg.upsample_factors)),
            PostProcessor(ch[-1], cfg.num_samples),
            Conv1d(ch[-1], 1, KERNEL_SIZE, causal=True),
        )

        self.samples_per_frame = math.prod(cfg.upsample_factors) * cfg.num_samples

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, latent_hidden_dim, T] → float32 samples [B, T·samples_per_frame]."""
        x = torch.round(latents.float() * QUANT_LEVELS) / QUANT_LEVELS
        return self.decoder(x.to(self.decoder[0].weight.dtype)).squeeze(1).float()

    def context(self) -> tuple[int, int]:
        """(frames of history, frames of look-ahead) one output frame depends on."""
        reach = 0
        for layer in reversed(self.decoder):
            reach = layer.history(reach)
        return reach, self.decoder[0].padding[0]  # decoder.0 is the only non-causal layer

    def decode_chunked(self, latents: torch.Tensor, chunk: int = DECODE_CHUNK) -> torch.Tensor:
        """As `forward`, `chunk` latent frames at a time, each run with its context around it.

        Every chunk sees exactly the inputs its outputs depend on, so the result equals the
        unchunked one up to the convolutions' float rounding on other lengths; the largest
        activation is `chunk` plus the context frames long instead of the whole window.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 frame, not {chunk}")
        frames = latents.shape[-1]
        history, ahead = self.context()
        n = self.samples_per_frame
        pieces = []
        for start in range(0, frames, chunk):
            end = min(start + chunk, frames)
            lo, hi = max(start - history, 0), min(end + ahead, frames)
            out = self(latents[..., lo:hi])
            pieces.append(out[..., (start - lo) * n : (end - lo) * n])
        return torch.cat(pieces, dim=-1)


def largest_activation_bytes(
    cfg: CodecConfig, frames: int, batch: int = 2, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of the decoder's largest intermediate tensor for `frames` latent frames at once,
    found by running it on the meta device (no memory, no compute); live memory at the peak is
    a few such tensors (a residual unit's input, its conv output and its activation)."""
    with torch.device("meta"):
        model = ScalarModel(cfg).to(dtype)
        largest = 0

        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            nonlocal largest
            largest = max(largest, output.numel() * output.element_size())

        for module in model.modules():
            if not list(module.children()):
                module.register_forward_hook(record)
        model(torch.empty(batch, cfg.latent_hidden_dim, frames))
    return largest
