"""Random-weight models of any preset size, for tests and benchmarks without a download.

One rule set (`random_tensor`) makes the weights whether they are written to a checkpoint
(tools/make_checkpoint.py) or made straight on the device (`synthetic_models`, which never puts a
full-size model in host memory), so a random model's activations stay bounded either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor, nn

from heartmula_rt.config import (
    CODEC_FOR_LM,
    CODEC_PRESETS,
    LM_PRESETS,
    CodecConfig,
    GenConfig,
    LMConfig,
)
from heartmula_rt.errors import UserError
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import Prompt

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

_SAMPLE_TEXT = """piano happy wedding rock energetic metal pop ballad electronic jazz
[intro] [verse] [chorus] [bridge] [outro] the sun creeps in across the floor
i hear the traffic outside the door every day the light returns la la la
hello world we sing along through the night and into the morning light"""


def random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Weights that keep activations of a random model bounded: float32 on `g`'s device."""
    kw = {"generator": g, "device": g.device}
    if key.endswith((".scale", "norm.weight")):
        return 1 + 0.02 * torch.randn(shape, **kw)
    if key.endswith(".bias"):
        return 0.02 * torch.randn(shape, **kw)
    if "activation" in key:  # PReLU slope
        return torch.full(shape, 0.25, device=g.device)
    if "scale_shift_table" in key:
        return 0.1 * torch.randn(shape, **kw)
    if len(shape) == 1:
        return torch.randn(shape, **kw)
    fan_in = shape[-2] if key == "audio_head" else shape[1] * (shape[2] if len(shape) == 3 else 1)
    if key.endswith(("embeddings.weight", "embedding.weight", "._codebook.embed")):
        fan_in = 1  # lookup tables, not matmuls
    return torch.randn(shape, **kw) * fan_in**-0.5


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int, draw_on: torch.device | None = None) -> None:
    """Overwrite every parameter and buffer in place, in state-dict order, one tensor at a time
    (a CPU module gets exactly the weights make_checkpoint writes for the same seed). The
    numbers are drawn on `draw_on` (default: the module's device), one tensor there at a time."""
    g = torch.Generator(draw_on or next(module.parameters()).device).manual_seed(seed)
    for key, t in module.state_dict(keep_vars=True).items():
        t.copy_(random_tensor(key, tuple(t.shape), g))


@dataclass
class Models:
    """A loaded LM and codec with what goes with them: what a pipeline is built from."""

    lm: HeartMuLa
    lm_config: LMConfig
    codec: HeartCodec
    codec_config: CodecConfig
    gen_config: GenConfig
    tokenizer: Tokenizer


def synthetic_models(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    codec_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    draw_on: torch.device | None = None,
) -> Models:
    """A random LM of `preset` (LM_PRESETS) and the codec that fits it, made on `device`, their
    random numbers drawn on `draw_on` (default `device`: a GPU draws the same numbers for a
    model in host memory, fast, holding one tensor at a time)."""
    if preset not in LM_PRESETS:
        raise UserError(f"unknown model preset {preset!r}; use one of {', '.join(LM_PRESETS)}")
    lm_config = LMConfig.from_dict(LM_PRESETS[preset])
    codec_config = CODEC_PRESETS[CODEC_FOR_LM[preset]]
    with torch.device("meta"):
        lm = HeartMuLa(lm_config).to(dtype)
        codec = HeartCodec(codec_config).to(codec_dtype)
    for part in codec.float32_parts():  # as checkpoint.load_codec
        part.float()
    # Seeds as make_checkpoint's: the LM gets `seed`, the codec `seed + 1`.
    for i, module in enumerate((lm, codec)):
        module.to_empty(device=device).requires_grad_(False).eval()
        fill_random_(module, seed + i, draw_on)
    gen_config = synthetic_gen_config(codec_config)
    tokenizer = make_tokenizer(lm_config.text_vocab_size)
    return Models(lm, lm_config, codec, codec_config, gen_config, tokenizer)


def make_tokenizer(vocab_size: int) -> Tokenizer:
    """A small byte-level BPE, BOS 0 and EOS 1, whose post-processor adds BOS like Llama-3's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 512),
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_SAMPLE_TEXT.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, 0)]
    )
    return tok


def synthetic_gen_config(codec_config: CodecConfig) -> GenConfig:
    """Special ids of a random checkpoint: BOS 0 and EOS 1 (make_checkpoint's tokenizer), audio
    EOS just past the codec's codebook as in the official files."""
    return GenConfig(text_bos_id=0, text_eos_id=1, audio_eos_id=codec_config.codebook_size + 1)


def synthetic_prompt(length: int, text_vocab_size: int, seed: int = 0) -> Prompt:
    """Random text ids of a real prompt's length, the SLOT where a short tags part ends."""
    if length < 1:
        raise UserError(f"the prompt length must be at least 1, not {length}")
    ids = torch.randint(text_vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    return Prompt(ids=ids, slot_index=min(10, length - 1))
