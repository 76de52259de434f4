"""A quantized LM: quantized while it loads, saved once, reloaded on later runs as it is.

Loading quantizes tensor by tensor: each matmul weight goes from the shard to the device and is
quantized there, so neither the host nor the device ever holds the unquantized model.
The cache is one safetensors file per (checkpoint folder, mode, LM dtype) in
`default_cache_dir()`, holding the whole quantized LM state dict. Its metadata carries a key made
of the mode, the dtype, the runtime's cache format version and the checkpoint's fingerprint (each
shard's name, size, modification time and safetensors header, plus config.json), so a rewritten
checkpoint or a new runtime makes it stale. A stale or damaged cache is rebuilt with a one-line
notice; a cache that cannot be written costs a notice, never the run.

Each layer's q/k/v projections and w1/w3 are merged into one matmul (`lm.merge_projections`) as
they load: the concatenated weight is quantized (the cache holds `qkv_proj` and `w13`), the parts
of a group kept on the device until the last of them is read.

LoRA adapters loaded merged (`heartmula_rt.model.lora`) are folded into each weight between
reading and quantizing it; their fingerprints and scales join the key, and a short hash of them
the file name, so each set of adapters has a cache of its own beside the base model's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from heartmula_rt.quant.fast import use_fast_kernels
from heartmula_rt.quant.formats import (
    FORMATS,
    QuantizedAudioHead,
    check_mode,
    quantize_model,
    quantized_linears,
    set_audio_head,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from heartmula_rt import __version__
from heartmula_rt.model.checkpoint import load_into
from heartmula_rt.model.folder import load_lm_config, shard_files
from heartmula_rt.model.lm import MERGED_PARTS, HeartMuLa, merge_projections
from heartmula_rt.model.lora import LoraAdapter, adapters_key, merged_weight

log = logging.getLogger(__name__)
# Bump when the quantized layout changes: older caches then read as stale.
# 2: q/k/v and w1/w3 merged (`qkv_proj`, `w13`, quantized concatenated).
CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    """$HEARTMULA_RT_CACHE, else heartmula-rt/quant in the user cache."""
    if "HEARTMULA_RT_CACHE" in os.environ:
        return Path(os.environ["HEARTMULA_RT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "heartmula-rt/quant"


def fingerprint(model_dir: Path) -> str:
    """What identifies a checkpoint's contents without reading its gigabytes: config.json, and
    per shard its name, size, modification time and safetensors header."""
    h = hashlib.sha256(Path(model_dir, "config.json").read_bytes())
    for path in shard_files(model_dir):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, 100_000_000)))
    return h.hexdigest()


def cache_key(
    model_dir: Path, mode: str, dtype: torch.dtype, lora: Sequence[LoraAdapter] = ()
) -> str:
    parts = [mode, str(dtype), str(CACHE_FORMAT), __version__, fingerprint(model_dir)]
    if lora:  # absent without adapters: the base model's key is what it always was
        parts.append(adapters_key(lora))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cache_path(
    model_dir: Path,
    mode: str,
    dtype: torch.dtype,
    cache_dir: Path,
    lora: Sequence[LoraAdapter] = (),
) -> Path:
    """One file per checkpoint folder, mode, dtype and set of merged adapters: a new key
    replaces the old file."""
    folder = re.sub(r"[^A-Za-z0-9]+", "-", str(Path(model_dir).resolve())).strip("-")
    dtype_name = str(dtype).removeprefix("torch.")
    suffix = ""
    if lora:
        suffix = "-lora-" + hashlib.sha256(adapters_key(lora).encode()).hexdigest()[:16]
    return cache_dir / f"{folder}-{mode}-{dtype_name}{suffix}.safetensors"


def _load_cached(path: Path, key: str, model_dir: Path, mode: str, device: torch.device):
    """The cached model, or None (with the reason logged) if it is missing, stale or damaged."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored_key = (f.metadata() or {}).get("key")
        if stored_key != key:
            log.warning("quantized cache %s is stale; rebuilding it", path)
            return None
        with torch.device("meta"):
            model = HeartMuLa(load_lm_config(model_dir))
        quantize_model(merge_projections(model), mode)
        model.load_state_dict(load_file(str(path), device=str(device)), strict=True, assign=True)
        return model.eval()
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("quantized cache %s is damaged (%s); rebuilding it", path, reason)
        return None


