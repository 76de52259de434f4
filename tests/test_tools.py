"""tools/make_checkpoint.py writes checkpoints the real loader accepts, and loading streams."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import heartmula_rt
from heartmula_rt.model import folder
from heartmula_rt.model.folder import CODEC_DIR, LM_DIR

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_checkpoint import main as make_checkpoint_main  # noqa: E402


def all_keys(model_dir: Path) -> set[str]:
    keys: set[str] = set()
    for f in folder.shard_files(model_dir):
        with safe_open(str(f), "pt") as h:
            keys.update(h.keys())
    return keys


def test_tiny_sharded_checkpoint_generates(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    assert make_checkpoint_main([str(root), "--shard-gb", "0.002", "--seed", "3"]) == 0
    assert (root / LM_DIR / "model.safetensors.index.json").is_file()
    assert len(folder.shard_files(root / CODEC_DIR)) > 1
    codec_keys = all_keys(root / CODEC_DIR)
    # the official layout: weight norm split, the unused VQ tensors present
    assert "scalar_model.decoder.0.parametrizations.weight.original0" in codec_keys
    assert "flow_matching.vq_embed.layers.7._codebook.embed_avg" in codec_keys
    assert "scalar_model.decoder.6.conv.weight" in codec_keys

    pipe = heartmula_rt.load_pipeline(root, device="cpu")
    frames = pipe.generate_frames("rock", "la la", max_frames=10, seed=1)
    assert frames.shape[0] == 8 and 1 <= frames.shape[1] <= 11
    wav = pipe.decode_frames(frames, seed=0)
    assert wav.shape == (2, frames.shape[1] * 3840) and torch.isfinite(wav).all()


def test_never_eos_checkpoint_songs_run_to_their_length(tmp_path: Path) -> None:
    """--never-eos: the heads' weights of the EOS ids are zero, the ids as shipped, and every
    song runs to its length where the same random weights without it end songs early."""
    lengths = {}
    for flag in ([], ["--never-eos"]):
        root = tmp_path / ("never" if flag else "plain")
        assert make_checkpoint_main([str(root), "--seed", "3", *flag]) == 0
        pipe = heartmula_rt.load_pipeline(root, device="cpu")
        settings = {"max_frames": 40, "topk": 20}
        songs = [pipe.generate_frames("rock", "la la", **settings, seed=s) for s in range(6)]
        lengths[bool(flag)] = [f.shape[1] for f in songs]
    eos = json.loads((root / "gen_config.json").read_text())["audio_eos_id"]
    with safe_open(str(root / LM_DIR / "model.safetensors"), "pt") as h:
        assert not h.get_tensor("codebook0_head.weight")[eos:].any()
        assert not h.get_tensor("audio_head")[..., eos:].any()
        assert h.get_tensor("audio_head")[..., :eos].abs().sum() > 0
    assert eos == pipe.gen_config.audio_eos_id < pipe.lm_config.audio_vocab_size
    assert lengths[True] == [41] * 6
    assert min(lengths[False]) < 41, lengths


def test_bf16_checkpoint_loads(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    make_checkpoint_main([str(root), "--dtype", "bfloat16"])
    assert json.loads((root / LM_DIR / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(root / LM_DIR / "model.safetensors"), "pt") as h:
        assert h.get_tensor("audio_head").dtype == torch.bfloat16
    pipe = heartmula_rt.load_pipeline(root, device="cpu", dtype="float32")
    assert pipe.lm.audio_head.dtype == torch.float32


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loading_as_bf16_needs_about_one_shard_of_extra_memory(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    """float32 shards → bf16 model: peak host memory ≈ the bf16 model + one shard."""
    shard_mb = 32
    root = tmp_path / "mid"
    make_checkpoint_main([str(root), "--lm", "mid", "--shard-gb", str(shard_mb / 1000)])
    probe = textwrap.dedent(f"""
        import torch
        from heartmula_rt.model.checkpoint import load_lm

        def kib(field):
            status = open("/proc/self/status").read()
            return int(status.split(field + ":")[1].split()[0])

        # warm torch up on another (tiny) model, so nothing freed here is reused below
        load_lm({str(fixtures_dir / "tiny-public" / "ckpt" / LM_DIR)!r}, dtype=torch.bfloat16)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
        base = kib("VmRSS")
        model, _ = load_lm({str(root / LM_DIR)!r}, dtype=torch.bfloat16)
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        print(size // 1024, kib("VmHWM") - base)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    model_kib, peak_kib = map(int, out.stdout.split())
    assert model_kib > 2 * shard_mb * 1024  # the model is several shards
    assert peak_kib <= model_kib + (shard_mb + 8) * 1024
