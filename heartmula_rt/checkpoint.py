"""Checkpoint folders in the official layout (SPEC §1): finding files, reading configs, streaming
safetensors into models built on the meta device, and fetching the official weights from the hub.

Tensors are read one at a time, converted to the target dtype on the host and only then moved to
the target device, so loading the 15.7 GB float32 LM as bf16 costs about one tensor of extra host
memory and never puts float32 weights on the GPU. Weight norm is folded here, once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import CodecConfig, GenConfig, LMConfig
from .errors import UserError

LM_DIR = "HeartMuLa-oss-3B"
CODEC_DIR = "HeartCodec-oss"
HUB_REPOS = {  # hub repo -> folder under the model path
    "HeartMuLa/HeartMuLaGen": ".",
    "HeartMuLa/HeartMuLa-RL-oss-3B-20260123": LM_DIR,
    "HeartMuLa/HeartCodec-oss-20260123": CODEC_DIR,
}

# Keys the official files carry that inference does not use.
_UNUSED_KEYS = re.compile(
    r"(.*\.pos_embeddings\.(theta|cache)"  # third-party bf16 repacks
    r"|flow_matching\.zero_cond_embedding1"
    r"|flow_matching\.vq_embed\.project_in\..*"
    r"|flow_matching\.vq_embed\.layers\.\d+\._codebook\.(initted|cluster_size|embed_avg)"
    r"|scalar_model\.encoder\..*)"
)
# Weight-norm halves in both spellings torch has used: (module prefix, "g" or "v").
_WEIGHT_NORM_KEY = re.compile(
    r"(?P<prefix>.*)\.(?:parametrizations\.weight\.original(?P<pi>[01])|weight_(?P<gv>[gv]))"
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def load_gen_config(root: Path) -> GenConfig:
    return GenConfig.from_dict(_read_json(Path(root) / "gen_config.json"))


def tokenizer_path(root: Path) -> Path:
    path = Path(root) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"missing file {path}")
    return path


def check_model_path(root: Path) -> None:
    """Fail early, naming what is missing, before anything heavy happens."""
    root = Path(root)
    if root.is_file():
        raise UserError(f"model path {root} is a file; give the checkpoint folder that holds it")
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist")
    tokenizer_path(root)
    for name in ("gen_config.json", f"{LM_DIR}/config.json", f"{CODEC_DIR}/config.json"):
        if not (root / name).is_file():
            raise UserError(f"missing file {root / name}")
    for sub in (LM_DIR, CODEC_DIR):
        shard_files(root / sub)


def shard_files(model_dir: Path) -> list[Path]:
    """A model folder's safetensors files: model.safetensors, or the shards its index names."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} does not exist")
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"missing shard {f} (named in {index.name})")
        return files
    if single.is_file():
        return [single]
    raise UserError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path} is damaged or truncated: not a readable safetensors file ({e})"
        ) from None


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every key's shape as stored, from the file headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                if key in shapes:
                    raise UserError(f"tensor {key!r} appears twice in {path.parent}")
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                if _UNUSED_KEYS.fullmatch(key):
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


def _weight_norm_half(m: re.Match) -> str:
    return m["gv"] or ("g" if m["pi"] == "0" else "v")


def used_shapes(stored: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Stored shapes under module keys: unused tensors dropped, each weight-norm pair as
    `<prefix>.weight` with v's shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in stored.items():
        if _UNUSED_KEYS.fullmatch(key):
            continue
        m = _WEIGHT_NORM_KEY.fullmatch(key)
        if m is None:
            shapes[key] = shape
        else:
            halves.setdefault(m["prefix"], {})[_weight_norm_half(m)] = shape
    for prefix, pair in halves.items():
        if len(pair) < 2:
            missing = "g (original0)" if "g" not in pair else "v (original1)"
            raise UserError(f"weight norm of {prefix!r} lacks its {missing} tensor")
        g, v = pair["g"], pair["v"]
        if g[0] != v[0] or math.prod(g) != g[0]:
            raise UserError(
                f"weight-norm tensors of {prefix!r} do not match: g {list(g)}, v {list(v)}"
            )
        shapes[f"{prefix}.weight"] = v
    return shapes


def _folded_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Used tensors under their module keys, weight-norm pairs folded into `<prefix>.weight`."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _iter_tensors(files):
        m = _WEIGHT_NORM_KEY.fullmatch(key)
        if m is None:
            yield key, tensor
            continue
        pair = halves.setdefault(m["prefix"], {})
        pair[_weight_norm_half(m)] = tensor
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


def load_lm_config(model_dir: Path) -> LMConfig:
    config = _read_json(Path(model_dir) / "config.json")
    return LMConfig.from_dict(config)


def load_lm(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """The HeartMuLa LM of one folder (SPEC §1, §3), as (model, config)."""
    from .lm import HeartMuLa

    config = load_lm_config(model_dir)
    files = shard_files(model_dir)
    with torch.device("meta"):
        model = HeartMuLa(config)
    load_into(model, files, device=device, dtype=dtype)
    return model.eval(), config


def codec_config_from_shapes(
    config: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> CodecConfig:
    """CodecConfig from config.json plus the sizes the reference takes from tensor shapes
    (`shapes` under module keys, as `used_shapes` gives them)."""
    est = "flow_matching.estimator"
    dec = "scalar_model.decoder"

    def weight_shape(prefix: str) -> tuple[int, ...]:
        if f"{prefix}.weight" not in shapes:
            raise UserError(f"codec checkpoint lacks tensor {prefix + '.weight'!r}")
        return shapes[f"{prefix}.weight"]

    channels = [weight_shape(f"{dec}.0")[0]]
    n_up = len(config.get("upsample_factors", CodecConfig.upsample_factors))
    channels += [weight_shape(f"{dec}.{i}.up_conv.layer")[1] for i in range(1, n_up + 1)]
    return CodecConfig.from_dict(
        config,
        mlp_hidden=weight_shape(f"{est}.transformer_blocks.0.mlp.gate")[0],
        mlp_hidden_2=weight_shape(f"{est}.transformer_blocks_2.0.mlp.gate")[0],
        decoder_channels=channels,
    )


def load_codec_config(codec_dir: Path) -> CodecConfig:
    files = shard_files(codec_dir)
    return codec_config_from_shapes(
        _read_json(Path(codec_dir) / "config.json"), used_shapes(tensor_shapes(files))
    )


def load_codec(
    codec_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """HeartCodec of one folder (SPEC §5), as (model, config); `dtype` applies to the DiT
    blocks, `codec.FLOAT32_PARTS` load in float32 (`HeartCodec.set_precision` casts them)."""
    from .codec import FLOAT32_PARTS, HeartCodec

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


def download(root: Path) -> Path:
    """Fetch the official weights into `root` in the layout SPEC §1 describes."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("huggingface_hub is not installed: pip install huggingface_hub") from None
    root = Path(root)
    for repo, sub in HUB_REPOS.items():
        try:
            snapshot_download(repo, local_dir=root / sub)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            hint = "; ".join(
                f"hf download {r} --local-dir {root / s}" for r, s in HUB_REPOS.items()
            )
            raise UserError(
                f"could not download {repo} from the Hugging Face hub ({type(e).__name__}: "
                f"offline?); fetch the weights by hand with: {hint}"
            ) from None
    return root
