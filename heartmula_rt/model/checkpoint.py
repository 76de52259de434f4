"""Loading checkpoints in the official layout (SPEC §1): safetensors streamed into models built on
the meta device (folder.py finds the files and reads the configs).

Tensors are read one at a time, converted to the target dtype on the host and only then moved to
the target device, so loading the 15.7 GB float32 LM as bf16 costs about one tensor of extra host
memory and never puts float32 weights on the GPU. Weight norm is folded here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from heartmula_rt.errors import UserError
from heartmula_rt.model.folder import (
    UNUSED_KEYS,
    WEIGHT_NORM_KEY,
    load_codec_config,
    load_lm_config,
    shard_files,
    tensor_shapes,
    used_shapes,
    weight_norm_half,
)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path} is damaged or truncated: not a readable safetensors file ({e})"
        ) from None


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                if UNUSED_KEYS.fullmatch(key):
                    continue
                try:
                    tensor = f.get_tensor(key)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise UserError(
                        f"{path} is damaged or truncated: cannot read {key!r} ({e})"
                    ) from None
                if tensor.is_floating_point():
                    _check_finite(path, key, tensor)
                yield key, tensor


def _check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse NaN or Inf weights: an overwritten block of a file still reads as valid safetensors
    and would give a different song. Checked in the file's dtype, as read. The test is one sum
    (a single pass, ~30x faster on the CPU than `isfinite(t).all()`): NaN and Inf always make it
    non-finite, so a finite sum clears the tensor; a non-finite one, which finite values can also
    give by overflowing, is counted exactly."""
    if torch.isfinite(tensor.sum()):
        return
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise UserError(
            f"{path}: tensor {key!r} holds {bad} non-finite values (NaN or Inf); "
            "the file is corrupted, download it again"
        )


def _fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = g · v / ‖v‖ with the norm over every dim but 0 (torch's weight_norm, dim=0)."""
    g, v = g.double(), v.double()
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return (g * v / norm).float()


def _folded_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Used tensors under their module keys, weight-norm pairs folded into `<prefix>.weight`."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _iter_tensors(files):
        m = WEIGHT_NORM_KEY.fullmatch(key)
        if m is None:
            yield key, tensor
            continue
        pair = halves.setdefault(m["prefix"], {})
        pair[weight_norm_half(m)] = tensor
        if len(pair) == 2:  # g and v may sit in different shards
            del halves[m["prefix"]]
            yield f"{m['prefix']}.weight", _fold_weight_norm(pair["g"], pair["v"])


def load_into(
    model: nn.Module,
    files: list[Path],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    float32_prefixes: tuple[str, ...] = (),
    place: Callable[[str, torch.Tensor], bool] | None = None,
) -> None:
    """Fill a meta-device model from safetensors files, tensor by tensor.

    The file headers are checked against the model first, so a bad checkpoint fails in seconds,
    not after gigabytes were read: every parameter and persistent buffer must be there with its
    exact shape, and any other key that is not a known unused one is an error. Each floating
    tensor must hold only finite values (checked as read, before any folding). Floating tensors
    become `dtype` (float32 under `float32_prefixes`), converted on the host before they move to
    `device`. `place(key, host_tensor)`, if given, may take a tensor over (returning True), e.g.
    to quantize it on its way to the device; the others are assigned as they are.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    params = {k for k, _ in model.named_parameters()}
    found = used_shapes(tensor_shapes(files))
    source = files[0].parent if len(files) > 1 else files[0]
    for key, shape in found.items():
        if key not in expected:
            raise UserError(f"unexpected tensor {key!r} {list(shape)} in {source}")
        if shape != expected[key]:
            raise UserError(
                f"tensor {key!r} has shape {list(shape)}, expected {list(expected[key])}"
            )
    missing = [k for k in expected if k not in found]
    if missing:
        shown = ", ".join(f"{k!r} {list(expected[k])}" for k in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"checkpoint {source} lacks tensor {shown}{more}")

    for key, tensor in _folded_tensors(files):
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if key.startswith(float32_prefixes) else dtype)
        if place is None or not place(key, tensor):
            _assign(model, key, tensor.to(device), is_param=key in params)
        del tensor


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, *, is_param: bool) -> None:
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if is_param:
        setattr(owner, name, nn.Parameter(tensor, requires_grad=False))
    else:
        owner._buffers[name] = tensor


def load_lm(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """The HeartMuLa LM of one folder (SPEC §1, §3), as (model, config)."""
    from heartmula_rt.model.lm import HeartMuLa

    config = load_lm_config(model_dir)
    files = shard_files(model_dir)
    with torch.device("meta"):
        model = HeartMuLa(config)
    load_into(model, files, device=device, dtype=dtype)
    return model.eval(), config


def load_codec(
    codec_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """HeartCodec of one folder (SPEC §5), as (model, config); `dtype` applies to the DiT
    blocks, `codec.FLOAT32_PARTS` load in float32 (`HeartCodec.set_precision` casts them)."""
    from heartmula_rt.model.codec import FLOAT32_PARTS, HeartCodec

    config = load_codec_config(codec_dir)
    with torch.device("meta"):
        model = HeartCodec(config)
    load_into(
        model,
        shard_files(codec_dir),
        device=device,
        dtype=dtype,
        float32_prefixes=tuple(f"{part}." for part in FLOAT32_PARTS),
    )
    return model.eval(), config
