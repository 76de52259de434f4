"""Configuration: LM flavors, the LM and codec configs, gen_config.json, and the names of every
choice a user makes (engines, dtypes, codec precisions, quantization modes) with their defaults.

Every size is read from the checkpoint's config.json (and, for the codec, from tensor shapes);
nothing here assumes the 3B model. Nothing here imports torch: the command line parses, and
`heartmula-rt plan` plans, without loading it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from heartmula_rt.errors import UserError

# The LM's decode engines (engine.py): the plain loop, one CUDA graph per frame, compiled first.
ENGINES = ("plain", "graph", "compile")
# The static engine's cache capacity grows in these steps, so songs of similar length share one.
CAPACITY_STEP = 1024
# LM weight dtypes, by their torch names.
LM_DTYPES = ("float32", "bfloat16", "float16")
# Codec precisions (codec/__init__.py): name → (dtype of the DiT's blocks, of everything else).
CODEC_PRECISIONS = {
    "mixed": ("bfloat16", "float32"),
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
}
# LM weight-only quantization (quant/).
QUANT_MODES = ("none", "int8", "nf4", "int4")
# Prompt tokens of a benchmark on synthetic weights: a typical song's tags and lyrics.
DEFAULT_PROMPT_LEN = 256
# The prompt a memory plan makes room for: tags plus a long lyric sheet tokenize to well under it.
PROMPT_TOKENS = 1024
# A short prompt (a few tags, a line of lyrics): what the longest song a model makes is reckoned
# after, when the real prompt is not known (planner.context_frames).
SHORT_PROMPT_TOKENS = 16
# Songs the LM makes at once when a batch does not say (a `vram` plan may hold fewer).
DEFAULT_SONGS_AT_ONCE = 8
# A song continued past the backbone's context goes on from its last this many frames (164 s),
# fed again after its prompt (edit.py; `extend --context-seconds`).
DEFAULT_CONTEXT_FRAMES = 2048
# `heartmula-rt serve`: the environment variable that holds its API key.
API_KEY_ENV = "HEARTMULA_RT_API_KEY"
# Ring slots of every offloaded layer stack: one layer computing while the next one copies in.
OFFLOAD_SLOTS = 2
# The largest context a config.json may give (16x the 3B's 8192: 2.9 hours of frames). The
# model's RoPE tables and a server's cache are sized by it when it loads, so a typo such as
# 100000000000 would ask for terabytes; refused when the config is read.
MAX_SEQ_LEN = 131072

# Structure no config.json states, shared by the modules and footprint.py (which sizes them).
NF4_BLOCK = 64  # weights per NF4 absmax (quant/formats.py)
INT4_GROUP = 128  # weights per int4 scale and zero
TIMESTEP_DIM = 512  # sinusoidal timestep features of the DiT (codec/dit.py)
DILATIONS = (1, 3, 5, 7, 9)  # the five residual units of every up-block (codec/scalar.py)
KERNEL_SIZE = 7  # residual, post-processor and output convs
IN_KERNEL_SIZE = 5  # decoder.0, centred (padding 2)
WINDOW = 372  # codes per codec window, 29.76 s (codec/detokenize.py)
LATENTS_PER_CODE = 2  # 12.5 Hz codes → 25 Hz latents


def _device_type(device: object) -> str:
    """ "cuda" or "cpu" of a torch.device or a device type's name."""
    return str(getattr(device, "type", device)).split(":")[0]


def default_dtype(device: object) -> str:
    """The LM's default weight dtype: bfloat16 on a GPU, float32 on the CPU."""
    return "bfloat16" if _device_type(device) == "cuda" else "float32"


def default_codec_dtype(device: object) -> str:
    """`mixed` on a GPU (bfloat16 tensor cores), `float32` on the CPU (no fast bfloat16)."""
    return "mixed" if _device_type(device) == "cuda" else "float32"


