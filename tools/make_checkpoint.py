"""Write a random HeartMuLa + HeartCodec checkpoint folder in the official layout (SPEC §1).

    python tools/make_checkpoint.py OUT --lm tiny --codec tiny            # seconds, for tests
    python tools/make_checkpoint.py OUT --lm 3B --codec full --dtype bfloat16   # for benchmarks
    python tools/make_checkpoint.py OUT --never-eos      # songs that run to their length

`--never-eos`: random weights sample the audio EOS after a few frames; with it, the LM's output
heads give the ids that end a song (>= gen_config's audio_eos_id) a logit of 0, the middle of the
random others, so top-k sampling never draws them (benchmarks/serve_bench.py's songs must run to
their length to measure anything). The ids and everything else stay as the official files have.

Keys, shapes, weight-norm halves, the unused VQ buffers, sharding and the index file follow the
published files, so the real loading code is exercised. Tensors are made and written one shard at
a time, so a full-size checkpoint needs about one shard of host memory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from heartmula_rt.config import CODEC_PRESETS, LM_PRESETS, CodecConfig, LMConfig
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.folder import CODEC_DIR, LM_DIR
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.synthetic import make_tokenizer, random_tensor, synthetic_gen_config

# Every conv of the scalar decoder is weight-normed except the post-processor's plain `conv`.
_WEIGHT_NORMED = re.compile(r"scalar_model\.decoder\.\d+(\.(?!conv\.)[\w.]+)?\.weight")


def _official_tensors(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A module tensor as the published files store it: weight norm split into g and v.

    g = 1 keeps each folded row at unit norm, about what the fan-in scaling gives.
    """
    if _WEIGHT_NORMED.fullmatch(key) and t.dim() == 3:
        prefix = key.removesuffix(".weight")
        return {
            f"{prefix}.parametrizations.weight.original0": torch.ones(t.shape[0], 1, 1),
            f"{prefix}.parametrizations.weight.original1": t,
        }
    return {key: t}


def _codec_extras(cfg: CodecConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Unused tensors the published codec carries (the loader must skip them)."""
    extras = {
        "flow_matching.zero_cond_embedding1": ((cfg.dim,), torch.float32),
        "flow_matching.vq_embed.project_in.weight": ((cfg.codebook_dim, cfg.dim), torch.float32),
        "flow_matching.vq_embed.project_in.bias": ((cfg.codebook_dim,), torch.float32),
    }
    for k in range(cfg.num_quantizers):
        p = f"flow_matching.vq_embed.layers.{k}._codebook"
        extras[f"{p}.initted"] = ((), torch.bool)
        extras[f"{p}.cluster_size"] = ((1, cfg.codebook_size), torch.float32)
        extras[f"{p}.embed_avg"] = ((1, cfg.codebook_size, cfg.codebook_dim), torch.float32)
    return extras


def write_model(
    out: Path,
    module: torch.nn.Module,
    config: dict,
    *,
    dtype: torch.dtype,
    shard_bytes: int,
    seed: int,
    extras: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    edit: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Random weights for every tensor of `module` (built on meta), each through `edit` (key,
    tensor) if given, written shard by shard."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shapes = {k: (tuple(v.shape), dtype) for k, v in module.state_dict().items()}
    shapes.update(extras or {})
    # Plan shards from sizes first so the file names know the shard count.
    shards: list[list[str]] = [[]]
    size = 0
    for key, (shape, dt) in shapes.items():
        nbytes = torch.Size(shape).numel() * dt.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if len(shards) == 1:
            name = "model.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for key in keys:
            shape, dt = shapes[key]
            if dt == torch.bool:
                tensors[key] = torch.ones(shape, dtype=torch.bool)
            elif extras and key in extras:
                tensors[key] = torch.zeros(shape, dtype=dtype)  # EMA buffers, unused
            else:
                weight = random_tensor(key, shape, g)
                weight = edit(key, weight) if edit else weight
                for k, t in _official_tensors(key, weight).items():
                    tensors[k] = t.to(dtype).contiguous()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _no_eos_logits(eos: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """An `edit` that zeroes the output heads' weights of the audio ids >= `eos`: codebook 0's
    rows, the other codebooks' columns (their head is input-major)."""

    def edit(key: str, t: torch.Tensor) -> torch.Tensor:
        if key == "codebook0_head.weight":
            t[eos:] = 0
        elif key == "audio_head":
            t[..., eos:] = 0
        return t

    return edit


def make_checkpoint(
    out: Path,
    *,
    lm: str = "tiny",
    codec: str = "tiny",
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 4 << 30,
    seed: int = 0,
    never_eos: bool = False,
) -> Path:
    """Write a complete random checkpoint folder and return its path (`never_eos`: the module
    docstring)."""
    out = Path(out)
    dtype_name = str(dtype).removeprefix("torch.")
    lm_json = {
        "architectures": ["HeartMuLa"],
        "model_type": "heartmula",
        "audio_num_codebooks": 8,
        "muq_dim": 512,
        "dtype": dtype_name,
        **LM_PRESETS[lm],
    }
    lm_cfg = LMConfig.from_dict(lm_json)
    codec_cfg = CODEC_PRESETS[codec]
    if lm_cfg.audio_vocab_size != codec_cfg.codebook_size + 5:
        raise SystemExit(
            f"--lm {lm} (audio vocab {lm_cfg.audio_vocab_size}) does not fit "
            f"--codec {codec} (codebook {codec_cfg.codebook_size})"
        )
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(lm_cfg.text_vocab_size).save(str(out / "tokenizer.json"))
    gen = asdict(synthetic_gen_config(codec_cfg))
    (out / "gen_config.json").write_text(json.dumps(gen, indent=4) + "\n")
    edit = _no_eos_logits(gen["audio_eos_id"]) if never_eos else None

    with torch.device("meta"):
        lm_module = HeartMuLa(lm_cfg)
        codec_module = HeartCodec(codec_cfg)
    write_model(
        out / LM_DIR, lm_module, lm_json, dtype=dtype, shard_bytes=shard_bytes, seed=seed, edit=edit
    )
    codec_json = {
        "architectures": ["HeartCodec"],
        "model_type": "heartcodec",
        "dtype": dtype_name,
        **{
            k: v
            for k, v in asdict(codec_cfg).items()
            if k not in ("mlp_hidden", "mlp_hidden_2", "decoder_channels")
        },
    }
    write_model(
        out / CODEC_DIR,
        codec_module,
        codec_json,
        dtype=dtype,
        shard_bytes=shard_bytes,
        seed=seed + 1,
        extras=_codec_extras(codec_cfg),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write (created)")
    p.add_argument("--lm", choices=sorted(LM_PRESETS), default="tiny")
    p.add_argument("--codec", choices=sorted(CODEC_PRESETS), default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--shard-gb", type=float, default=4.0, help="largest shard, GB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--never-eos", action="store_true", help="songs never end at EOS (top-k never draws it)"
    )
    a = p.parse_args(argv)
    make_checkpoint(
        a.out,
        lm=a.lm,
        codec=a.codec,
        dtype=getattr(torch, a.dtype),
        shard_bytes=int(a.shard_gb * 1e9),
        seed=a.seed,
        never_eos=a.never_eos,
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
