"""Weight-only quantization (quant/): round trips, packed sizes, model swaps and measured quality.

The models here have random weights, whose logits are nearly flat: a free-running greedy
generation diverges at the first flipped argmax, which even a plain bfloat16 cast causes within a
frame or two. So quality is asserted teacher-forced (KL, top-1 agreement); free-running greedy
agreement is only meaningful on a trained checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from heartmula_rt.quant import QUANT_MODES, QuantizedAudioHead, QuantLinear, quantize_model
from heartmula_rt.quant.formats import NF4_CODEBOOK, Int4Linear, Int8Linear, NF4Linear
from torch import nn

from heartmula_rt.bench.quality import measure_quality
from heartmula_rt.config import LM_PRESETS, GenConfig, LMConfig
from heartmula_rt.errors import UserError
from heartmula_rt.memory.sizing import module_bytes
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.synthetic import synthetic_models, synthetic_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import generate_frames

FORMATS = {"int8": Int8Linear, "nf4": NF4Linear, "int4": Int4Linear}
BF16_EPS = 2.0**-8  # bfloat16's relative rounding of the 4-bit formats' block parameters


def _weight(out: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


# -- formats ------------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_step() -> None:
    w = _weight(96, 256)
    q = Int8Linear.from_weight(w)
    err = (q.dequantize() - w).abs().amax(dim=1)
    assert torch.all(err <= q.scale / 2 * (1 + 1e-5))
    assert torch.allclose(q.scale, w.abs().amax(dim=1) / 127)


def test_int4_error_is_at_most_half_a_step_per_group() -> None:
    w = _weight(96, 256)
    q = Int4Linear.from_weight(w)
    groups = w.view(96, 2, 128)
    err = (q.dequantize().view(96, 2, 128) - groups).abs().amax(dim=-1)
    # Half a step, plus what rounding the group's scale and zero to bfloat16 can shift it by.
    bound = q.scale.float() / 2 + BF16_EPS * groups.abs().amax(dim=-1)
    assert torch.all(err <= bound)


def test_nf4_error_is_at_most_half_the_widest_codebook_gap() -> None:
    w = _weight(96, 256)
    q = NF4Linear.from_weight(w)
    blocks = w.view(96, 4, 64)
    err = (q.dequantize().view(96, 4, 64) - blocks).abs().amax(dim=-1)
    book = torch.tensor(NF4_CODEBOOK)
    half_gap = float((book[1:] - book[:-1]).max()) / 2  # between 0.72 and 1.0
    assert torch.all(err <= q.absmax.float() * (half_gap + BF16_EPS))
    # The codebook's ends are exact: each block's largest weight comes back within rounding.
    assert torch.all(
        (q.dequantize().view(96, 4, 64).abs().amax(-1) - blocks.abs().amax(-1)).abs()
        <= BF16_EPS * blocks.abs().amax(-1)
    )


@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.01), ("nf4", 0.12), ("int4", 0.12)])
def test_relative_error_on_gaussian_weights(mode: str, bound: float) -> None:
    # Gaussian rows: int8's step is ~2.6σ/127 (rms error ~0.006σ); the 4-bit formats' is ~1/15
    # of a group's ~5σ range (rms error ~0.1σ).
    w = _weight(256, 512)
    rel = torch.linalg.vector_norm(FORMATS[mode].from_weight(w).dequantize() - w)
    assert rel / torch.linalg.vector_norm(w) < bound


@pytest.mark.parametrize(
    ("mode", "shape", "expected"),
    [
        ("int8", (96, 256), 96 * 256 + 4 * 96),  # 1 B/weight + a float32 scale per row
        ("nf4", (96, 256), 96 * 128 + 2 * 96 * 4),  # 0.5 B/weight + a bf16 absmax per 64
        ("int4", (96, 256), 96 * 128 + 2 * 2 * 96 * 2),  # 0.5 B/weight + bf16 scale, zero per 128
        ("nf4", (64, 160), 64 * 80 + 2 * 64 * 5),  # 160 wide: blocks of 32
        ("int4", (64, 160), 64 * 80 + 2 * 2 * 64 * 5),
    ],
)
def test_packed_sizes(mode: str, shape: tuple[int, int], expected: int) -> None:
    q = FORMATS[mode].from_weight(_weight(*shape))
    assert module_bytes(q) == expected
    assert q.dequantize().shape == shape


@pytest.mark.parametrize("mode", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_linear_of_the_dequantized_weight(mode: str, dtype: torch.dtype) -> None:
    linear = nn.Linear(160, 96, bias=False)
    q = FORMATS[mode].from_linear(linear)
    x = torch.randn(3, 5, 160, dtype=dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    expected = F.linear(x.float(), q.dequantize())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.float(), expected, rtol=tol, atol=tol)


def test_linears_with_a_bias_are_refused() -> None:
    with pytest.raises(ValueError):
        Int8Linear.from_linear(nn.Linear(8, 8))


@pytest.mark.parametrize("mode", FORMATS)
def test_audio_head_matches_the_plain_head(mode: str) -> None:
    head = torch.randn(7, 64, 300) * 64**-0.5  # [n-1, D, vocab], input-major
    q = QuantizedAudioHead.from_parameter(head, mode)
    d = torch.randn(2, 64)
    for codebook in range(1, 8):
        w = q.heads[codebook - 1].dequantize()  # [vocab, D]
        assert torch.allclose(q(d, codebook), d @ w.T, atol=1e-5)
        rel = torch.linalg.vector_norm(w.T - head[codebook - 1]) / torch.linalg.vector_norm(head)
        assert rel < 0.12


# -- models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mid() -> tuple[HeartMuLa, GenConfig]:
    m = synthetic_models("mid", torch.device("cpu"), torch.float32, seed=3)
    return m.lm, m.gen_config


@pytest.mark.parametrize("mode", QUANT_MODES[1:])
def test_quantize_model_swaps_every_matmul_weight(mode: str, tiny_lm: HeartMuLa) -> None:
    model = quantize_model(copy.deepcopy(tiny_lm), mode)
    plain = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert plain == ["muq_linear"]  # only its bias is used
    assert isinstance(model.audio_head, QuantizedAudioHead)
    assert isinstance(model.codebook0_head, QuantLinear)
    assert isinstance(model.projection, QuantLinear)
    # Float32 weights of 4 bytes become 1 (int8) or 0.5 (4-bit), plus scales.
    ratio = 0.3 if mode == "int8" else 0.2
    assert module_bytes(model.backbone) < module_bytes(tiny_lm.backbone) * ratio


def test_none_leaves_the_model_alone(tiny_lm: HeartMuLa) -> None:
    model = copy.deepcopy(tiny_lm)
    assert quantize_model(model, "none") is model
    assert isinstance(model.audio_head, nn.Parameter)


def test_unknown_mode_is_a_user_error(tiny_lm: HeartMuLa) -> None:
    with pytest.raises(UserError, match="unknown quantization mode"):
        quantize_model(copy.deepcopy(tiny_lm), "int3")


def test_quantizes_on_the_meta_device() -> None:
    # The 3B model's sizes without its weights: every format's stored size from shapes alone.
    with torch.device("meta"):
        model = HeartMuLa(LMConfig.from_dict(LM_PRESETS["3B"])).to(torch.bfloat16)
    before = module_bytes(model)
    quantize_model(model, "int8")
    assert model.codebook0_head.weight.dtype == torch.int8
    assert module_bytes(model) < 0.6 * before


@pytest.mark.parametrize("mode", QUANT_MODES[1:])
def test_quality_on_tiny(mode: str, tiny_lm: HeartMuLa, gen: GenConfig) -> None:
    quantized = quantize_model(copy.deepcopy(tiny_lm), mode)
    prompt = synthetic_prompt(40, tiny_lm.config.text_vocab_size)
    q = measure_quality(tiny_lm, quantized, prompt, gen, frames=64)
    _check_quality(mode, q)


@pytest.mark.parametrize("mode", QUANT_MODES[1:])
def test_quality_on_mid(mode: str, mid: tuple[HeartMuLa, GenConfig]) -> None:
    model, gen = mid
    quantized = quantize_model(copy.deepcopy(model), mode)
    prompt = synthetic_prompt(40, model.config.text_vocab_size)
    # Few frames: the reference path dequantizes every weight at every step on the CPU.
    q = measure_quality(model, quantized, prompt, gen, frames=8)
    _check_quality(mode, q)


def _check_quality(mode: str, q: dict[str, float]) -> None:
    assert set(q) == {"rel_err_c0", "rel_err_decoder", "kl", "top1_agreement", "greedy_agreement"}
    if mode == "int8":
        assert q["kl"] <= 0.01 and q["top1_agreement"] >= 0.95
        assert q["rel_err_c0"] < 0.05 and q["rel_err_decoder"] < 0.05
    else:
        assert 0 <= q["kl"] < 0.1 and q["top1_agreement"] >= 0.25
        assert q["rel_err_c0"] < 0.6 and q["rel_err_decoder"] < 0.6
    assert 0 <= q["greedy_agreement"] <= 1


@pytest.mark.parametrize("compile", [False, True])
def test_static_engine_runs_a_quantized_model(
    compile: bool, tiny_lm: HeartMuLa, gen: GenConfig
) -> None:
    pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")
    from heartmula_rt.runtime.engine import StaticEngine

    model = quantize_model(copy.deepcopy(tiny_lm), "int4")
    prompt = synthetic_prompt(20, model.config.text_vocab_size)
    expected = generate_frames(
        model, prompt, gen, SamplingParams(max_frames=12, topk=1, cfg_scale=1.0)
    )
    kw = {"compile": True, "compile_backend": "aot_eager"} if compile else {}
    engine = StaticEngine(model, gen, graphs=False, bucket=16, sync_every=5, **kw)
    frames = engine.generate_frames(prompt, SamplingParams(max_frames=12, topk=1, cfg_scale=1.0))
    assert torch.equal(frames, expected)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_pipeline_loads_quantized_and_generates(mode: str, tiny_ckpt: Path) -> None:
    import heartmula_rt

    pipe = heartmula_rt.load_pipeline(tiny_ckpt, device="cpu", quant=mode)
    cls = {"int8": Int8Linear, "int4": Int4Linear}[mode]
    assert isinstance(pipe.lm.backbone.layers[0].attn.qkv_proj, cls)  # q/k/v merged at load
    assert isinstance(pipe.lm.audio_head, QuantizedAudioHead)
    frames = pipe.generate_frames("piano", "[verse]\nla\n", max_frames=6, topk=1, seed=1)
    assert frames.shape[0] == 8 and 1 <= frames.shape[1] <= 7


def test_cli_quant_option(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    from heartmula_rt import cli

    out = tmp_path / "song.wav"
    args = ["gen", "--model-path", str(tiny_ckpt), "--tags", "rock", "--lyrics", "la"]
    assert cli.main([*args, "--max-seconds", "1", "--quant", "nf4", "-o", str(out)]) == 0
    assert out.is_file() and "quantization nf4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's one-line error
        cli.main([*args, "--quant", "int3", "-o", str(out)])
    assert stop.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def _pretend_a_gpu(monkeypatch, module) -> None:
    """`module`'s device parsing says cuda, and bitsandbytes is missing."""
    from heartmula_rt.quant import fast

    monkeypatch.setattr(module, "parse_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(fast, "bnb_available", lambda: False)


def test_nf4_on_a_gpu_without_bitsandbytes_is_refused_before_loading(
    monkeypatch, tmp_path: Path
) -> None:
    import heartmula_rt
    from heartmula_rt.runtime import loader

    _pretend_a_gpu(monkeypatch, loader)
    # A folder that does not exist: the refusal comes before anything is read.
    with pytest.raises(UserError, match=r"needs bitsandbytes.*heartmula-rt\[nf4\].*int4"):
        heartmula_rt.load_pipeline(tmp_path / "missing", device="cuda", engine="plain", quant="nf4")


def test_bench_refuses_nf4_on_a_gpu_without_bitsandbytes(monkeypatch, tmp_path, capsys) -> None:
    from heartmula_rt import cli
    from heartmula_rt.cli import common
    from heartmula_rt.runtime import loader

    _pretend_a_gpu(monkeypatch, loader)  # bench's device is its PipelineConfig's
    args = ["bench", "--engines", "plain", "--quant", "int8,nf4", "--out-dir", str(tmp_path)]
    assert cli.main(args) == common.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs bitsandbytes" in err
    assert not list(tmp_path.iterdir())  # nothing was benchmarked
