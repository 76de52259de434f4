"""Weight-only quantization formats as drop-in module swaps (gpt-fast style).

Each format is an nn.Module built `from_linear(linear)` with nn.Linear's call interface. Weights
are stored packed in buffers (so parameters + buffers add up to the stored size) and dequantized
on the fly into the activation dtype: this is the plain reference path that faster GPU kernels
will later sit behind. `quantize_model` swaps every matmul weight of a HeartMuLa in place.

- int8: symmetric, one float32 scale per output channel.
- nf4: QLoRA's NormalFloat4 codebook, absmax scale per block of 64 weights of a row (no double
  quantization of the scales).
- int4: asymmetric, scale and zero per group of 128 weights of a row, `w = (q - 8) * scale +
  zero` with q in 0..15: the zero is the group's midpoint, the layout of the tinygemm kernel
  behind torchao's int4 weight-only mode, so the fast path takes the stored values as they are.

The 4-bit formats pack two codes per uint8 (even input index in the low nibble) and keep their
block parameters in bfloat16: half the bytes of float32, and its 2^-9 relative rounding is
noise next to a 4-bit step (1/15 of a group's range).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heartmula_rt.config import INT4_GROUP, NF4_BLOCK, QUANT_MODES
from heartmula_rt.errors import UserError
from heartmula_rt.model.lm import HeartMuLa

INT4_MID = 8  # the int4 code the group's zero stands for
BLOCK_DTYPE = torch.bfloat16  # the 4-bit formats' per-block scales and zeros

# The 16 NF4 values of QLoRA (Dettmers et al. 2023; bitsandbytes), ascending.
NF4_CODEBOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020356082916,
    0.24611230731010437,
    0.33791524470710754,
    0.44070982872314453,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@functools.cache
def nf4_codebook(device: torch.device) -> Tensor:
    """NF4_CODEBOOK as float32 on `device`, made once: built per call it would copy host data
    in every forward, which a CUDA graph capture cannot hold (tests/test_capture_safety.py)."""
    return torch.tensor(NF4_CODEBOOK, device=device)


def block_size(in_features: int, block: int) -> int:
    """`block` where it divides the row, else the largest power-of-two divisor below it (tiny
    models' 160-wide rows get 32)."""
    return math.gcd(in_features, block)


def pack4(codes: Tensor) -> Tensor:
    """Codes 0..15 [out, in] (in even) → uint8 [out, in / 2], two per byte."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack4(packed: Tensor) -> Tensor:
    """uint8 [out, in / 2] → codes 0..15 as uint8 [out, in]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)


