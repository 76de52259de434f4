"""The codec's precision modes, the chunked scalar decoder and the estimator's fast path, each
against the plain float32 path on the tiny fixture."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heartmula_rt.config import CODEC_PRESETS
from heartmula_rt.errors import UserError
from heartmula_rt.model.checkpoint import load_codec
from heartmula_rt.model.codec import CODEC_DTYPES, HeartCodec
from heartmula_rt.model.codec.graphed import GraphedEstimator
from heartmula_rt.model.codec.scalar import largest_activation_bytes
from heartmula_rt.model.folder import CODEC_DIR
from heartmula_rt.request import CodecParams


def snr_db(x: torch.Tensor, reference: torch.Tensor) -> float:
    return 10 * torch.log10(reference.pow(2).sum() / (x - reference).pow(2).sum()).item()


@pytest.fixture(scope="module")
def codes(fixtures_dir: Path) -> torch.Tensor:
    return load_file(fixtures_dir / "tiny-public/expected/codec_T150.safetensors")["codes"]


@pytest.fixture(scope="module")
def float32_codec(tiny_ckpt: Path) -> HeartCodec:
    return load_codec(tiny_ckpt / CODEC_DIR)[0]


def load(tiny_ckpt: Path, mode: str) -> HeartCodec:
    """As load_pipeline does: weights loaded at the DiT blocks' dtype, then set_precision."""
    codec, _ = load_codec(tiny_ckpt / CODEC_DIR, dtype=CODEC_DTYPES[mode][0])
    return codec.set_precision(mode)


def test_mixed_keeps_40_db(tiny_ckpt: Path, float32_codec: HeartCodec, codes) -> None:
    def decode(codec: HeartCodec) -> torch.Tensor:
        return codec.detokenize(codes, generator=torch.Generator().manual_seed(0))

    reference = decode(float32_codec)
    mixed, bf16 = load(tiny_ckpt, "mixed"), load(tiny_ckpt, "bfloat16")
    est = mixed.flow_matching.estimator
    assert est.transformer_blocks[0].mlp.up.weight.dtype == torch.bfloat16
    assert est.proj_out.ffn_2.weight.dtype == torch.float32
    assert mixed.scalar_model.decoder[0].weight.dtype == torch.float32
    assert bf16.scalar_model.decoder[0].weight.dtype == torch.bfloat16
    mixed_snr, bf16_snr = snr_db(decode(mixed), reference), snr_db(decode(bf16), reference)
    print(f"SNR vs float32: mixed {mixed_snr:.1f} dB, bfloat16 {bf16_snr:.1f} dB")
    assert mixed_snr >= 40
    assert mixed_snr > bf16_snr  # the float32 parts are what buys the margin


def test_unknown_codec_dtype(float32_codec: HeartCodec) -> None:
    with pytest.raises(UserError, match="codec dtype"):
        float32_codec.set_precision("float16")


def test_chunked_scalar_decoder_equals_unchunked(float32_codec: HeartCodec) -> None:
    scalar = float32_codec.scalar_model
    latents = torch.randn(2, 128, 150, generator=torch.Generator().manual_seed(1)) * 0.5
    with torch.inference_mode():
        whole = scalar(latents)
        for chunk in (37, 150):
            chunked = scalar.decode_chunked(latents, chunk)
            assert chunked.shape == whole.shape
            torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
        # The context matters: half of it changes the output.
        history, ahead = scalar.context()
        assert (history, ahead) == (44, 2)
        lo = 100 - history // 2
        short = scalar(latents[..., lo : 100 + 37 + ahead])[..., (100 - lo) * 1920 :]
        assert not torch.allclose(short[..., : 37 * 1920], whole[..., 100 * 1920 : 137 * 1920])


def test_chunking_bounds_the_largest_activation() -> None:
    full = CODEC_PRESETS["full"]
    # The post-processor's output: 2 streams × 64 channels × 744 · 1920 samples, float32.
    assert largest_activation_bytes(full, 744) == 2 * 64 * 744 * 1920 * 4
    assert largest_activation_bytes(full, 186 + 44 + 2) == 2 * 64 * 232 * 1920 * 4


def test_compiled_estimator_equals_plain(tiny_ckpt: Path, codes) -> None:
    codec = load_codec(tiny_ckpt / CODEC_DIR)[0]

    def first_window() -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return next(codec.window_latents(codes, CodecParams(num_steps=2), generator=g))

    plain = first_window()
    codec.use_fast_path("compile", compile_backend="aot_eager")
    fast = first_window()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="CUDA"):
        codec.use_fast_path("graph")


class Uncopyable:
    """Stands in for a captured torch.cuda.CUDAGraph, which refuses to be copied."""

    def __reduce_ex__(self, protocol: int):
        raise TypeError("cannot pickle 'CUDAGraph' object")


def test_a_codec_copies_with_its_fast_path_bound_to_the_copy(tiny_ckpt: Path) -> None:
    codec = load_codec(tiny_ckpt / CODEC_DIR)[0]
    fast = GraphedEstimator(codec.flow_matching.estimator, graphs=False)
    fast._captured[("as if captured",)] = Uncopyable()
    codec.flow_matching.fast_estimator = fast
    copied = copy.deepcopy(codec)  # what bench does to make the bfloat16 variants
    fast_copy = copied.flow_matching.fast_estimator
    assert fast_copy is not fast and not fast_copy._captured
    with torch.no_grad():
        for p in copied.flow_matching.estimator.proj_out.parameters():
            p.mul_(2)
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(2, 16, codec.config.in_channels, generator=g)
    t = torch.full((2,), 0.3)
    with torch.inference_mode():
        out = fast_copy(inp, t)
        assert torch.equal(out, copied.flow_matching.estimator(inp, t))
        assert not torch.allclose(out, codec.flow_matching.estimator(inp, t))


@pytest.mark.gpu
def test_a_codec_with_a_captured_graph_copies_on_the_gpu(tiny_ckpt: Path, codes) -> None:
    codec = load_codec(tiny_ckpt / CODEC_DIR, device=torch.device("cuda"))[0]
    codec.use_fast_path("graph")

    def decode(c: HeartCodec) -> torch.Tensor:
        return c.detokenize(
            codes, CodecParams(num_steps=2), generator=torch.Generator().manual_seed(0)
        )

    expected = decode(codec)  # captures the estimator's graph
    copied = copy.deepcopy(codec)
    torch.testing.assert_close(decode(copied), expected, rtol=1e-5, atol=1e-5)
    (original,), (own,) = (
        c.flow_matching.fast_estimator._captured.values() for c in (codec, copied)
    )
    assert own.graph is not original.graph  # the copy captured its own
