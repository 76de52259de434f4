"""Fast kernels for the quantized linears, as module swaps over the stored formats.

`quant.formats` holds each format's stored layout and its plain forward (dequantize, then
matmul), which writes a full-precision copy of every weight on every call: it saves memory, not
time. The modules here compute the same product from the same stored values without that copy:

- int8 → `Int8TritonLinear`: our Triton kernels (`kernels.int8_matmul`) for decode-sized inputs
  (up to a batch of songs' rows). Same buffers as `Int8Linear`, so nothing is converted.
- nf4 → `NF4BnbLinear`: bitsandbytes' 4-bit matmul; the codes are re-packed into its layout
  (first weight in the high nibble) and the block scales widened to float32, exactly. Without
  bitsandbytes NF4 is refused on a GPU (`check_fast_path`) rather than run dequantizing.
- int4 → `Int4TinyGemmLinear`: the tinygemm kernel behind torchao's int4 weight-only mode,
  called straight from aten (`_weight_int4pack_mm`, CPU twin `_weight_int4pack_mm_for_cpu`);
  `Int4Linear` already stores tinygemm's scale and midpoint zero. These are private aten ops:
  `tinygemm_op` checks the installed torch has them.

`use_fast_kernels(model)` swaps in whichever of these the model's device and dtype allow. The
stored formats stay the cache's layout: swap after saving.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn.functional as F
from heartmula_rt.quant.formats import (
    INT4_MID,
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantLinear,
    unpack4,
)
from torch import Tensor, nn

from heartmula_rt.errors import UserError

# The torch release each tinygemm op first has in the form called here: CUDA's packing takes
# two codes per uint8 from 2.5 on; the CPU twins were split off in 2.6.
TINYGEMM_OPS_SINCE = {
    "_convert_weight_to_int4pack": (2, 5),
    "_weight_int4pack_mm": (2, 5),
    "_convert_weight_to_int4pack_for_cpu": (2, 6),
    "_weight_int4pack_mm_for_cpu": (2, 6),
}
TINYGEMM_INNER_K_TILES = (8, 4, 2)  # the kernel's packings, widest first
TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_ROWS = 16  # out_features of a packed weight: CUDA packs rows by 8, the CPU by 16


class Int8TritonLinear(Int8Linear):
    """`Int8Linear` whose decode-sized calls (≤ `int8_matmul.MAX_ROWS` rows) run the Triton int8
    kernels."""

    @classmethod
    def from_int8(cls, ref: Int8Linear) -> Int8TritonLinear:
        # Imported here, not with this file: it needs triton, which CPU builds of torch lack.
        from heartmula_rt.kernels import int8_matmul  # registers heartmula_rt::int8_weight_matmul

        module = cls(ref.weight, ref.scale)
        module.max_rows = int8_matmul.MAX_ROWS
        return module

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() > self.max_rows * x.shape[-1]:  # prefill: once per song, the plain path
            return super().forward(x)
        return torch.ops.heartmula_rt.int8_weight_matmul(x, self.weight, self.scale)


def bnb_available() -> bool:
    """Whether bitsandbytes imports; importing it registers torch.ops.bitsandbytes. Lazy: it
    logs a line about its CPU kernels on import, which a run without NF4 need not see (a plan
    only asks whether it is installed: `planner.bnb_installed`)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def check_fast_path(mode: str, device: torch.device) -> None:
    """Refuse a quantization `device` cannot run at speed: NF4 on a GPU needs bitsandbytes
    (the plain path would dequantize a full weight copy for every matmul)."""
    if mode == "nf4" and device.type == "cuda" and not bnb_available():
        raise UserError(
            "--quant nf4 on a GPU needs bitsandbytes (pip install 'heartmula-rt[nf4]'); "
            "or use --quant int4, the same size with no extra dependency"
        )


