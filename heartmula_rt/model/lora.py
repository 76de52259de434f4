"""LoRA adapters for the HeartMuLa LM: read from the files fine-tuning tools write, then either
merged into the weights before quantization, or applied per LM row over shared base weights.

Files (docs/lora.md has the details and the naming map):

- a PEFT folder (`adapter_model.safetensors` + `adapter_config.json`: what SimpleTuner saves),
  or one `.safetensors` file (rank and alpha from its metadata, per-module `alpha` tensors or,
  lacking both, alpha = rank);
- a `.pt`/`.pth`/`.bin` dict, read with `torch.load(weights_only=True)` only: a flat state dict,
  `{module: {lora_A, lora_B, rank, alpha}}`, or `{lora_A: {module: A}, lora_B: {...}, rank,
  alpha}`;
- keys in HF-Llama names (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, SimpleTuner's
  re-implementation) or torchtune's (this runtime's: `attn.{q,k,v,output}_proj`,
  `mlp.w1/w2/w3`), under the wrapper prefixes real files carry (`base_model.model.`,
  `transformer.`, ...), A/B as `[r, in]`/`[out, r]` or transposed, the orientation decided by
  the shapes against the target module.

Every key must map onto a module of this checkpoint with matching shapes, or the file is refused
with one sentence naming the first key that does not, and nothing is loaded.

Two ways to run them:

- merged: `W + scale·(alpha/r)·B·A` folded into each target weight (`merged_weight`) before it
  is quantized, so every quantization mode and engine runs at its usual speed;
- per row (lora_rows.py): `apply_lora_rows` wraps each target module in `RowLoraLinear`,
  which adds the LoRA of each LM row's own adapter (a gather of the rows' A and B, punica's BGMV
  as two batched matmuls). The adapter of each row is an int64 device tensor (`LoraRows.index`,
  -1: none), so one captured CUDA graph serves any mix of adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import pickle
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor, nn

from heartmula_rt.config import LMConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.lm import merged_part

# The wrappers training tools put before the model's own module names, stripped in any order:
# PEFT's `base_model.model.`, diffusers' `transformer.`, ComfyUI's `diffusion_model.`, torchtune
# and DDP checkpoints' `model.`/`module.`.
WRAPPER_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.", "module.")
# HF-Llama leaf names (SimpleTuner's re-implementation) → this runtime's torchtune names.
HF_TO_TORCHTUNE = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.output_proj",
    "mlp.gate_proj": "mlp.w1",
    "mlp.up_proj": "mlp.w3",
    "mlp.down_proj": "mlp.w2",
}
_LAYER_LINEAR = re.compile(
    r"(?P<stack>backbone|decoder)\.layers\.(?P<layer>\d+)\."
    r"(?P<leaf>(?:self_attn|attn)\.(?:q_proj|k_proj|v_proj|o_proj|output_proj)"
    r"|mlp\.(?:gate_proj|up_proj|down_proj|w1|w2|w3))"
)
# The reference-audio projection runs once per prompt on one vector, not on the LM's rows: a
# LoRA of it can be merged but not run per row.
MERGE_ONLY = ("muq_linear",)
_A_NAMES = {"lora_a", "lora_down"}
_B_NAMES = {"lora_b", "lora_up"}
_ALPHA_NAMES = {"alpha", "lora_alpha"}
_RANK_NAMES = {"rank", "r"}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# diffusers keeps a LoRA's config as JSON under this safetensors metadata key; kohya-style
# trainers keep rank and alpha as `ss_network_dim` / `ss_network_alpha`.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def lora_targets(config: LMConfig) -> dict[str, tuple[int, int]]:
    """The modules a LoRA may adapt, by runtime name, with their weights' [out, in]: every
    Linear of the backbone and the depth decoder, `projection` and `codebook0_head` (the
    modules `quant.quantized_linears` swaps), and `muq_linear` (MERGE_ONLY). `audio_head` is a
    Parameter, not a Linear: no LoRA tool targets it."""
    shapes: dict[str, tuple[int, int]] = {}
    for stack, f in (("backbone", config.backbone), ("decoder", config.decoder)):
        q, kv = f.num_heads * f.head_dim, f.num_kv_heads * f.head_dim
        for i in range(f.num_layers):
            p = f"{stack}.layers.{i}"
            shapes[f"{p}.attn.q_proj"] = (q, f.embed_dim)
            shapes[f"{p}.attn.k_proj"] = (kv, f.embed_dim)
            shapes[f"{p}.attn.v_proj"] = (kv, f.embed_dim)
            shapes[f"{p}.attn.output_proj"] = (f.embed_dim, q)
            shapes[f"{p}.mlp.w1"] = (f.intermediate_dim, f.embed_dim)
            shapes[f"{p}.mlp.w2"] = (f.embed_dim, f.intermediate_dim)
            shapes[f"{p}.mlp.w3"] = (f.intermediate_dim, f.embed_dim)
    shapes["projection"] = (config.decoder.embed_dim, config.backbone.embed_dim)
    shapes["codebook0_head"] = (config.audio_vocab_size, config.backbone.embed_dim)
    shapes["muq_linear"] = (config.backbone.embed_dim, config.muq_dim)
    return shapes


@dataclass(frozen=True)
class LoraSpec:
    """One adapter as asked for: its file or folder, the strength it is applied at, and the
    name it goes by (None: the file's; serve's requests choose adapters by name)."""

    path: Path
    scale: float = 1.0
    name: str | None = None


# `NAME=PATH[:SCALE]`: a name is letters, digits, `_`, `-` and `.` (never a path's `/`).
_SPEC_NAME = re.compile(r"(?P<name>[A-Za-z0-9_.-]{1,64})=(?P<rest>.+)")


def parse_lora_spec(text: str | Path | LoraSpec) -> LoraSpec:
    """`[NAME=]PATH[:SCALE]` (the CLI's `--lora`): SCALE, a finite number, defaults to 1. A
    colon whose tail is not a number belongs to the path (`C:\\loras\\x.safetensors`); a
    `NAME=` prefix names the adapter (serve's requests choose it by that name), unless the
    whole text is an existing file or folder."""
    if isinstance(text, LoraSpec):
        return text
    if isinstance(text, Path):
        return LoraSpec(text)
    named = _SPEC_NAME.fullmatch(text)
    if named is not None and not Path(text).expanduser().exists():
        spec = parse_lora_spec(named["rest"])
        return LoraSpec(spec.path, spec.scale, named["name"])
    head, colon, tail = text.rpartition(":")
    path, scale = text, 1.0
    if colon and "/" not in tail and "\\" not in tail:  # else the colon is the path's
        try:
            scale = float(tail)
        except ValueError:
            if re.fullmatch(r"[-+.\deE]*", tail.strip().lower()):
                raise UserError(f"--lora {text!r}: the scale {tail!r} is not a number") from None
        else:
            path = head
    if not path:
        raise UserError(f"--lora {text!r} names no file; use PATH or PATH:SCALE")
    if not math.isfinite(scale):
        raise UserError(f"--lora {text!r}: the scale must be a finite number, not {scale}")
    return LoraSpec(Path(path).expanduser(), scale)


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA, float32 on the CPU: a [r, in], b [out, r], `scaling` = alpha / r
    (alpha / √r for rsLoRA); its delta is `scaling · b @ a`."""

    a: Tensor
    b: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA file read against one checkpoint's modules. `fingerprint` is the sha256 of the
    files read (the same bytes anywhere give the same one); `scale` multiplies every delta."""

    name: str
    path: Path
    modules: dict[str, LoraModule]
    fingerprint: str
    scale: float = 1.0

    @property
    def key(self) -> str:
        """What identifies this adapter's effect on the weights: contents and scale (the
        quantized cache's key and file name include it)."""
        return f"{self.fingerprint}@{self.scale!r}"

    @property
    def rank(self) -> int:
        """The largest rank of its modules."""
        return max((m.rank for m in self.modules.values()), default=0)

    def delta(self, name: str, device: torch.device | str | None = None) -> Tensor | None:
        """`scale · scaling · B @ A` of module `name` as float32 [out, in] (on `device`), or
        None where this adapter leaves it alone."""
        m = self.modules.get(name)
        if m is None:
            return None
        a, b = m.a.to(device), m.b.to(device)
        return (b @ a) * (self.scale * m.scaling)

    def with_scale(self, scale: float) -> LoraAdapter:
        return LoraAdapter(self.name, self.path, self.modules, self.fingerprint, scale)


# ---------------------------------------------------------------------------------------------
# Reading files


def _fail(source: Path, message: str) -> UserError:
    return UserError(f"LoRA {source}: {message}; nothing was loaded")


def _first_line(e: Exception) -> str:
    """An exception's first line, for a one-sentence message."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__") or {}


def _config_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """rank/alpha settings kept in a safetensors file's own metadata, if any."""
    config: dict[str, Any] = {}
    if DIFFUSERS_METADATA_KEY in metadata:
        try:
            packed = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError:
            packed = {}
        if isinstance(packed, dict):
            # diffusers packs each component's config under "<component>." keys.
            config.update({k.rpartition(".")[2]: v for k, v in packed.items()})
    if "ss_network_dim" in metadata:
        config.setdefault("r", metadata["ss_network_dim"])
    if "ss_network_alpha" in metadata:
        config.setdefault("lora_alpha", metadata["ss_network_alpha"])
    return config


def _flatten(source: Path, obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(source, v, f"{prefix}{k}.", out)
    elif isinstance(obj, Tensor | int | float) and not isinstance(obj, bool):
        out[prefix[:-1]] = obj
    else:
        raise _fail(source, f"entry {prefix[:-1]!r} is a {type(obj).__name__}, not a tensor")


def _torch_entries(source: Path, data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `.pt` dict's tensors by flat key, and its file-level rank/alpha."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        raise _fail(
            source,
            "not a weights-only torch file (it holds Python objects or code, which are never "
            f"unpickled, or it is damaged: {_first_line(e)[:120]}); save it as safetensors",
        ) from None
    if isinstance(obj, Mapping) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise _fail(source, f"holds a {type(obj).__name__}, not a dict of LoRA tensors")
    config: dict[str, Any] = {}
    entries: dict[str, Any] = {}
    for k, v in obj.items():
        if k in ("rank", "r", "alpha", "lora_alpha") and not isinstance(v, Mapping | Tensor):
            config["r" if k in _RANK_NAMES else "lora_alpha"] = v
        elif k in ("rank", "r", "alpha", "lora_alpha") and isinstance(v, Tensor) and v.numel() == 1:
            config["r" if k in _RANK_NAMES else "lora_alpha"] = v.item()
        elif k.lower() in _A_NAMES | _B_NAMES and isinstance(v, Mapping):
            # {lora_A: {module: A}, lora_B: {module: B}}: one group per matrix.
            for module, t in v.items():
                _flatten(source, t, f"{module}.{k}.", entries)
        else:
            _flatten(source, v, f"{k}.", entries)
    return entries, config


def _read(source: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(entries by key, adapter config, sha256 of every file read) of a LoRA file or folder."""
    digest = hashlib.sha256()
    config: dict[str, Any] = {}
    weights = source
    if source.is_dir():
        candidates = [source / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise _fail(source, "the folder holds no adapter_model.safetensors")
        weights = found[0]
    elif not source.is_file():
        raise UserError(f"LoRA {source} does not exist")
    config_file = weights.with_name("adapter_config.json")
    if weights.name.startswith("adapter_model") and config_file.is_file():
        text = config_file.read_bytes()
        digest.update(text)
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(
                source, f"{config_file.name} is not valid JSON ({_first_line(e)})"
            ) from None
        if not isinstance(config, dict):
            raise _fail(source, f"{config_file.name} is not a JSON object")
    try:
        data = weights.read_bytes()
    except OSError as e:
        raise UserError(f"LoRA {source} cannot be read ({e.strerror})") from None
    digest.update(data)
    if weights.suffix == ".safetensors":
        try:
            entries: dict[str, Any] = dict(load_safetensors_bytes(data))
            metadata = _safetensors_metadata(data)
        except (SafetensorError, ValueError, struct.error, json.JSONDecodeError) as e:
            raise _fail(
                source, f"{weights.name} is not a readable safetensors file ({_first_line(e)})"
            ) from None
        config = {**_config_from_metadata(metadata), **config}
    elif weights.suffix in _TORCH_SUFFIXES:
        entries, file_config = _torch_entries(source, data)
        config = {**file_config, **config}
    else:
        raise UserError(
            f"LoRA {source}: unknown file type {weights.suffix!r}; give a .safetensors file, "
            "a PEFT folder or a .pt dict"
        )
    return entries, config, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Mapping keys onto modules


def runtime_name(module_key: str) -> tuple[str, str] | None:
    """(this runtime's module name, the name as the file's model called it, wrapper prefixes
    stripped: what PEFT's rank/alpha patterns match) of a module key, or None if it names no
    module a LoRA of this runtime can adapt."""
    name = module_key
    while not name.startswith(("backbone.", "decoder.")) and name not in (
        "projection",
        "codebook0_head",
        *MERGE_ONLY,
    ):
        prefix = next((p for p in WRAPPER_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            return None
        name = name[len(prefix) :]
    m = _LAYER_LINEAR.fullmatch(name)
    if m is not None:
        leaf = HF_TO_TORCHTUNE.get(m["leaf"], m["leaf"]).replace("self_attn.", "attn.")
        leaf = leaf.replace("attn.o_proj", "attn.output_proj")
        return f"{m['stack']}.layers.{m['layer']}.{leaf}", name
    if name in ("projection", "codebook0_head", *MERGE_ONLY):
        return name, name
    return None


def _split_key(key: str) -> tuple[str, str] | None:
    """(module key, kind: "a", "b", "alpha" or "rank") of a LoRA entry, or None."""
    parts = key.split(".")
    if parts[-1] == "weight":
        parts = parts[:-1]
    for depth in (1, 2):  # `lora_A` or PEFT's in-memory `lora_A.<adapter name>`
        if len(parts) <= depth:
            break
        kind = parts[-depth].lower()
        if kind in _A_NAMES | _B_NAMES:
            return ".".join(parts[:-depth]), "a" if kind in _A_NAMES else "b"
    if parts[-1].lower() in _ALPHA_NAMES and key.split(".")[-1] != "weight":
        return ".".join(parts[:-1]), "alpha"
    if parts[-1].lower() in _RANK_NAMES and key.split(".")[-1] != "weight":
        return ".".join(parts[:-1]), "rank"
    return None


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module's
    name (as a regular expression, on a dot boundary)."""
    for pattern, value in patterns.items():
        with contextlib.suppress(re.error):
            if re.match(rf"(.*\.)?({pattern})$", name):
                return value
    return None


def _number(source: Path, what: str, value: Any) -> float:
    try:
        number = float(value.item() if isinstance(value, Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise _fail(source, f"{what} {value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise _fail(source, f"{what} is {number:g}; it must be a positive number")
    return number


def _orientations(a: Tensor, b: Tensor, out: int, inn: int) -> tuple[bool, bool]:
    """Whether (A, B) fit [r, in] and [out, r] as stored, and whether transposed."""
    if a.dim() != 2 or b.dim() != 2:
        return False, False
    plain = a.shape[1] == inn and b.shape[0] == out and a.shape[0] == b.shape[1]
    flipped = a.shape[0] == inn and b.shape[1] == out and a.shape[1] == b.shape[0]
    return plain, flipped


def _shape_error(source: Path, keys: dict, target: str, a: Tensor, b: Tensor, shape) -> UserError:
    """The module's A and B fit its weight in neither orientation: the key named is A's if A
    fits neither side of the weight's input, else B's if it fits neither side of its output,
    else (their ranks disagree) A's, whatever order the file stores them in."""
    out, inn = shape
    b_wrong = inn in a.shape and out not in b.shape
    key = keys["b"] if b_wrong else keys["a"]
    return _fail(
        source,
        f"key {key!r} holds lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not fit "
        f"{target} [{out}, {inn}] of this checkpoint (a LoRA made for another model size?)",
    )


def load_lora(
    spec: str | Path | LoraSpec, config: LMConfig, *, name: str | None = None
) -> LoraAdapter:
    """Read one LoRA (file or PEFT folder; `PATH[:SCALE]` or a `LoraSpec`) against the modules
    of `config`'s checkpoint. Refused with one sentence (UserError) unless every key maps onto a
    module of this checkpoint with fitting shapes and the ranks agree with its config."""
    spec = parse_lora_spec(spec)
    name = name or spec.name
    source = spec.path
    entries, config_json, fingerprint = _read(source)
    if config_json.get("use_dora"):
        raise _fail(source, "it is a DoRA adapter (use_dora), which this runtime does not run")
    default_rank = config_json.get("r")
    default_alpha = config_json.get("lora_alpha")
    rank_pattern = config_json.get("rank_pattern") or {}
    alpha_pattern = config_json.get("alpha_pattern") or {}
    rslora = bool(config_json.get("use_rslora"))
    targets = lora_targets(config)

    # Group the entries by module, in the file's order; the first bad key is the one named.
    grouped: dict[str, dict[str, Any]] = {}
    first_key: dict[str, str] = {}
    keys_of: dict[str, dict[str, str]] = {}
    names: dict[str, tuple[str, str]] = {}
    for key, value in entries.items():
        if "lora_magnitude_vector" in key:
            raise _fail(source, f"key {key!r} is a DoRA magnitude, which this runtime does not run")
        split = _split_key(key)
        if split is None:
            raise _fail(source, f"key {key!r} is not a LoRA matrix, rank or alpha")
        module_key, kind = split
        if kind in ("a", "b") and not key.endswith(".weight") and key.endswith(".bias"):
            raise _fail(source, f"key {key!r} is a LoRA bias, which this runtime does not run")
        mapped = runtime_name(module_key)
        if mapped is None or mapped[0] not in targets:
            raise _fail(source, f"key {key!r} names no module of this checkpoint")
        if kind in ("a", "b") and not isinstance(value, Tensor):
            raise _fail(source, f"key {key!r} is not a tensor")
        if kind in ("a", "b") and not value.is_floating_point():
            raise _fail(source, f"key {key!r} is not a floating-point tensor")
        if kind in ("a", "b") and not bool(torch.isfinite(value).all()):
            raise _fail(source, f"key {key!r} holds NaN or Inf values")
        group = grouped.setdefault(mapped[0], {})
        if kind in group:
            raise _fail(source, f"key {key!r} repeats the {kind} of {mapped[0]} under another name")
        group[kind] = value
        keys_of.setdefault(mapped[0], {})[kind] = key
        first_key.setdefault(mapped[0], key)
        names[mapped[0]] = mapped
    if not any("a" in g or "b" in g for g in grouped.values()):
        raise _fail(source, "it holds no LoRA matrices (lora_A / lora_B)")

    # Each module's A and B against its weight: the file's one orientation, from the modules
    # whose shapes allow only one (a rank equal to a side of the weight allows both).
    fits: dict[str, tuple[bool, bool]] = {}
    for target, group in grouped.items():
        key = first_key[target]
        if "a" not in group or "b" not in group:
            missing = "lora_B" if "a" in group else "lora_A"
            raise _fail(source, f"key {key!r} has no matching {missing}")
        shape = targets[target]
        plain, flipped = _orientations(group["a"], group["b"], *shape)
        if not (plain or flipped):
            raise _shape_error(source, keys_of[target], target, group["a"], group["b"], shape)
        fits[target] = plain, flipped
    decided = {plain for plain, flipped in fits.values() if plain != flipped}
    if len(decided) > 1:
        raise _fail(source, "its modules store lora_A/lora_B in both orientations")
    if not decided:
        raise _fail(
            source,
            "the orientation of lora_A/lora_B is ambiguous (their rank equals a side of every "
            "weight they adapt); save A as [rank, in] with an adapter_config.json",
        )
    plain_file = decided.pop()

    modules: dict[str, LoraModule] = {}
    for target, group in grouped.items():
        key = first_key[target]
        a, b = group["a"], group["b"]
        if not plain_file:
            a, b = a.T, b.T
        rank = a.shape[0]
        orig = names[target][1]
        expected = _pattern_value(rank_pattern, orig)
        expected = group.get("rank", expected if expected is not None else default_rank)
        if expected is not None and int(_number(source, f"the rank of {key!r}", expected)) != rank:
            raise _fail(
                source,
                f"key {key!r} has rank {rank} but its config says rank "
                f"{int(_number(source, 'rank', expected))}",
            )
        alpha = group.get("alpha")
        if alpha is None:
            alpha = _pattern_value(alpha_pattern, orig)
        if alpha is None:
            alpha = default_alpha if default_alpha is not None else rank  # PEFT's default
        alpha = _number(source, f"the alpha of {key!r}", alpha)
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules[target] = LoraModule(
            a.detach().to(torch.float32).contiguous(),
            b.detach().to(torch.float32).contiguous(),
            scaling,
        )
    default_name = source.name if source.is_dir() else source.stem
    if source.is_dir() is False and source.stem == "adapter_model":
        default_name = source.parent.name
    return LoraAdapter(
        name=name or default_name,
        path=source,
        modules=modules,
        fingerprint=fingerprint,
        scale=spec.scale,
    )


def load_loras(
    specs: Sequence[str | Path | LoraSpec], config: LMConfig, names: Sequence[str] | None = None
) -> list[LoraAdapter]:
    """Every adapter of `specs` (see `load_lora`), all read before any is used: one bad file
    refuses them all. `names` (serve's `--lora name=PATH`) default to the files' stems and must
    differ."""
    if names is not None and len(names) != len(specs):
        raise ValueError("give one name per LoRA")
    adapters = [
        load_lora(spec, config, name=None if names is None else names[i])
        for i, spec in enumerate(specs)
    ]
    seen: set[str] = set()
    for adapter in adapters:
        if adapter.name in seen:
            raise UserError(f"two LoRAs are named {adapter.name!r}; give each its own name")
        seen.add(adapter.name)
    return adapters


def adapters_key(adapters: Sequence[LoraAdapter]) -> str:
    """One string for a merged set of adapters, in order ("" for none): for cache keys."""
    return "+".join(a.key for a in adapters)


# ---------------------------------------------------------------------------------------------
# Merged


def merged_weight(adapters: Sequence[LoraAdapter], name: str, weight: Tensor) -> Tensor:
    """Module `name`'s weight [out, in] with every adapter's delta added, as float32 on its
    device (the quantizers take float32; the plain path casts back), or `weight` itself where
    no adapter touches it. What a loader calls between reading a weight and quantizing it."""
    deltas = [d for a in adapters if (d := a.delta(name, weight.device)) is not None]
    if not deltas:
        return weight
    merged = weight.to(torch.float32, copy=True)
    for delta in deltas:
        merged += delta
    return merged


@torch.no_grad()
def merge_lora(model: nn.Module, adapters: Sequence[LoraAdapter]) -> nn.Module:
    """Fold `adapters` into an unquantized model's weights in place (before `quantize_model`),
    each sum made in float32 and stored back in the weight's dtype; returns the model."""
    if not adapters:
        return model
    names = {n for a in adapters for n in a.modules}
    for name in sorted(names):
        # A part of a merged matmul (lm.merge_projections: q_proj of qkv_proj, w1 of w13): its
        # rows of the merged weight.
        target, rows = merged_part(model, name) or (name, slice(None))
        module = model.get_submodule(target)
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None:
            raise UserError(
                f"cannot merge a LoRA into {name}: it is already quantized; merge before "
                "quantizing (or run the LoRA per row)"
            )
        part = weight[rows]
        part.copy_(merged_weight(adapters, name, part).to(weight.dtype))
    return model
