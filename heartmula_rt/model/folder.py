"""A checkpoint folder in the official layout (SPEC §1): its files, configs and tensor shapes,
read without torch (config.json and the safetensors headers), and fetching it from the hub.
checkpoint.py streams the tensors themselves into models.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from heartmula_rt.config import CodecConfig, GenConfig, LMConfig
from heartmula_rt.errors import UserError

LM_DIR = "HeartMuLa-oss-3B"


CODEC_DIR = "HeartCodec-oss"


HUB_REPOS = {  # hub repo -> folder under the model path
    "HeartMuLa/HeartMuLaGen": ".",
    "HeartMuLa/HeartMuLa-RL-oss-3B-20260123": LM_DIR,
    "HeartMuLa/HeartCodec-oss-20260123": CODEC_DIR,
}


# Keys the official files carry that inference does not use.
UNUSED_KEYS = re.compile(
    r"(.*\.pos_embeddings\.(theta|cache)"  # third-party bf16 repacks
    r"|flow_matching\.zero_cond_embedding1"
    r"|flow_matching\.vq_embed\.project_in\..*"
    r"|flow_matching\.vq_embed\.layers\.\d+\._codebook\.(initted|cluster_size|embed_avg)"
    r"|scalar_model\.encoder\..*)"
)


# Weight-norm halves in both spellings torch has used: (module prefix, "g" or "v").
WEIGHT_NORM_KEY = re.compile(
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
    """gen_config.json, its ids checked against the LM's vocabularies (its config.json, when
    the folder has one): refused in one line naming the field and its range."""
    lm_config = Path(root) / LM_DIR / "config.json"
    lm = load_lm_config(lm_config.parent) if lm_config.is_file() else None
    return GenConfig.from_dict(_read_json(Path(root) / "gen_config.json"), lm)


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


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: 8 bytes of little-endian length, then that much JSON."""
    damaged = f"{path} is damaged or truncated: not a readable safetensors file"
    try:
        with path.open("rb") as f:
            size = f.read(8)
            length = int.from_bytes(size, "little")
            if len(size) < 8 or length > path.stat().st_size - 8:
                raise UserError(f"{damaged} (header past the end of the file)")
            header = json.loads(f.read(length))
    except OSError as e:
        raise UserError(f"{damaged} ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{damaged} (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{damaged} (header is not a JSON object)")
    return header


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every key's shape as stored, from the file headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        for key, entry in _header(path).items():
            if key == "__metadata__":
                continue
            if key in shapes:
                raise UserError(f"tensor {key!r} appears twice in {path.parent}")
            try:
                shapes[key] = tuple(int(n) for n in entry["shape"])
            except (TypeError, KeyError, ValueError):
                raise UserError(
                    f"{path} is damaged or truncated: tensor {key!r} has no valid shape"
                ) from None
    return shapes


def fingerprint(root: Path) -> str:
    """A short hex name of a checkpoint's weights, read without them: sha256 over the LM's and
    the codec's config.json and each of their safetensors files' name and header (every
    tensor's name, dtype, shape and offsets). Copies of one checkpoint share it; another config
    or any tensor of another name, dtype or shape changes it (values are not read)."""
    h = hashlib.sha256()
    for sub in (LM_DIR, CODEC_DIR):
        model_dir = Path(root) / sub
        config = _read_json(model_dir / "config.json")
        h.update(f"{sub}/config.json\0{json.dumps(config, sort_keys=True)}\0".encode())
        for path in shard_files(model_dir):
            header = json.dumps(_header(path), sort_keys=True)
            h.update(f"{sub}/{path.name}\0{header}\0".encode())
    return h.hexdigest()[:16]


def weight_norm_half(m: re.Match) -> str:
    return m["gv"] or ("g" if m["pi"] == "0" else "v")


def used_shapes(stored: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Stored shapes under module keys: unused tensors dropped, each weight-norm pair as
    `<prefix>.weight` with v's shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in stored.items():
        if UNUSED_KEYS.fullmatch(key):
            continue
        m = WEIGHT_NORM_KEY.fullmatch(key)
        if m is None:
            shapes[key] = shape
        else:
            halves.setdefault(m["prefix"], {})[weight_norm_half(m)] = shape
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


def load_lm_config(model_dir: Path) -> LMConfig:
    config = _read_json(Path(model_dir) / "config.json")
    return LMConfig.from_dict(config)


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
