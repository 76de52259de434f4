"""The scalar conv decoder of HeartCodec (SPEC §5.6): latents of one mono stream → 48 kHz samples.

The checkpoint's weight norm is folded at load, so every conv holds a plain `.weight`. The
decoder always computes in float32 (its weights are upcast on the fly if stored narrower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CodecConfig

DILATIONS = (1, 3, 5, 7, 9)  # the five residual units of every up-block
KERNEL_SIZE = 7  # residual, post-processor and output convs
IN_KERNEL_SIZE = 5  # decoder.0, centred (padding 2)
QUANT_LEVELS = 9  # latents are rounded to multiples of 1/9


class Conv1d(nn.Conv1d):
    """A Conv1d run in float32; `causal` left-pads by dilation·(k−1) instead of padding."""

    def __init__(self, *args, causal: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.causal:
            x = F.pad(x, (self.dilation[0] * (self.kernel_size[0] - 1), 0))
        return F.conv1d(
            x, self.weight.float(), self.bias.float(), self.stride, self.padding, self.dilation
        )


class PReLU(nn.PReLU):
    """PReLU with one slope, in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.weight.float())


class UpConv(nn.Module):
    """ConvTranspose1d with kernel 2·stride, dropping the last `stride` samples: exactly ×stride."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.ConvTranspose1d(in_ch, out_ch, 2 * stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.layer.stride[0]
        out = F.conv_transpose1d(x, self.layer.weight.float(), self.layer.bias.float(), stride)
        return out[..., :-stride]


class ResidualUnit(nn.Module):
    """x + PReLU(conv_k1(PReLU(dilated causal conv_k7(x))))."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = Conv1d(channels, channels, KERNEL_SIZE, dilation=dilation, causal=True)
        self.activation1 = PReLU()
        self.conv2 = Conv1d(channels, channels, 1)
        self.activation2 = PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.activation2(self.conv2(self.activation1(self.conv1(x))))


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


class PostProcessor(nn.Module):
    """Repeat every time step `num_samples` times (interleaved), causal conv, PReLU."""

    def __init__(self, channels: int, num_samples: int) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.conv = Conv1d(channels, channels, KERNEL_SIZE, causal=True)
        self.activation = PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x.repeat_interleave(self.num_samples, dim=-1)))


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

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, latent_hidden_dim, T] → float32 samples [B, T·∏upsample·num_samples]."""
        x = torch.round(latents.float() * QUANT_LEVELS) / QUANT_LEVELS
        return self.decoder(x).squeeze(1)