class QuantLinear(nn.Module):
    """A bias-free nn.Linear whose weight is stored quantized: `forward(x)` is
    `F.linear(x, self.dequantize(x.dtype))`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        if linear.bias is not None:
            raise ValueError(f"{cls.__name__} quantizes bias-free linears only")
        return cls.from_weight(linear.weight.detach())

    @classmethod
    def from_weight(cls, weight: Tensor) -> QuantLinear:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as stored, [out, in] in `dtype`."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantLinear):
    """Symmetric int8 per output channel: weight int8 [out, in], scale float32 [out]."""

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__(weight.shape[1], weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_weight(cls, weight: Tensor) -> Int8Linear:
        w = weight.float()
        scale = w.abs().amax(dim=1) / 127
        q = torch.round(w / scale.clamp_min(1e-30)[:, None]).clamp(-127, 127)
        return cls(q.to(torch.int8), scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Scale after the matmul: integers up to 127 are exact in bf16/fp16, so the matmul sees
        # the stored weight without rounding, and the float32 scale is applied once per output
        # instead of being rounded into every weight.
        return (F.linear(x, self.weight.to(x.dtype)) * self.scale).to(x.dtype)


class Packed4Linear(QuantLinear):
    """A 4-bit format: codes [out, in / 2] packed two a byte (`pack4`), and the buffers
    `blocks` names, [out, in / block] each, the parameters of each block of a row."""

    def __init__(self, packed: Tensor, **blocks: Tensor) -> None:
        super().__init__(packed.shape[1] * 2, packed.shape[0])
        self.register_buffer("packed", packed)
        for name, value in blocks.items():
            self.register_buffer(name, value)

    @staticmethod
    def row_blocks(weight: Tensor, block: int) -> Tensor:
        """`weight` [out, in] in float32 as [out, in / b, b], b = `block_size(in, block)`."""
        out, n = weight.shape
        return weight.float().reshape(out, n // block_size(n, block), -1)


class NF4Linear(Packed4Linear):
    """NormalFloat4: codes [out, in / 2] packed, absmax [out, in / block] per block of a row."""

    def __init__(self, packed: Tensor, absmax: Tensor) -> None:
        super().__init__(packed, absmax=absmax)

    @classmethod
    def from_weight(cls, weight: Tensor, block: int = NF4_BLOCK) -> NF4Linear:
        out, n = weight.shape
        w = cls.row_blocks(weight, block)
        absmax = w.abs().amax(dim=-1).to(BLOCK_DTYPE)
        x = w / absmax.float().clamp_min(1e-30)[..., None]
        # Nearest codebook value: bucketize against the midpoints needs no [..., 16] temporary.
        book = nf4_codebook(w.device)
        codes = torch.bucketize(x, (book[1:] + book[:-1]) / 2)
        return cls(pack4(codes.view(out, n)), absmax)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        out, blocks = self.absmax.shape
        w = nf4_codebook(self.packed.device)[unpack4(self.packed).long()].view(out, blocks, -1)
        return (w * self.absmax.float()[..., None]).view(out, -1).to(dtype)


class Int4Linear(Packed4Linear):
    """Asymmetric int4 per group of a row: codes [out, in / 2] packed, scale and zero
    [out, in / group]; w = (q - 8) * scale + zero."""

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor) -> None:
        super().__init__(packed, scale=scale, zero=zero)

    @classmethod
    def from_weight(cls, weight: Tensor, group: int = INT4_GROUP) -> Int4Linear:
        out, n = weight.shape
        w = cls.row_blocks(weight, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = (hi - lo) / 15
        scale, zero = scale.to(BLOCK_DTYPE), (lo + INT4_MID * scale).to(BLOCK_DTYPE)
        # Codes from the rounded scale and zero, the values dequantize will use.
        q = (w - zero.float()[..., None]) / scale.float().clamp_min(1e-30)[..., None] + INT4_MID
        return cls(pack4(torch.round(q).clamp(0, 15).view(out, n)), scale, zero)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        out, groups = self.scale.shape
        q = unpack4(self.packed).float().view(out, groups, -1) - INT4_MID
        w = q * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.view(out, -1).to(dtype)


FORMATS: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "nf4": NF4Linear, "int4": Int4Linear}


class QuantizedAudioHead(nn.Module):
    """HeartMuLa's audio head [n-1, D, vocab] as one quantized [vocab, D] weight per codebook
    1..n-1: `head(d [B, D], codebook) → logits [B, vocab]`, the plain head's `d @ head[i-1]`."""

    def __init__(self, heads: list[QuantLinear]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @classmethod
    def from_parameter(
        cls, audio_head: Tensor, mode: str, device: torch.device | None = None
    ) -> QuantizedAudioHead:
        """Quantize one codebook at a time, each first moved to `device` (default: where the
        head is), so a host-side head never occupies the device unquantized."""
        device = audio_head.device if device is None else device
        heads = [FORMATS[mode].from_weight(w.T.contiguous().to(device)) for w in audio_head]
        return cls(heads)

    def forward(self, d: Tensor, codebook: int) -> Tensor:
        return self.heads[codebook - 1](d)


def check_mode(mode: str) -> None:
    """Refuse a quantization mode that does not exist."""
    if mode not in QUANT_MODES:
        raise UserError(f"unknown quantization mode {mode!r}; use one of {', '.join(QUANT_MODES)}")


def quantized_linears(model: HeartMuLa) -> list[str]:
    """The names of the nn.Linear modules `quantize_model` swaps: every Linear of the backbone
    and the decoder, `projection` and `codebook0_head`."""
    names = [
        f"{stack}.{name}"
        for stack in ("backbone", "decoder")
        for name, m in model.get_submodule(stack).named_modules()
        if isinstance(m, nn.Linear)
    ]
    return [*names, "projection", "codebook0_head"]


@torch.no_grad()
def quantize_model(model: HeartMuLa, mode: str) -> HeartMuLa:
    """Quantize `model` in place on its device and return it: `quantized_linears(model)` and
    `audio_head`. The embeddings and `muq_linear` (only its bias is used) stay as they are."""
    check_mode(mode)
    if mode == "none":
        return model
    cls = FORMATS[mode]
    # One Linear at a time: once swapped, the float weight has no reference left and is freed,
    # so peak memory stays about one layer above the quantized model.
    for name in quantized_linears(model):
        model.set_submodule(name, cls.from_linear(model.get_submodule(name)))
    set_audio_head(model, QuantizedAudioHead.from_parameter(model.audio_head, mode))
    return model


def set_audio_head(model: HeartMuLa, head: QuantizedAudioHead) -> None:
    del model.audio_head  # a Parameter's name takes no module until the Parameter is gone
    model.audio_head = head
