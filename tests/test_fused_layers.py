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
from heartmula_rt.model.lm import KVCache, RMSNorm, Rope, RotaryEmbedding, SiluMul
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import StaticEngine
from heartmula_rt.runtime.launches import count_frame_launches, meta_lm

pytest.importorskip("triton", reason="the fused layers are Triton kernels")
from heartmula_rt.model.fused import FusedRMSNorm, FusedRope, FusedSiluMul, use_fused_layers

pytestmark = pytest.mark.kernels  # run_gpu.sh runs them on the GPU too
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
        # each norm one launch, the residual add before it inside (the first layer's first
        # norm has none); RoPE with the KV-cache write
        norms = ops["heartmula_rt.fused_rms_norm.default"]
        assert norms + ops["heartmula_rt.fused_add_rms_norm.default"] == 2 * steps
        assert ops["heartmula_rt.fused_rope_cache.default"] == steps
        assert ops["heartmula_rt.fused_silu_mul.default"] == steps
        # nothing of the plain norms, RoPE or SiLU is left
        for op in ("pow", "rsqrt", "mean", "silu", "stack", "sub", "mul", "_to_copy", "add"):
            assert not any(f"aten.{op}." in name for name in ops), op
        assert fused.part(part) < plain.part(part)
    # the final norms, with the last layer's residual add
    assert fused.part_ops("rest")["heartmula_rt.fused_add_rms_norm.default"] > 0
    assert fused.total < plain.total