def default_model_path() -> Path:
    """Where `heartmula-rt download` puts the weights: $HEARTMULA_RT_HOME, else the user cache."""
    if "HEARTMULA_RT_HOME" in os.environ:
        return Path(os.environ["HEARTMULA_RT_HOME"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return cache / "heartmula-rt" / "HeartMuLa"


def default_bench_dir() -> Path:
    """Where `heartmula-rt bench` writes its results unless told (--out-dir): the user's cache,
    never a folder made in whatever folder it runs from."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return cache / "heartmula-rt" / "bench-results"


@dataclass(frozen=True)
class LlamaFlavor:
    """One torchtune-style Llama-3.2 decoder (SPEC §1 flavor table)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500000.0
    scale_factor: float = 32.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


FLAVORS: dict[str, LlamaFlavor] = {
    "llama-3B": LlamaFlavor(28, 24, 8, 3072, 8192, 8192),
    "llama-300M": LlamaFlavor(3, 8, 4, 3072, 8192, 2048),
    "llama-7B": LlamaFlavor(32, 32, 8, 4096, 14336, 8192),
    "llama-400M": LlamaFlavor(4, 8, 4, 3072, 8192, 2048),
}


def _whole_number(where: str, name: str, value: object, least: int, most: int | None = None) -> int:
    """A config's whole number in [least, most], else one sentence naming it and its range."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or value < least or (most is not None and value > most):
        span = f"from {least} to {most}" if most is not None else f"of at least {least}"
        raise UserError(f"{where} {name} must be a whole number {span}, not {value!r}")
    return value


def resolve_flavor(value: str | Mapping[str, Any] | LlamaFlavor) -> LlamaFlavor:
    """A flavor from its known name, an object with the table's fields, or a LlamaFlavor."""
    if isinstance(value, LlamaFlavor):
        flavor = value
    elif isinstance(value, str):
        if value not in FLAVORS:
            raise UserError(f"unknown model flavor {value!r}; known flavors: {', '.join(FLAVORS)}")
        flavor = FLAVORS[value]
    elif isinstance(value, Mapping):
        names = {f.name for f in fields(LlamaFlavor)}
        required = {f.name for f in fields(LlamaFlavor) if f.default is MISSING}
        missing = sorted(n for n in required if n not in value)
        if missing:
            raise UserError(f"model flavor object lacks {', '.join(missing)}")
        whole = (f.name for f in fields(LlamaFlavor) if f.type in ("int", int))
        for name in whole:
            if name in value:
                most = MAX_SEQ_LEN if name == "max_seq_len" else None
                _whole_number("model flavor's", name, value[name], 1, most)
        flavor = LlamaFlavor(**{k: v for k, v in value.items() if k in names})
    else:
        raise UserError(f"model flavor must be a name or an object, not {type(value).__name__}")
    if flavor.embed_dim % flavor.num_heads or flavor.num_heads % flavor.num_kv_heads:
        raise UserError(
            f"model flavor has embed_dim {flavor.embed_dim}, num_heads {flavor.num_heads}, "
            f"num_kv_heads {flavor.num_kv_heads}: heads must divide evenly"
        )
    return flavor


@dataclass(frozen=True)
class LMConfig:
    """HeartMuLa config.json."""

    backbone: LlamaFlavor
    decoder: LlamaFlavor
    text_vocab_size: int = 128256
    audio_vocab_size: int = 8197
    audio_num_codebooks: int = 8
    muq_dim: int = 512

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LMConfig:
        for key in ("backbone_flavor", "decoder_flavor"):
            if key not in d:
                raise UserError(f"HeartMuLa config.json lacks {key!r}")
        kwargs = {
            f.name: _whole_number("HeartMuLa config.json's", f.name, d[f.name], 1)
            for f in fields(cls)
            if f.name not in ("backbone", "decoder") and f.name in d
        }
        return cls(
            backbone=resolve_flavor(d["backbone_flavor"]),
            decoder=resolve_flavor(d["decoder_flavor"]),
            **kwargs,
        )


@dataclass(frozen=True)
class GenConfig:
    """gen_config.json: special ids of the text and audio vocabularies."""

    text_bos_id: int = 128000
    text_eos_id: int = 128001
    audio_eos_id: int = 8193
    empty_id: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], lm: LMConfig | None = None) -> GenConfig:
        """gen_config.json's ids; with `lm`, each checked against its vocabulary (a wrong id
        would end every song at its first frame, or never)."""
        ranges = cls.ranges(lm)
        return cls(
            **{
                f.name: _whole_number("gen_config.json's", f.name, d[f.name], *ranges[f.name])
                for f in fields(cls)
                if f.name in d
            }
        )

    @staticmethod
    def ranges(lm: LMConfig | None = None) -> dict[str, tuple[int, int | None]]:
        """Each id's (least, most): the text ids inside the text vocabulary, the audio EOS id
        above 0 (a frame of any token >= it ends the song) and, like the empty (padding) id,
        inside the audio vocabulary; without `lm`, only their least."""
        text = None if lm is None else lm.text_vocab_size - 1
        audio = None if lm is None else lm.audio_vocab_size - 1
        return {
            "text_bos_id": (0, text),
            "text_eos_id": (0, text),
            "audio_eos_id": (1, audio),
            "empty_id": (0, audio),
        }

    def check(self, lm: LMConfig) -> None:
        """Every id inside the vocabulary it indexes (`ranges`), else one sentence."""
        for name, (least, most) in self.ranges(lm).items():
            _whole_number("gen_config.json's", name, getattr(self, name), least, most)