class NF4BnbLinear(QuantLinear):
    """NF4 through bitsandbytes: codes uint8 [out · in / 2, 1] in its packing, absmax float32
    [out · in / block] (one block never spans two rows, so the blocks are the stored ones)."""

    def __init__(self, packed: Tensor, absmax: Tensor, out_features: int, block: int) -> None:
        super().__init__(packed.numel() * 2 // out_features, out_features)
        self.block = block
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)

    @classmethod
    def from_nf4(cls, ref: NF4Linear) -> NF4BnbLinear:
        if not bnb_available():
            raise RuntimeError("NF4BnbLinear needs bitsandbytes: pip install bitsandbytes")
        codes = unpack4(ref.packed).flatten()
        packed = (codes[0::2] << 4 | codes[1::2]).view(-1, 1)
        out, blocks = ref.absmax.shape
        return cls(packed, ref.absmax.float().flatten(), out, ref.in_features // blocks)

    def forward(self, x: Tensor) -> Tensor:
        shape = [self.out_features, self.in_features]
        return torch.ops.bitsandbytes.gemm_4bit(
            x, self.packed, shape, self.absmax, self.block, "nf4"
        )


def _torch_release() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def tinygemm_op(name: str) -> torch._ops.OpOverloadPacket:
    """The private aten op `name` (a `TINYGEMM_OPS_SINCE` key), or a UserError naming the
    torch it needs when the installed one is older or lacks it."""
    since = TINYGEMM_OPS_SINCE[name]
    op = getattr(torch.ops.aten, name, None)
    if op is None or _torch_release() < since:
        raise UserError(
            f"--quant int4 runs tinygemm (aten.{name}), which needs torch "
            f"{since[0]}.{since[1]} or newer; this is torch {torch.__version__}"
        )
    return op


def tinygemm_inner_k_tiles(in_features: int) -> int | None:
    """The widest packing tinygemm has for rows of `in_features`, or None if there is none."""
    for tiles in TINYGEMM_INNER_K_TILES:
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


class Int4TinyGemmLinear(QuantLinear):
    """int4 through tinygemm: the codes in its device-specific packing, and scale and zero
    interleaved as [groups, out, 2] in bf16. Rows are padded to a multiple of 16 (the audio
    vocabulary of 8197 is not one) and cut from the result."""

    def __init__(self, packed: Tensor, scale_zero: Tensor, in_features: int, out: int) -> None:
        super().__init__(in_features, out)
        self.group = in_features // scale_zero.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)

    @staticmethod
    def supports(ref: Int4Linear) -> bool:
        group = ref.in_features // ref.scale.shape[1]
        return group in TINYGEMM_GROUPS and tinygemm_inner_k_tiles(ref.in_features) is not None

    @classmethod
    def from_int4(cls, ref: Int4Linear) -> Int4TinyGemmLinear:
        out, pad = ref.out_features, -ref.out_features % TINYGEMM_ROWS
        codes = F.pad(unpack4(ref.packed), (0, 0, 0, pad), value=INT4_MID)
        scale_zero = torch.stack([ref.scale, ref.zero], dim=-1)  # [out, groups, 2]
        scale_zero = F.pad(scale_zero, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()
        tiles = tinygemm_inner_k_tiles(ref.in_features)
        suffix = "" if codes.is_cuda else "_for_cpu"
        tinygemm_op("_weight_int4pack_mm" + suffix)  # checked here, before any forward
        convert = tinygemm_op("_convert_weight_to_int4pack" + suffix)
        if codes.is_cuda:  # the CUDA packing takes two codes per byte, the first high
            packed = convert(codes[:, 0::2] << 4 | codes[:, 1::2], tiles)
        else:
            packed = convert(codes.int(), tiles)
        return cls(packed, scale_zero.to(torch.bfloat16), ref.in_features, out)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # its one dtype
        mm = (
            torch.ops.aten._weight_int4pack_mm
            if rows.is_cuda
            else torch.ops.aten._weight_int4pack_mm_for_cpu
        )
        y = mm(rows, self.packed, self.group, self.scale_zero)[:, : self.out_features]
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def fast_module(module: QuantLinear, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module`'s fast twin on `device` for activations of `dtype`, or `module` itself."""
    if device.type != "cuda":
        return module  # the fast kernels are GPU kernels (their tests run them on the CPU)
    if type(module) is Int8Linear:
        return Int8TritonLinear.from_int8(module)
    if type(module) is NF4Linear:
        check_fast_path("nf4", device)
        return NF4BnbLinear.from_nf4(module)
    if (
        type(module) is Int4Linear
        and dtype == torch.bfloat16
        and Int4TinyGemmLinear.supports(module)
    ):
        return Int4TinyGemmLinear.from_int4(module)
    return module


def use_fast_kernels(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Swap every quantized linear of `model` for its fast twin where its device and the
    activation `dtype` allow; returns how many of each module type the model now has."""
    kinds: Counter[str] = Counter()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            fast = fast_module(module, next(module.buffers()).device, dtype)
            if fast is not module:
                model.set_submodule(name, fast)
            kinds[type(fast).__name__] += 1
    return dict(kinds)
