"""The loader: official layout variants, full-size shapes, and every way a checkpoint can be bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from heartmula_rt import load_pipeline
from heartmula_rt.config import FLAVORS, CodecConfig, LMConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model import checkpoint, folder
from heartmula_rt.model.checkpoint import load_codec, load_lm
from heartmula_rt.model.codec import FLOAT32_PARTS, HeartCodec
from heartmula_rt.model.folder import CODEC_DIR, LM_DIR
from heartmula_rt.model.lm import HeartMuLa


@pytest.fixture
def ckpt(fixtures_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny-public checkpoint."""
    return Path(shutil.copytree(fixtures_dir / "tiny-public" / "ckpt", tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def reference(fixtures_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts loaded from the untouched fixture: what every variant must reproduce."""
    root = fixtures_dir / "tiny-public" / "ckpt"
    return {
        "lm": load_lm(root / LM_DIR)[0].state_dict(),
        "codec": load_codec(root / CODEC_DIR)[0].state_dict(),
    }


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    save_file(edit(tensors), path)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=k)


def test_loads_fixture_exactly(fixtures_dir: Path, reference) -> None:
    raw = load_file(fixtures_dir / "tiny-public" / "ckpt" / LM_DIR / "model.safetensors")
    for key, tensor in reference["lm"].items():
        assert torch.equal(tensor, raw[key]), key
    codec = reference["codec"]
    assert "scalar_model.decoder.0.weight" in codec
    assert not any("encoder" in k or "project_in" in k or "embed_avg" in k for k in codec)


def test_weight_norm_is_folded(fixtures_dir: Path, reference) -> None:
    raw = load_file(fixtures_dir / "tiny-public" / "ckpt" / CODEC_DIR / "model.safetensors")
    for prefix in ("scalar_model.decoder.0", "scalar_model.decoder.1.up_conv.layer"):
        g = raw[f"{prefix}.parametrizations.weight.original0"]
        v = raw[f"{prefix}.parametrizations.weight.original1"]
        expected = torch._weight_norm(v, g, 0)
        torch.testing.assert_close(reference["codec"][f"{prefix}.weight"], expected)


def test_sharded_with_index(ckpt: Path, reference) -> None:
    lm_dir = ckpt / LM_DIR
    tensors = load_file(lm_dir / "model.safetensors")
    (lm_dir / "model.safetensors").unlink()
    keys = list(tensors)
    weight_map = {}
    for i in range(3):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: tensors[k] for k in keys[i::3]}
        save_file(part, lm_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (lm_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert len(folder.shard_files(lm_dir)) == 3
    assert_same(load_lm(lm_dir)[0].state_dict(), reference["lm"])


def test_key_in_two_shards(ckpt: Path) -> None:
    lm_dir = ckpt / LM_DIR
    tensors = load_file(lm_dir / "model.safetensors")
    (lm_dir / "model.safetensors").unlink()
    save_file(tensors, lm_dir / "model-00001-of-00002.safetensors")
    save_file(
        {"decoder.norm.scale": tensors["decoder.norm.scale"]},
        lm_dir / "model-00002-of-00002.safetensors",
    )
    weight_map = {
        **dict.fromkeys(tensors, "model-00001-of-00002.safetensors"),
        "decoder.norm.scale": "model-00002-of-00002.safetensors",
    }
    (lm_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="'decoder.norm.scale' appears twice"):
        load_lm(lm_dir)


def test_weight_norm_split_across_shards_and_old_spelling(ckpt: Path, reference) -> None:
    """weight_g / weight_v (pre-parametrization torch), g and v in different shards."""
    codec_dir = ckpt / CODEC_DIR
    tensors = load_file(codec_dir / "model.safetensors")
    renamed = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): t
        for k, t in tensors.items()
    }
    (codec_dir / "model.safetensors").unlink()
    g_keys = {k for k in renamed if k.endswith("weight_g")}
    shards = {
        "model-00001-of-00002.safetensors": {k: t for k, t in renamed.items() if k in g_keys},
        "model-00002-of-00002.safetensors": {k: t for k, t in renamed.items() if k not in g_keys},
    }
    weight_map = {}
    for name, part in shards.items():
        save_file(part, codec_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (codec_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same(load_codec(codec_dir)[0].state_dict(), reference["codec"])


def test_initted_as_float_1(ckpt: Path, reference) -> None:
    def edit(t):
        return {k: (torch.ones(1) if k.endswith("initted") else v) for k, v in t.items()}

    rewrite(ckpt / CODEC_DIR / "model.safetensors", edit)
    assert_same(load_codec(ckpt / CODEC_DIR)[0].state_dict(), reference["codec"])


def test_bf16_storage_and_repack_keys(ckpt: Path, reference) -> None:
    def to_bf16_with_rope_cache(t):
        out = {k: v.to(torch.bfloat16) for k, v in t.items()}
        out["backbone.layers.0.attn.pos_embeddings.theta"] = torch.ones(8)
        out["decoder.layers.1.attn.pos_embeddings.cache"] = torch.ones(4, 8)
        return out

    rewrite(ckpt / LM_DIR / "model.safetensors", to_bf16_with_rope_cache)
    model, _ = load_lm(ckpt / LM_DIR, dtype=torch.float32)
    expected = {k: v.to(torch.bfloat16).float() for k, v in reference["lm"].items()}
    assert_same(model.state_dict(), expected)


def test_converts_to_target_dtype(fixtures_dir: Path) -> None:
    root = fixtures_dir / "tiny-public" / "ckpt"
    lm, _ = load_lm(root / LM_DIR, dtype=torch.bfloat16)
    codec, _ = load_codec(root / CODEC_DIR, dtype=torch.bfloat16)
    float32 = tuple(f"{part}." for part in FLOAT32_PARTS)
    assert any(name.startswith(float32) for name in codec.state_dict())
    for name, t in [*lm.state_dict().items(), *codec.state_dict().items()]:
        # the codec's float32 parts (scalar decoder, conditioning, ...) load in float32
        want = torch.float32 if name.startswith(float32) else torch.bfloat16
        assert t.dtype == want, name
        assert t.device.type == "cpu", name


# --- bad checkpoints: one clear sentence naming the culprit ------------------------------------


def test_missing_folder_and_files(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        folder.check_model_path(tmp_path / "nowhere")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json"):
        folder.check_model_path(ckpt)


def test_missing_model_file(ckpt: Path) -> None:
    (ckpt / LM_DIR / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        load_lm(ckpt / LM_DIR)


def test_missing_shard(ckpt: Path) -> None:
    index = {"weight_map": {"audio_head": "model-00002-of-00002.safetensors"}}
    (ckpt / LM_DIR / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="missing shard .*model-00002-of-00002"):
        load_lm(ckpt / LM_DIR)


def test_truncated_file(ckpt: Path) -> None:
    path = ckpt / LM_DIR / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged or truncated"):
        load_lm(ckpt / LM_DIR)


def test_corrupt_header(ckpt: Path) -> None:
    path = ckpt / CODEC_DIR / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    with pytest.raises(UserError, match="damaged or truncated"):
        load_codec(ckpt / CODEC_DIR)


def test_shapes_from_headers_match_safetensors(tiny_ckpt: Path) -> None:
    # folder.py parses the headers itself (no torch); safetensors' reader is the reference.
    from safetensors import safe_open

    for sub in (LM_DIR, CODEC_DIR):
        files = folder.shard_files(tiny_ckpt / sub)
        expected = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                expected |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert folder.tensor_shapes(files) == expected


@pytest.mark.parametrize(
    "head", [b"\x01\x02", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"]
)
def test_unreadable_header_is_one_line(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(head)
    with pytest.raises(UserError, match="damaged or truncated"):
        folder.tensor_shapes([path])


def test_wrong_shape_names_key(ckpt: Path) -> None:
    def edit(t):
        t["backbone.layers.1.mlp.w1.weight"] = torch.zeros(161, 64)
        return t

    rewrite(ckpt / LM_DIR / "model.safetensors", edit)
    with pytest.raises(
        UserError,
        match=r"'backbone.layers.1.mlp.w1.weight' has shape \[161, 64\], "
        r"expected \[160, 64\]",
    ):
        load_lm(ckpt / LM_DIR)


def test_unknown_and_missing_keys(ckpt: Path) -> None:
    path = ckpt / LM_DIR / "model.safetensors"
    original = load_file(path)
    save_file({**original, "backbone.layers.0.attn.q_norm.scale": torch.ones(64)}, path)
    with pytest.raises(UserError, match="unexpected tensor 'backbone.layers.0.attn.q_norm.scale'"):
        load_lm(ckpt / LM_DIR)
    save_file({k: v for k, v in original.items() if k != "decoder.norm.scale"}, path)
    with pytest.raises(UserError, match=r"lacks tensor 'decoder.norm.scale' \[64\]"):
        load_lm(ckpt / LM_DIR)


def test_bad_checkpoint_fails_before_any_tensor_is_read(ckpt: Path, monkeypatch) -> None:
    """Shapes and keys come from the headers: a 15 GB load never fails at its end."""

    def edit(t):
        del t["decoder.norm.scale"]
        return t

    rewrite(ckpt / LM_DIR / "model.safetensors", edit)

    def no_reading(files):
        raise AssertionError("tensor data was read before the headers were checked")

    monkeypatch.setattr(checkpoint, "_iter_tensors", no_reading)
    with pytest.raises(UserError, match="lacks tensor 'decoder.norm.scale'"):
        load_lm(ckpt / LM_DIR)


NAN_F32 = b"\xff" * 4  # what 0xFF bytes read as, in float32 and bfloat16 alike
POS_INF_F32 = b"\x00\x00\x80\x7f"
NEG_INF_BF16 = b"\x80\xff"


@pytest.mark.parametrize(
    ("folder", "key", "data", "count"),
    [
        (LM_DIR, "audio_head", NAN_F32 * 1000, 1000),
        (LM_DIR, "backbone.layers.1.attn.q_proj.weight", POS_INF_F32, 1),
        # a weight-norm half: refused as stored, not only once folded
        (CODEC_DIR, "scalar_model.decoder.0.parametrizations.weight.original1", POS_INF_F32 * 3, 3),
        (CODEC_DIR, "flow_matching.estimator.transformer_blocks.0.mlp.gate.weight", NAN_F32, 1),
    ],
)
def test_non_finite_tensor_names_tensor_and_file(
    ckpt: Path, overwrite_tensor_data, folder: str, key: str, data: bytes, count: int
) -> None:
    path = ckpt / folder / "model.safetensors"
    overwrite_tensor_data(path, key, data)
    load = load_lm if folder == LM_DIR else load_codec
    with pytest.raises(UserError) as e:
        load(ckpt / folder)
    assert str(e.value) == (
        f"{path}: tensor {key!r} holds {count} non-finite values (NaN or Inf); "
        "the file is corrupted, download it again"
    )


def test_non_finite_in_bf16_shard(ckpt: Path, overwrite_tensor_data) -> None:
    """Checked in the stored dtype, and the message names the shard that holds the tensor."""
    lm_dir = ckpt / LM_DIR
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(lm_dir / "model.safetensors").items()}
    (lm_dir / "model.safetensors").unlink()
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k != "audio_head"},
        "model-00002-of-00002.safetensors": {"audio_head": tensors["audio_head"]},
    }
    weight_map = {}
    for name, part in shards.items():
        save_file(part, lm_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (lm_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shard = lm_dir / "model-00002-of-00002.safetensors"
    overwrite_tensor_data(shard, "audio_head", NEG_INF_BF16 * 5)
    with pytest.raises(UserError, match=rf"^{shard}: tensor 'audio_head' holds 5 non-finite"):
        load_lm(lm_dir, dtype=torch.bfloat16)


def test_non_finite_count_ignores_an_overflowing_sum(ckpt: Path, overwrite_tensor_data) -> None:
    """Finite float16 values whose sum overflows load; beside one NaN, only the NaN counts."""
    path = ckpt / LM_DIR / "model.safetensors"

    def huge_float16_scale(t):
        t["decoder.norm.scale"] = torch.full((64,), 60000.0, dtype=torch.float16)
        return t

    rewrite(path, huge_float16_scale)
    assert torch.all(load_lm(ckpt / LM_DIR)[0].decoder.norm.scale == 60000.0)
    overwrite_tensor_data(path, "decoder.norm.scale", b"\xff\xff")  # a float16 NaN
    with pytest.raises(UserError, match="'decoder.norm.scale' holds 1 non-finite value"):
        load_lm(ckpt / LM_DIR)


@pytest.mark.parametrize(
    ("folder", "key", "quant"),
    [
        (LM_DIR, "audio_head", "none"),
        (LM_DIR, "audio_head", "int8"),  # quantized while it loads: checked before quantizing
        (CODEC_DIR, "flow_matching.estimator.proj_out.ffn_2.weight", "none"),
    ],
)
def test_non_finite_refused_by_load_pipeline(
    ckpt: Path, overwrite_tensor_data, folder: str, key: str, quant: str
) -> None:
    path = ckpt / folder / "model.safetensors"
    overwrite_tensor_data(path, key, NAN_F32 * 1000)
    with pytest.raises(UserError, match=rf"^{path}: tensor {key!r} holds 1000 non-finite"):
        load_pipeline(ckpt, quant=quant)


def test_lonely_weight_norm_half(ckpt: Path) -> None:
    def edit(t):
        del t["scalar_model.decoder.7.parametrizations.weight.original1"]
        return t

    rewrite(ckpt / CODEC_DIR / "model.safetensors", edit)
    with pytest.raises(UserError, match="scalar_model.decoder.7"):
        load_codec(ckpt / CODEC_DIR)


def test_unknown_flavor(ckpt: Path) -> None:
    path = ckpt / LM_DIR / "config.json"
    config = json.loads(path.read_text())
    config["backbone_flavor"] = "llama-13B"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="unknown model flavor 'llama-13B'"):
        load_lm(ckpt / LM_DIR)
    config["backbone_flavor"] = {"num_layers": 2, "num_heads": 4}
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="lacks embed_dim"):
        load_lm(ckpt / LM_DIR)


def test_config_not_json(ckpt: Path) -> None:
    (ckpt / LM_DIR / "config.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        load_lm(ckpt / LM_DIR)


# --- full-size shapes on the meta device --------------------------------------------------------


def read_keys(path: Path) -> dict[str, tuple[int, ...]]:
    rows = path.read_text().splitlines()[1:]
    return {k: tuple(json.loads(s)) for k, s in (r.split("\t") for r in rows)}


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_lm_shapes(fixtures_dir: Path) -> None:
    official = read_keys(fixtures_dir / "keys" / "HeartMuLa-oss-3B.keys.tsv")
    config = LMConfig(backbone=FLAVORS["llama-3B"], decoder=FLAVORS["llama-300M"])
    with torch.device("meta"):
        model = HeartMuLa(config)
    assert module_shapes(model) == official
    assert list(model.buffers()) == []  # RoPE tables are built on the real device, not stored
    assert sum(t.numel() for t in model.state_dict().values()) == pytest.approx(3.94e9, rel=0.01)


def test_full_size_codec_shapes(fixtures_dir: Path) -> None:
    official = read_keys(fixtures_dir / "keys" / "HeartCodec-oss.keys.tsv")
    used = folder.used_shapes(official)
    config = folder.codec_config_from_shapes({}, used)
    assert config == CodecConfig()
    with torch.device("meta"):
        model = HeartCodec(config)
    assert module_shapes(model) == used


@pytest.mark.parametrize(
    ("backbone", "decoder"), [("llama-3B", "llama-300M"), ("llama-7B", "llama-400M")]
)
def test_named_flavors_build(backbone: str, decoder: str) -> None:
    config = LMConfig.from_dict({"backbone_flavor": backbone, "decoder_flavor": decoder})
    with torch.device("meta"):
        model = HeartMuLa(config)
    bb, dec = FLAVORS[backbone], FLAVORS[decoder]
    assert (
        len(model.backbone.layers) == bb.num_layers and len(model.decoder.layers) == dec.num_layers
    )
    assert model.backbone.layers[0].attn.k_proj.weight.shape == (
        bb.num_kv_heads * bb.head_dim,
        bb.embed_dim,
    )
    assert model.audio_head.shape == (7, dec.embed_dim, 8197)
    assert model.projection.weight.shape == (dec.embed_dim, bb.embed_dim)