@dataclass(frozen=True)
class CodecConfig:
    """HeartCodec config.json plus the sizes the reference reads from tensor shapes.

    The defaults are the published HeartCodec-oss sizes.
    """

    codebook_size: int = 8192
    codebook_dim: int = 32
    num_quantizers: int = 8
    dim: int = 512  # VQ output / conditioning width
    in_channels: int = 1024  # estimator input: x | ic | mu
    out_channels: int = 256  # latent channels
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    num_layers: int = 24
    num_layers_2: int = 6
    latent_hidden_dim: int = 128  # channels per mono stream fed to the scalar decoder
    sample_rate: int = 48000
    num_samples: int = 2  # the scalar decoder's repeat_interleave in its post-processor
    upsample_factors: tuple[int, ...] = (5, 4, 4, 4, 3)
    # From tensors: MLP hidden sizes of both DiT stages, scalar decoder channels per stage.
    mlp_hidden: int = 4096
    mlp_hidden_2: int = 8192
    decoder_channels: tuple[int, ...] = field(default=(2048, 1024, 512, 256, 128, 64))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **from_tensors: Any) -> CodecConfig:
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        kwargs.update(from_tensors)
        for key in ("upsample_factors", "decoder_channels"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)


# Sizes of random-weight models for tests and benchmarks (synthetic.py, tools/make_checkpoint.py).
LM_PRESETS: dict[str, dict] = {
    # The sizes of ../shared/fixtures/tiny-public.
    "tiny": {
        "backbone_flavor": {
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "embed_dim": 64,
            "intermediate_dim": 160,
            "max_seq_len": 1024,
        },
        "decoder_flavor": {
            "num_layers": 2,
            "num_heads": 2,
            "num_kv_heads": 1,
            "embed_dim": 64,
            "intermediate_dim": 128,
            "max_seq_len": 64,
        },
        "text_vocab_size": 512,
        "audio_vocab_size": 1029,
    },
    # Big enough for quantization error to be meaningful, small enough for CPU tests.
    "mid": {
        "backbone_flavor": {
            "num_layers": 8,
            "num_heads": 8,
            "num_kv_heads": 4,
            "embed_dim": 512,
            "intermediate_dim": 1536,
            "max_seq_len": 2048,
        },
        "decoder_flavor": {
            "num_layers": 2,
            "num_heads": 8,
            "num_kv_heads": 4,
            "embed_dim": 512,
            "intermediate_dim": 1536,
            "max_seq_len": 64,
        },
        "text_vocab_size": 512,
        "audio_vocab_size": 1029,
    },
    "3B": {
        "backbone_flavor": "llama-3B",
        "decoder_flavor": "llama-300M",
        "text_vocab_size": 128256,
        "audio_vocab_size": 8197,
    },
    "7B": {
        "backbone_flavor": "llama-7B",
        "decoder_flavor": "llama-400M",
        "text_vocab_size": 128256,
        "audio_vocab_size": 8197,
    },
}
# The codec whose codebook fits each LM preset's audio vocabulary (codebook + 5 ids).
CODEC_FOR_LM = {"tiny": "tiny", "mid": "tiny", "3B": "full", "7B": "full"}
CODEC_PRESETS: dict[str, CodecConfig] = {
    "tiny": CodecConfig(
        codebook_size=1024,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_layers_2=1,
        mlp_hidden=256,
        mlp_hidden_2=256,
        decoder_channels=(128, 64, 32, 16, 8, 4),
    ),
    "full": CodecConfig(),
}
