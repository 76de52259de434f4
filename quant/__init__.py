"""Weight-only quantization of the HeartMuLa LM (int8, NF4, int4) and its measured quality."""

from .formats import (
    QUANT_MODES,
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantizedAudioHead,
    QuantLinear,
    check_mode,
    quantize_model,
)
from .quality import measure_quality

__all__ = [
    "QUANT_MODES",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "QuantLinear",
    "QuantizedAudioHead",
    "check_mode",
    "measure_quality",
    "quantize_model",
]
