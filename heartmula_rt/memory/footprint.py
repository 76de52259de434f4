"""The bytes of the LM and the codec, worked out from their configs: what `--vram` plans from.

No torch and no trace, so a plan is arithmetic (milliseconds). Weights, KV caches and the DiT's
blocks are exact: every parameter and buffer the modules hold, at the planned dtype and
quantization. Activations are upper bounds of the eager plain path, the largest tensors that can
be alive at once in its widest step, counted as the CPU's math attention makes them (float32
scores and float32 copies of low-precision queries, keys and values); the GPU's fused kernels
stay below them. `sizing.py` counts the same quantities on the meta device, and the tests hold
these figures to it: weights equal, activations at or above the trace and close to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from heartmula_rt.config import (
    DILATIONS,
    IN_KERNEL_SIZE,
    INT4_GROUP,
    KERNEL_SIZE,
    LATENTS_PER_CODE,
    NF4_BLOCK,
    OFFLOAD_SLOTS,
    PROMPT_TOKENS,
    TIMESTEP_DIM,
    WINDOW,
    CodecConfig,
    LlamaFlavor,
    LMConfig,
)

# Bytes per element of the dtypes a plan names.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
F32 = 4
LATENT_FRAMES = LATENTS_PER_CODE * WINDOW  # one codec window


@dataclass(frozen=True)
class LMSizes:
    """Bytes of one LM layout."""

    weights: int  # everything, text embeddings included
    text_embeddings: int
    backbone_layer: int  # one backbone layer (all are identical)
    num_backbone_layers: int
    kv_cache: int  # the static engine's caches for the planned songs, every row
    workspace: int  # the activation peak of one song's prompt step
    frame_workspace: int  # a decode frame's of every row at a full cache: the graph pool's


@dataclass(frozen=True)
class CodecSizes:
    """Bytes of the codec at one precision."""

    weights: int
    dit_blocks: int  # both stages' transformer blocks: what offload streams
    dit_ring: int  # OFFLOAD_SLOTS blocks of each stage
    dit_activations: int  # one guided ODE step over a window
    scalar_activations: int  # the scalar decoder over a window


# -- LM weights -----------------------------------------------------------------------------


def linear_bytes(out: int, inp: int, nbytes: int, quant: str) -> int:
    """A bias-free [out, inp] linear weight as stored: plain, or in a quant/formats.py format."""
    if quant == "none":
        return out * inp * nbytes
    if quant == "int8":  # int8 codes, a float32 scale per output
        return out * inp + out * F32
    # 4 bits a weight, bfloat16 block parameters (nf4: absmax; int4: scale and zero)
    block, params = (NF4_BLOCK, 1) if quant == "nf4" else (INT4_GROUP, 2)
    return out * inp // 2 + params * out * (inp // math.gcd(inp, block)) * 2


def _layer_linears(f: LlamaFlavor) -> list[tuple[int, int]]:
    """One transformer layer's linears as (out, in), as a pipeline loads them: q/k/v merged into
    one, and w1/w3 (`lm.merge_projections`; their bytes are the parts' bytes, their expanded
    weight, on the plain path of a quantized one, the parts' together)."""
    e, q, kv, hidden = (
        f.embed_dim,
        f.num_heads * f.head_dim,
        f.num_kv_heads * f.head_dim,
        f.intermediate_dim,
    )
    return [(q + 2 * kv, e), (e, q), (2 * hidden, e), (e, hidden)]


def layer_bytes(f: LlamaFlavor, nbytes: int, quant: str) -> int:
    """One transformer layer: two norm scales and its linears."""
    return 2 * f.embed_dim * nbytes + sum(
        linear_bytes(o, i, nbytes, quant) for o, i in _layer_linears(f)
    )


def _head_linears(config: LMConfig) -> list[tuple[int, int]]:
    """The quantized linears outside the layers: projection, codebook 0's head, the audio heads."""
    bb, dec, vocab = config.backbone.embed_dim, config.decoder.embed_dim, config.audio_vocab_size
    return [(dec, bb), (vocab, bb)] + [(vocab, dec)] * (config.audio_num_codebooks - 1)


def _lm_weights(config: LMConfig, nbytes: int, quant: str) -> tuple[int, int]:
    """(all weights, text embeddings)."""
    e = config.backbone.embed_dim
    text = config.text_vocab_size * e * nbytes
    embeddings = (config.audio_vocab_size * config.audio_num_codebooks + 1) * e * nbytes
    muq = (config.muq_dim + 1) * e * nbytes
    stacks = sum(
        f.num_layers * layer_bytes(f, nbytes, quant) + f.embed_dim * nbytes
        for f in (config.backbone, config.decoder)
    )
    heads = sum(linear_bytes(o, i, nbytes, quant) for o, i in _head_linears(config))
    return text + embeddings + muq + stacks + heads, text


def kv_cache_bytes(config: LMConfig, nbytes: int, rows: int, positions: int) -> int:
    """Keys and values of every layer: the backbone over `positions`, the decoder over a frame."""
    return sum(
        f.num_layers * 2 * rows * f.num_kv_heads * length * f.head_dim * nbytes
        for f, length in (
            (config.backbone, positions),
            (config.decoder, config.audio_num_codebooks),
        )
    )


# -- LM activations -------------------------------------------------------------------------


def _dequantized(out: int, inp: int, nbytes: int, quant: str) -> int:
    """The plain path's temporaries while one quantized weight is expanded for its matmul."""
    if quant == "none":
        return 0
    if quant == "int8":  # the int8 weight in the activation dtype
        return out * inp * nbytes
    # unpacked uint8 codes, then int64 indices / float32 values, then the float32 weight
    return out * inp * (1 + 8 + F32)


def _stack_peak(f: LlamaFlavor, rows: int, tokens: int, keys: int, nbytes: int, quant: str) -> int:
    """One stack's forward over `tokens` new positions reading `keys` cached ones."""
    e, heads, kv, d = f.embed_dim, f.num_heads, f.num_kv_heads, f.head_dim
    hidden = rows * tokens * e * nbytes
    # A prompt's causal mask is [tokens, keys]; a decode frame's masks each row at its own
    # position (the graph engine, a batch of songs): [rows, keys].
    mask = (tokens if tokens > 1 else rows) * keys * nbytes
    kept = 2 * hidden + mask  # through the stack: input, output, mask
    q = rows * tokens * heads * d
    # The math path computes in float32: low-precision q, k and v are copied to it first.
    copies = 0 if nbytes == F32 else 1
    if tokens == 1:
        # Grouped decode: the scaled transposed keys (and the copies); scores and softmax.
        attention = (1 + 2 * copies) * rows * kv * keys * d * F32 + 2 * rows * heads * keys * F32
    else:
        # Scores and their softmax; keys and values repeated per head (and the copies).
        attention = (
            2 * rows * heads * tokens * keys * F32
            + 2 * rows * (copies * kv + heads) * keys * d * F32
        )
    attention += (1 + copies) * q * F32 + q * nbytes  # the scaled (copied) and rotated queries
    attention += 3 * hidden  # the normed input, the rotated queries, the residual sum
    mlp = 3 * rows * tokens * f.intermediate_dim * nbytes + 2 * hidden
    widest = max(_dequantized(o, i, nbytes, quant) for o, i in _layer_linears(f))
    # A quantized weight is expanded while at most the MLP's activations are alive.
    return kept + max(attention, mlp + widest)


def _step_peak(config: LMConfig, rows: int, tokens: int, keys: int, nbytes: int, quant: str) -> int:
    """A backbone step, then the first decoder step (two positions), then their heads."""
    embedded = 2 * rows * tokens * config.backbone.embed_dim * nbytes + tokens * 8  # + ids
    # Beside the decoder and the heads: codebook 0's logits, the decoder's input and its
    # projection, and the logits being made.
    logits = rows * config.audio_vocab_size * nbytes
    decoder_input = 3 * rows * 2 * config.backbone.embed_dim * nbytes
    head = max(_dequantized(o, i, nbytes, quant) for o, i in _head_linears(config))
    return embedded + max(
        _stack_peak(config.backbone, rows, tokens, keys, nbytes, quant),
        logits + decoder_input + _stack_peak(config.decoder, rows, 2, 2, nbytes, quant),
        2 * logits + decoder_input + head,
    )


def _rope_tables(config: LMConfig) -> int:
    return sum(
        2 * f.max_seq_len * (f.head_dim // 2) * F32 for f in (config.backbone, config.decoder)
    )


def lm_sizes(
    config: LMConfig, dtype: str, quant: str, rows: int, positions: int, songs: int = 1
) -> LMSizes:
    """The bytes of the LM at `dtype` and `quant` for `songs` songs at once of `rows` cache
    rows each (1, or 2 with guidance), every row `positions` long. A prompt step runs over one
    song's rows; a decode frame over every row, reading the whole cache."""
    nbytes = DTYPE_BYTES[dtype]
    weights, text = _lm_weights(config, nbytes, quant)
    prompt = min(PROMPT_TOKENS, positions)
    return LMSizes(
        weights=weights,
        text_embeddings=text,
        backbone_layer=layer_bytes(config.backbone, nbytes, quant),
        num_backbone_layers=config.backbone.num_layers,
        kv_cache=kv_cache_bytes(config, nbytes, songs * rows, positions),
        # The first step also builds the RoPE tables, float32 cos and sin of every position.
        workspace=_step_peak(config, rows, prompt, prompt, nbytes, quant) + _rope_tables(config),
        frame_workspace=_step_peak(config, songs * rows, 1, positions, nbytes, quant),
    )


# -- codec ----------------------------------------------------------------------------------


def _dit_block_bytes(width: int, hidden: int, nbytes: int) -> int:
    """A DiT block: its modulation table, two norms, four attention and three MLP matrices."""
    return (6 * width + 2 * width + 4 * width * width + 3 * width * hidden) * nbytes


def _project_bytes(inp: int, out: int, nbytes: int) -> int:
    """ProjectLayer: a width-3 conv and a linear, both with biases."""
    return (out * inp * 3 + out + out * out + out) * nbytes


def _adaln_bytes(width: int, nbytes: int) -> int:
    return (
        TIMESTEP_DIM * width + width + width * width + width + 6 * width * width + 6 * width
    ) * nbytes


def _scalar_bytes(c: CodecConfig) -> int:
    """The scalar decoder, float32: input conv, up-blocks, post-processor, output conv."""
    ch = c.decoder_channels
    count = ch[0] * c.latent_hidden_dim * IN_KERNEL_SIZE + ch[0]
    for cin, cout, stride in zip(ch, ch[1:], c.upsample_factors, strict=False):
        count += cin * cout * 2 * stride + cout
        unit = cout * cout * KERNEL_SIZE + cout + 1 + cout * cout + cout + 1
        count += len(DILATIONS) * unit
    count += ch[-1] * ch[-1] * KERNEL_SIZE + ch[-1] + 1  # post-processor
    count += ch[-1] * KERNEL_SIZE + 1
    return count * F32


def _dit_attention(rows: int, frames: int, width: int, heads: int, nbytes: int) -> int:
    """A DiT block's attention: float32 scores and softmax, float32 copies of q, k and v."""
    tokens = rows * frames * width
    return 2 * rows * heads * frames * frames * F32 + 6 * tokens * F32 + 2 * tokens * nbytes


def _dit_peak(c: CodecConfig, nbytes: int) -> int:
    """One guided Euler step over a window: conditional and unconditional rows together."""
    rows, n = 2, LATENT_FRAMES
    d, d2 = c.inner_dim, 2 * c.inner_dim
    # The ODE state and its inputs ([x | ic], repeated, with mu): kept through the step.
    kept = (3 * n * c.out_channels + rows * n * (2 * c.in_channels + 2 * c.dim)) * F32
    stages = []
    for width, hidden in ((d, c.mlp_hidden), (d2, c.mlp_hidden_2)):
        stream = 4 * rows * n * width * F32  # residual stream, normed, modulated, stage input
        attention = _dit_attention(rows, n, width, c.num_attention_heads, nbytes)
        mlp = 3 * rows * n * hidden * nbytes + rows * n * hidden * F32
        stages.append(stream + max(attention, mlp))
    return kept + max(stages)


def _scalar_peak(c: CodecConfig) -> int:
    """The scalar decoder over a window, every stream at once, float32."""
    streams = c.out_channels // c.latent_hidden_dim
    length, ch = LATENT_FRAMES, c.decoder_channels
    latents = 2 * streams * c.latent_hidden_dim * length * F32  # the input and it rounded
    peak = streams * 2 * ch[0] * length * F32
    for cin, cout, stride in zip(ch, ch[1:], c.upsample_factors, strict=False):
        before, length = cin * length, length * stride
        # The block's input and its transposed conv, then a residual unit: its input, the
        # padded copy, the conv and its activation.
        up = before + cout * (length + stride)
        unit = 4 * cout * length + cout * max(DILATIONS) * (KERNEL_SIZE - 1)
        peak = max(peak, streams * max(up, unit) * F32)
    # The post-processor: the repeated samples (made by a clone), padded, the conv, PReLU.
    repeated = ch[-1] * length * c.num_samples
    post = length * ch[-1] + 3 * repeated + ch[-1] * (KERNEL_SIZE - 1)
    return latents + max(peak, streams * post * F32)


def codec_sizes(config: CodecConfig, dtype: str) -> CodecSizes:
    """The bytes of the codec with its DiT at `dtype` (the float32 parts stay float32)."""
    nbytes = DTYPE_BYTES[dtype]
    c, d = config, config.inner_dim
    stages = [
        (c.num_layers, _dit_block_bytes(d, c.mlp_hidden, nbytes)),
        (c.num_layers_2, _dit_block_bytes(2 * d, c.mlp_hidden_2, nbytes)),
    ]
    blocks = sum(n * b for n, b in stages)
    dit = (
        _project_bytes(c.in_channels, d, nbytes)
        + _adaln_bytes(d, nbytes)
        + 2 * d * nbytes
        + _project_bytes(c.in_channels + d, 2 * d, nbytes)
        + _adaln_bytes(2 * d, nbytes)
        + 4 * d * nbytes
    )
    float32 = (
        c.num_quantizers * c.codebook_size * c.codebook_dim
        + c.dim * c.codebook_dim
        + c.dim
        + c.dim * c.dim
        + c.dim
    ) * F32 + _project_bytes(2 * d, c.out_channels, F32)
    return CodecSizes(
        weights=blocks + dit + float32 + _scalar_bytes(c),
        dit_blocks=blocks,
        dit_ring=sum(min(OFFLOAD_SLOTS, n) * b for n, b in stages),
        dit_activations=_dit_peak(c, nbytes),
        scalar_activations=_scalar_peak(c),
    )


# -- the reference embedder (MuQ-MuLan, model/reference.py) ---------------------------------

# OpenMuQ/MuQ-MuLan-large in float32 as published: its checkpoint holds every tower (0.7 B
# parameters); once loaded, the text tower (XLM-R base and its transformer, about 1.36 GB) is
# dropped and the audio side (MuQ-large, 0.3 B, and its projections) stays.
MULAN_BYTES = 2_650_000_000
MULAN_AUDIO_BYTES = 1_300_000_000
# MuQ's front end on one 10 s clip at 24 kHz: a 128-band mel spectrogram every 240 samples,
# then two residual conv blocks of 512 channels, the first at half the bands and frames; the
# conformer after them sees 250 positions, far less.
MULAN_CLIP_SAMPLES = 240_000
MULAN_HOP, MULAN_MELS, MULAN_CONV = 240, 128, 512
MULAN_CONV_ALIVE = 6  # a block's conv, norm and residual outputs alive at once, at most


@dataclass(frozen=True)
class EmbedderSizes:
    """Bytes of reference-audio embedding."""

    load_peak: int  # host memory while loading: the model built, and its checkpoint read
    weights: int  # what stays on the embedder's device
    workspace: int  # one 10 s clip's activations

    @property
    def running(self) -> int:
        return self.weights + self.workspace


def embedder_sizes() -> EmbedderSizes:
    """MuQ-MuLan's bytes, float32 (the model card warns half precision gives NaN). Loading
    builds every tower and then reads the pickled checkpoint whole beside it (not mapped)."""
    frames = MULAN_CLIP_SAMPLES // MULAN_HOP + 1
    conv = MULAN_CONV * (MULAN_MELS // 2) * (frames // 2 + 1) * F32
    return EmbedderSizes(
        load_peak=2 * MULAN_BYTES,
        weights=MULAN_AUDIO_BYTES,
        workspace=MULAN_CONV_ALIVE * conv + MULAN_CLIP_SAMPLES * F32,
    )
