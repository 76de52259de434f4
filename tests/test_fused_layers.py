"""The fused twins of RMSNorm, RoPE and SiLU·mul (heartmula_rt.model.fused, kernels/fused_layers.py)
against the plain functions, and the static engine with them swapped in.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, conftest.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.folder import LM_DIR, load_gen_config
from heartmula_rt.model.lm import RMSNorm, Rope, RotaryEmbedding, SiluMul
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import StaticEngine
from heartmula_rt.runtime.launches import count_frame_launches, meta_lm

pytest.importorskip("triton", reason="the fused layers are Triton kernels")
from heartmula_rt.model.fused import FusedRMSNorm, FusedRope, FusedSiluMul, use_fused_layers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(fused: torch.Tensor, plain: torch.Tensor) -> None:
    """float32: tight. float16: the same roundings as the plain ops, so all but the rare
    element whose float32 value differs in its last bits are equal. bfloat16: to rounding
    (two ulps) only, as Triton's interpreter truncates float32 → bfloat16 casts (a GPU rounds
    them to nearest, like PyTorch); float16 checks the rounding steps."""
    assert fused.dtype == plain.dtype and fused.shape == plain.shape
    if plain.dtype == torch.float32:
        torch.testing.assert_close(fused, plain, rtol=2e-6, atol=2e-6)
    elif plain.dtype == torch.float16:
        torch.testing.assert_close(fused, plain, rtol=2**-10, atol=1e-5)
        assert (fused != plain).float().mean() <= 0.01
    else:
        torch.testing.assert_close(fused.float(), plain.float(), rtol=2**-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3072), (2, 3, 67), (5, 64)])
def test_rms_norm_equals_the_plain_one(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    plain = RMSNorm(shape[-1], 1e-5)
    plain.scale.data = torch.randn(shape[-1], generator=g)
    plain = plain.to(DEVICE, dtype)
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    assert_close(FusedRMSNorm.from_plain(plain)(x), plain(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "positions", "heads", "kv_heads", "head_dim"),
    [(2, 1, 24, 8, 128), (2, 2, 8, 4, 384), (1, 7, 6, 3, 48), (3, 5, 2, 1, 16)],
)
def test_rope_equals_the_plain_one(
    dtype: torch.dtype, batch: int, positions: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    g = torch.Generator().manual_seed(1)
    cos, sin = RotaryEmbedding(head_dim, 512, 500000.0, 32.0).tables(DEVICE)
    start = 300
    cos, sin = cos[start : start + positions], sin[start : start + positions]
    q = torch.randn(batch, positions, heads, head_dim, generator=g).to(DEVICE, dtype)
    # k as attention makes it: a view of a projection's output
    k = torch.randn(batch, positions, kv_heads * head_dim, generator=g).to(DEVICE, dtype)
    k = k.view(batch, positions, kv_heads, head_dim)
    fused, plain = FusedRope()(q, k, cos, sin), Rope()(q, k, cos, sin)
    assert_close(fused[0], plain[0])
    assert_close(fused[1], plain[1])


def test_rope_takes_non_contiguous_inputs() -> None:
    cos, sin = RotaryEmbedding(32, 64, 500000.0, 32.0).tables(DEVICE)
    cos, sin = cos[:4], sin[:4]
    q = torch.randn(4, 2, 3, 32, device=DEVICE).transpose(0, 1)  # [2, 4, 3, 32], strided
    k = torch.randn(2, 4, 1, 32, device=DEVICE)
    for fused, plain in zip(FusedRope()(q, k, cos, sin), Rope()(q, k, cos, sin), strict=True):
        assert_close(fused, plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1, 8192), (1, 2, 160), (3, 1500)])
def test_silu_mul_equals_the_plain_one(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(2)
    gate, up = (4 * torch.randn(2, *shape, generator=g)).to(DEVICE, dtype)
    assert_close(FusedSiluMul()(gate, up), SiluMul()(gate, up))


@pytest.fixture(scope="module")
def fused_lm(tiny_ckpt: Path):
    """The tiny-public LM in float32 with its fused twins, and the plain one."""
    plain = load_lm(tiny_ckpt / LM_DIR, device=DEVICE)[0]
    fused = copy.deepcopy(plain)
    swapped = use_fused_layers(fused)
    return fused, plain, swapped


def test_use_fused_layers_swaps_every_layer_and_keeps_the_weights(fused_lm) -> None:
    fused, plain, swapped = fused_lm
    layers = len(plain.backbone.layers) + len(plain.decoder.layers)
    assert swapped == {"FusedRMSNorm": 2 * layers + 2, "FusedRope": layers, "FusedSiluMul": layers}
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert use_fused_layers(fused) == {}  # already swapped


# Greedy frames are a prefix of a longer run's: the first frames of the CFG (2 rows) and
# no-CFG cases; each frame costs seconds under Triton's interpreter. (EOS handling is the
# engine's, tested in test_engine.py.)
@pytest.mark.parametrize(
    ("file", "max_frames"), [("mula_cfg15.safetensors", 6), ("mula_nocfg.safetensors", 6)]
)
def test_static_engine_with_fused_layers_gives_the_reference_frames(
    file: str, max_frames: int, fused_lm, tiny_ckpt: Path, fixtures_dir: Path
) -> None:
    fused = fused_lm[0]
    gen = load_gen_config(tiny_ckpt)
    tokenizer = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    cases = json.loads((fixtures_dir / "tiny-public/expected/cases.json").read_text())["cases"]
    c = next(c for c in cases if c["file"] == file)
    expected = load_file(fixtures_dir / "tiny-public/expected" / file)["frames"].long()
    prompt = build_prompt(tokenizer, gen, c["tags"], c["lyrics"])
    # small buckets and an odd sync interval, as in test_engine.py
    engine = StaticEngine(fused, gen, graphs=False, bucket=16, sync_every=5)
    args = {k: c[k] for k in ("topk", "temperature", "cfg_scale")}
    frames = engine.generate_frames(prompt, SamplingParams(max_frames=max_frames, **args))
    assert torch.equal(frames, expected[:, : max_frames + 1])


def test_compiled_twins_are_the_plain_ops(fused_lm) -> None:
    """Under torch.compile a twin hands inductor its plain ops (a custom op would be opaque)."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    fused, plain = fused_lm[0], fused_lm[1]
    rows = torch.randn(2, 1, plain.config.backbone.embed_dim, device=DEVICE)
    layer, plain_layer = fused.backbone.layers[0], plain.backbone.layers[0]
    cos, sin = plain.backbone.rope.tables(DEVICE)
    cache = plain.new_cache(2, 8).backbone[0]
    start = torch.tensor(3, device=DEVICE)
    args = (rows, start, cos[start.view(1)], sin[start.view(1)], cache, 8, None)
    out = torch.compile(layer, backend=record, fullgraph=True)(*args)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes}
    assert not any("heartmula_rt" in t for t in targets)
    assert torch.equal(out, plain_layer(*args))


