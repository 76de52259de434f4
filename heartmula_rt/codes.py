"""A song's LM codes on disk: what `gen` keeps while the codec runs, so an interrupted or
failed codec stage never loses the LM's work; `heartmula-rt decode` finishes it.

The file is `<output stem>.codes.npz` beside the output: `codes`, int64 [8, T] (frame 0
included, stray ids as the LM made them), and `seed`, the codec noise's seed. Written
atomically (a temporary file renamed), so it is either whole or absent.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


def codes_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.codes.npz")


def save_codes(path: Path, codes: torch.Tensor, seed: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        np.savez(f, codes=codes.numpy(), seed=np.int64(seed))
    os.replace(temporary, path)


def load_codes(path: Path) -> tuple[torch.Tensor, int]:
    """(codes [Q, T] int64, seed) from a file `save_codes` wrote."""
    try:
        with np.load(path) as data:
            codes, seed = data["codes"], int(data["seed"])
    except FileNotFoundError:
        raise UserError(f"codes file {path} does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        raise UserError(f"{path} is not a codes file written by heartmula-rt gen") from None
    if codes.ndim != 2 or codes.dtype != np.int64:
        raise UserError(f"{path} holds codes of shape {codes.shape} {codes.dtype}, not [8, T]")
    return torch.from_numpy(codes), seed
