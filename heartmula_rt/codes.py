"""A song's LM codes on disk: what `gen` keeps while the codec runs, so an interrupted or
failed codec stage never loses the LM's work; `heartmula-rt decode` finishes it.

The file is `<output stem>.codes.npz` beside the output: `codes`, int64 [8, T] (frame 0
included, stray ids as the LM made them), `seed`, the codec noise's seed, and the song's codec
settings `num_steps` and `guidance_scale` (a file without them, from before they were kept,
decodes with the defaults). Written atomically (a temporary file renamed), so it is either
whole or absent.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .request import DEFAULT_CODEC, CodecParams


def codes_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.codes.npz")


def save_codes(
    path: Path, codes: torch.Tensor, seed: int, params: CodecParams = DEFAULT_CODEC
) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        np.savez(
            f,
            codes=codes.numpy(),
            seed=np.int64(seed),
            num_steps=np.int64(params.num_steps),
            guidance_scale=np.float64(params.guidance_scale),
        )
    os.replace(temporary, path)


def load_codes(path: Path) -> tuple[torch.Tensor, int, CodecParams]:
    """(codes [Q, T] int64, seed, codec settings) from a file `save_codes` wrote."""
    try:
        with np.load(path) as data:
            codes, seed = data["codes"], int(data["seed"])
            kept = {k: data[k].item() for k in ("num_steps", "guidance_scale") if k in data}
        params = CodecParams(**kept)
    except FileNotFoundError:
        raise UserError(f"codes file {path} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        raise UserError(f"{path} is not a codes file written by heartmula-rt gen") from None
    if codes.ndim != 2 or codes.dtype != np.int64:
        raise UserError(f"{path} holds codes of shape {codes.shape} {codes.dtype}, not [8, T]")
    return torch.from_numpy(codes), seed, params
