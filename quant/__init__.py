"""Weight-only quantization of the HeartMuLa LM (int8, NF4, int4), as module swaps."""

from heartmula_rt.quant.formats import (
    QUANT_MODES,
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantizedAudioHead,
    QuantLinear,
    check_mode,
    quantize_model,
)

__all__ = [
    "QUANT_MODES",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "QuantLinear",
    "QuantizedAudioHead",
    "check_mode",
    "quantize_model",
]