def _save(model: HeartMuLa, path: Path, key: str) -> None:
    """Write the cache atomically (temporary file, then rename); failure is only a notice."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        log.warning("could not write the quantized cache %s (%s)", path, reason)


@torch.no_grad()
def quantize_checkpoint(
    model_dir: Path,
    mode: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    lora: Sequence[LoraAdapter] = (),
) -> HeartMuLa:
    """The checkpoint's LM, each matmul weight quantized on `device` as it is read: the peak is
    the quantized model plus one unquantized tensor (the audio head: one codebook), or the
    parts read so far of one merged matmul (`lm.merge_projections`: q/k/v, w1/w3; those of a
    layer usually sit in one shard, in order). `lora`'s
    deltas are added to each weight first (`lora.merged_weight`, in float32)."""
    with torch.device("meta"):
        model = HeartMuLa(load_lm_config(model_dir))
    cls = FORMATS[mode]
    linears = {f"{name}.weight": name for name in quantized_linears(model)}
    adapted = {f"{name}.weight": name for adapter in lora for name in adapter.modules}
    part_of = {part: merged for merged, parts in MERGED_PARTS.items() for part in parts}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # merged module → its parts read so far

    def merge(name: str, tensor: torch.Tensor) -> bool:
        """Keep a part of a merged matmul; quantize the concatenation once all are read."""
        owner_name, _, leaf = name.rpartition(".")
        merged = part_of.get(leaf)
        if merged is None:
            return False
        parts = pending.setdefault(f"{owner_name}.{merged}", {})
        parts[leaf] = tensor.to(device)
        if len(parts) == len(MERGED_PARTS[merged]):
            del pending[f"{owner_name}.{merged}"]
            ordered = [parts.pop(p) for p in MERGED_PARTS[merged]]
            dtype = ordered[0].dtype
            if any(t.dtype != dtype for t in ordered):  # a LoRA-merged part is float32
                ordered = [t.float() for t in ordered]
            weight = torch.cat(ordered)
            del ordered
            model.get_submodule(owner_name).merge(cls.from_weight(weight))
        return True

    def quantize(key: str, tensor: torch.Tensor) -> bool:
        if key in adapted:
            merged = merged_weight(lora, adapted[key], tensor.to(device))
            if key not in linears:  # kept unquantized (muq_linear): merged, in the LM dtype
                weight = torch.nn.Parameter(merged.to(tensor.dtype), requires_grad=False)
                model.get_submodule(adapted[key]).weight = weight
                return True
            tensor = merged
        if key in linears:
            if not merge(linears[key], tensor):
                model.set_submodule(linears[key], cls.from_weight(tensor.to(device)))
        elif key == "audio_head":
            set_audio_head(model, QuantizedAudioHead.from_parameter(tensor, mode, device))
        else:
            return False
        return True

    load_into(model, shard_files(model_dir), device=device, dtype=dtype, place=quantize)
    return model.eval()


def load_quantized_lm(
    model_dir: Path,
    mode: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
    lora: Sequence[LoraAdapter] = (),
) -> HeartMuLa:
    """The checkpoint's LM quantized to `mode` on `device`: from the cache when it is current,
    else quantized while loading (`quantize_checkpoint`) and cached; then with the fast kernels
    the device has (`quant.fast`). `lora`: adapters merged before quantizing (cached apart)."""
    check_mode(mode)
    model_dir = Path(model_dir)
    key = cache_key(model_dir, mode, dtype, lora)
    path = cache_path(model_dir, mode, dtype, cache_dir or default_cache_dir(), lora)
    model = _load_cached(path, key, model_dir, mode, device)
    if model is None:
        model = quantize_checkpoint(model_dir, mode, device=device, dtype=dtype, lora=lora)
        _save(model, path, key)
    use_fast_kernels(model, dtype)
    return model