def test_fused_layers_launch_one_kernel_each() -> None:
    model = meta_lm("tiny", torch.float32)
    plain = count_frame_launches(model)
    use_fused_layers(model)
    fused = count_frame_launches(model)
    for part in ("backbone layers", "decoder layers"):
        ops = fused.part_ops(part)
        steps = fused.backbone_layers if part == "backbone layers" else fused.decoder_layer_steps
        assert ops["heartmula_rt.fused_rms_norm.default"] == 2 * steps
        assert ops["heartmula_rt.fused_rope.default"] == steps
        assert ops["heartmula_rt.fused_silu_mul.default"] == steps
        # nothing of the plain norms, RoPE or SiLU is left
        for op in ("pow", "rsqrt", "mean", "silu", "stack", "sub", "mul", "_to_copy"):
            assert not any(f"aten.{op}." in name for name in ops), op
        assert fused.part(part) < plain.part(part)
    assert fused.part_ops("rest")["heartmula_rt.fused_rms_norm.default"] > 0  # the final norms
    assert fused.total < plain.total


def test_aot_launches_cover_the_engines_shapes() -> None:
    from heartmula_rt.kernels import fused_layers
    from triton.runtime.jit import MockTensor

    launches = fused_layers.aot_launches()
    kernels = {
        fused_layers._rms_norm_kernel,
        fused_layers._rope_kernel,
        fused_layers._silu_mul_kernel,
    }
    assert {kernel for _, kernel, _, _ in launches} == kernels
    for _, _, args, kwargs in launches:
        assert "num_warps" in kwargs
        assert any(isinstance(a, MockTensor) for a in args)
    # the 3B backbone's RoPE at decode with CFG: 24 q and 8 kv heads of 128, bf16
    rope = {d: (args, kwargs) for d, _, args, kwargs in launches}[
        "rope 3B backbone bfloat16 [2, 1]"
    ]
    q, k = rope[0][:2]
    assert q.shape == [2, 1, 24, 128] and k.shape == [2, 1, 8, 128] and q.dtype == torch.bfloat16
    assert rope[1]["HEAD_DIM"] == 128
    descriptions = " ".join(d for d, _, _, _ in launches)
    for preset in ("3B", "tiny"):
        for part in ("backbone", "decoder"):
            for dtype in ("bfloat16", "float16", "float32"):
                assert f"rms_norm {preset} {part} {dtype}" in descriptions