def test_aot_launches_cover_the_engines_shapes() -> None:
    from heartmula_rt.kernels import fused_layers
    from triton.runtime.jit import MockTensor

    launches = fused_layers.aot_launches()
    kernels = {
        fused_layers._rms_norm_kernel,
        fused_layers._rope_kernel,
        fused_layers._silu_mul_kernel,
        fused_layers._add_rms_norm_kernel,
        fused_layers._rope_cache_kernel,
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3072), (2, 3, 67), (5, 64)])
def test_add_rms_norm_equals_the_plain_add_and_norm(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(3)
    plain = RMSNorm(shape[-1], 1e-5)
    plain.scale.data = torch.randn(shape[-1], generator=g)
    plain = plain.to(DEVICE, dtype)
    x, delta = (3 * torch.randn(2, *shape, generator=g)).to(DEVICE, dtype)
    (s, normed), (plain_s, plain_normed) = (
        FusedRMSNorm.from_plain(plain).add_norm(x, delta),
        plain.add_norm(x, delta),
    )
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        assert_close(s, plain_s)  # the interpreter truncates float32 → bfloat16
    else:
        assert torch.equal(s, plain_s)  # one rounding of the sum, as `+` makes it
        assert_close(normed, plain_normed)
    assert_close(normed, plain(s))  # the norm of the sum it returns


def _merged_qkv(b: int, t: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype):
    """q, k, v as a merged q/k/v matmul's output makes them: strided views of one tensor."""
    g = torch.Generator().manual_seed(4)
    out = torch.randn(b, t, (heads + 2 * kv_heads) * d, generator=g).to(DEVICE, dtype)
    q, k, v = out.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    return q.view(b, t, heads, d), k.view(b, t, kv_heads, d), v.view(b, t, kv_heads, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "positions", "heads", "kv_heads", "head_dim", "start"),
    [
        (2, 1, 24, 8, 128, None),  # the 3B backbone's decode step at device-held positions
        (3, 1, 6, 3, 48, None),
        (2, 2, 8, 4, 384, 0),  # the 300M decoder's first step
        (2, 1, 8, 4, 384, 5),
        (1, 7, 6, 3, 48, 3),  # a prompt
    ],
)
def test_rope_cache_equals_rope_then_the_cache_write(
    dtype: torch.dtype,
    batch: int,
    positions: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    start: int | None,
) -> None:
    table_cos, table_sin = RotaryEmbedding(head_dim, 512, 500000.0, 32.0).tables(DEVICE)
    q, k, v = _merged_qkv(batch, positions, heads, kv_heads, head_dim, dtype)
    if start is None:  # each row its own position, as the static engine keeps them
        at = torch.tensor([7, 300, 12][:batch], device=DEVICE)
        cos, sin, kv_len = table_cos[at], table_sin[at], 320
    else:
        at, kv_len = start, None
        cos, sin = table_cos[start : start + positions], table_sin[start : start + positions]
    results = []
    for rope in (FusedRope(), Rope()):
        # the second song's rows of a batch's cache, NaN wherever nothing is written
        whole = KVCache.zeros(batch + 1, 320, kv_heads, head_dim, dtype=dtype, device=DEVICE)
        whole.k.fill_(float("nan"))
        whole.v.fill_(float("nan"))
        cache = whole.rows(1, batch)
        q_out, k_read, v_read = rope.to_cache(q, k, v, at, cos, sin, cache, kv_len)
        results.append((q_out, k_read, v_read, whole))
    (q_f, k_f, v_f, whole_f), (q_p, k_p, v_p, whole_p) = results
    assert_close(q_f, q_p)
    assert k_f.shape == k_p.shape and v_f.shape == v_p.shape
    written = ~torch.isnan(whole_p.k)
    assert torch.equal(written, ~torch.isnan(whole_f.k))  # the same positions, nothing else
    assert_close(whole_f.k[written], whole_p.k[written])
    assert torch.equal(whole_f.v.nan_to_num(7.0), whole_p.v.nan_to_num(7.0))  # v as it is


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_reads_a_merged_w1_w3_output_in_place(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    h13 = (4 * torch.randn(2, 3, 2 * 160, generator=g)).to(DEVICE, dtype)
    gate, up = h13.chunk(2, dim=-1)
    assert_close(FusedSiluMul()(gate, up), SiluMul()(gate, up))


@pytest.mark.parametrize("attention", ["sdpa", "rope_attention"])
def test_merged_fused_static_engine_gives_the_reference_frames(
    fused_lm, tiny_ckpt: Path, fixtures_dir: Path, attention: str, monkeypatch
) -> None:
    """As a pipeline loads the LM on a GPU: merged q/k/v and w1/w3, then the fused twins; with
    SDPA after the fused RoPE and cache write, and as a GPU runs decode steps: all three in the
    fused `rope_attention` kernel."""
    from heartmula_rt.kernels import decode_attention

    from heartmula_rt.model import lm
    from heartmula_rt.model.lm import merge_projections

    calls: list[int] = []
    if attention == "rope_attention":
        monkeypatch.setattr(lm, "SPLIT_DECODE_DEVICES", lm.SPLIT_DECODE_DEVICES | {DEVICE.type})
        fused_op = torch.ops.heartmula_rt.rope_attention

        def counted(*args):
            calls.append(1)
            return fused_op(*args)

        monkeypatch.setattr(torch.ops.heartmula_rt, "rope_attention", counted)
    assert decode_attention.MAX_NEW >= 2  # the depth decoder's first step takes two positions

    merged = merge_projections(copy.deepcopy(fused_lm[1]))
    use_fused_layers(merged)
    gen = load_gen_config(tiny_ckpt)
    tokenizer = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    cases = json.loads((fixtures_dir / "tiny-public/expected/cases.json").read_text())["cases"]
    c = next(c for c in cases if c["file"] == "mula_cfg15.safetensors")
    expected = load_file(fixtures_dir / "tiny-public/expected/mula_cfg15.safetensors")["frames"]
    prompt = build_prompt(tokenizer, gen, c["tags"], c["lyrics"])
    engine = StaticEngine(merged, gen, graphs=False, bucket=16, sync_every=5)
    args = {k: c[k] for k in ("topk", "temperature", "cfg_scale")}
    frames = engine.generate_frames(prompt, SamplingParams(max_frames=4, **args))
    assert torch.equal(frames, expected.long()[:, :5])
    # every decode step: the backbone's after the prompt, every frame's depth decoder steps
    codebooks, made = frames.shape
    steps = (made - 1) * len(merged.backbone.layers)
    steps += made * (codebooks - 1) * len(merged.decoder.layers)
    assert len(calls) == (steps if attention == "rope_attention" else 0)
