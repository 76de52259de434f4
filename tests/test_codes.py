"""Song codes sidecars (codes.py): the file, its refusals, the checkpoint's fingerprint, and
gen → sidecar → decode on the tiny fixture."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import heartmula_rt
from heartmula_rt import cli
from heartmula_rt.errors import UserError
from heartmula_rt.model import folder
from heartmula_rt.request import CodecParams, SamplingParams, SongRequest
from heartmula_rt.runtime import codes
from heartmula_rt.runtime.codes import SongCodes, find_sidecar, sidecar_path
from heartmula_rt.runtime.loader import PipelineConfig
from heartmula_rt.runtime.pipeline import Pipeline

REQUEST = SongRequest.of(
    "piano,happy",
    "[verse]\nla la — ü\n",
    max_frames=40,
    topk=20,
    temperature=0.9,
    cfg_scale=2.0,
    seed=123,
    num_steps=1,
    guidance_scale=1.5,
)


def song(ended: str = "eos", model: str = "abc123", frames: int = 12) -> SongCodes:
    made = torch.randint(0, 8197, (8, frames), generator=torch.Generator().manual_seed(0))
    return SongCodes(made, REQUEST, ended, model)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "song.codes.safetensors"
    written = song("interrupted")
    written.save(path)
    read = SongCodes.load(path, model="abc123")
    assert torch.equal(read.codes, written.codes) and read.codes.dtype == torch.int64
    assert read.request == REQUEST and read.seed == 123 and read.frames == 12
    assert (read.ended, read.model, read.runtime) == ("interrupted", "abc123", "0.1.0")
    assert read.runtime == heartmula_rt.__version__
    with safe_open(path, "pt") as f:  # the documented layout, as any safetensors reader sees it
        meta = f.metadata()
        assert list(f.keys()) == ["codes"]
    assert meta["format"] == "heartmula-rt song codes" and meta["version"] == "1"
    assert (meta["seed"], meta["frames"], meta["ended"]) == ("123", "12", "interrupted")
    request = json.loads(meta["request"])
    every = {"tags", "lyrics"} | {f.name for f in fields(SamplingParams) + fields(CodecParams)}
    assert set(request) == every  # every field of the request, by name
    expected = {
        "tags": "piano,happy",
        "lyrics": "[verse]\nla la — ü\n",
        "max_frames": 40,
        "topk": 20,
        "temperature": 0.9,
        "cfg_scale": 2.0,
        "seed": 123,
        "stop_at_eos": True,
        "num_steps": 1,
        "guidance_scale": 1.5,
    }
    assert {name: request[name] for name in expected} == expected


def test_the_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "song.codes.safetensors"
    song().save(path)
    song(frames=3).save(path)  # replaced whole
    assert SongCodes.load(path).frames == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left

    def refused(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError):
        song(frames=5).save(tmp_path / "other.codes.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the old one, nothing else


def _refused(path: Path, **options) -> str:
    with pytest.raises(UserError) as refused:
        SongCodes.load(path, **options)
    message = str(refused.value)
    assert "\n" not in message
    return message


def _rewrite(path: Path, **metadata: str) -> None:
    """The sidecar at `path` with some metadata changed."""
    with safe_open(path, "pt") as f:
        meta = {**f.metadata(), **metadata}
    save_file(load_file(path), path, metadata=meta)


def test_refusals(tmp_path: Path) -> None:
    path = tmp_path / "song.codes.safetensors"
    assert "does not exist" in _refused(path)
    song().save(path)
    whole = path.read_bytes()

    path.write_bytes(whole[:-10])  # truncated
    assert "damaged or not a safetensors file" in _refused(path)
    path.write_bytes(b"RIFF\x00\x00 not safetensors at all")
    assert "damaged or not a safetensors file" in _refused(path)

    save_file({"codes": torch.zeros(8, 3, dtype=torch.long)}, path)  # no metadata: not ours
    assert "not a song codes file of heartmula-rt" in _refused(path)
    save_file({"codes": torch.zeros(8, 3, dtype=torch.long)}, path, {"format": "other"})
    assert "not a song codes file of heartmula-rt" in _refused(path)

    path.write_bytes(whole)
    _rewrite(path, version="2")
    message = _refused(path)
    assert message.endswith("made by a newer heartmula-rt (version 2); this one reads version 1")

    path.write_bytes(whole)
    _rewrite(path, frames="13")
    assert "says 13 frames but holds 12" in _refused(path)
    path.write_bytes(whole)
    _rewrite(path, request='{"tags": "", "lyrics": ""}')
    assert "its request is not a song's" in _refused(path)


def test_another_checkpoints_codes_need_force(tmp_path: Path) -> None:
    path = tmp_path / "song.codes.safetensors"
    song(model="aaaa").save(path)
    message = _refused(path, model="bbbb")
    assert "another checkpoint (aaaa, this one is bbbb); --force uses it anyway" in message
    assert SongCodes.load(path, model="bbbb", force=True).model == "aaaa"
    assert SongCodes.load(path, model="aaaa").model == "aaaa"


def test_find_sidecar(tmp_path: Path) -> None:
    audio = tmp_path / "song.flac"
    assert sidecar_path(audio) == tmp_path / "song.codes.safetensors"
    assert sidecar_path(tmp_path / "song.partial.wav").name == "song.partial.codes.safetensors"
    with pytest.raises(UserError, match="no codes beside .*song.flac: only songs made by"):
        find_sidecar(audio)
    song().save(sidecar_path(audio))
    assert find_sidecar(audio) == sidecar_path(audio) == find_sidecar(sidecar_path(audio))
    with pytest.raises(UserError, match="older heartmula-rt"):
        find_sidecar(tmp_path / "song.codes.npz")


def test_fingerprint(tiny_ckpt: Path, tmp_path: Path) -> None:
    mark = folder.fingerprint(tiny_ckpt)
    assert mark == folder.fingerprint(tiny_ckpt) and len(mark) == 16
    copy = Path(shutil.copytree(tiny_ckpt, tmp_path / "copy"))
    assert folder.fingerprint(copy) == mark  # file times and places do not count

    config = copy / folder.CODEC_DIR / "config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "num_quantizers": 7}))
    assert folder.fingerprint(copy) != mark
    config.write_text(original)
    assert folder.fingerprint(copy) == mark

    weights = copy / folder.LM_DIR / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(sorted(tensors)))
    tensors[name] = tensors[name][:1].clone()  # one tensor of another shape
    save_file(tensors, weights)
    assert folder.fingerprint(copy) != mark

    synthetic = SimpleNamespace(config=PipelineConfig(synthetic="tiny"))
    assert Pipeline.fingerprint.func(synthetic) == "synthetic-tiny"


# --- gen → sidecar → decode, and what decode refuses ------------------------------------------


def run(args: list[str], capfd) -> tuple[int, list[str]]:
    code = cli.main(args)
    return code, capfd.readouterr().err.strip().splitlines()


def test_gen_keeps_a_sidecar_that_decode_turns_into_the_same_song(
    tiny_ckpt: Path, tmp_path: Path, capfd
) -> None:
    out = tmp_path / "song.wav"
    gen = ["gen", "--model-path", str(tiny_ckpt), "--tags", "piano", "--lyrics", "la"]
    code, err = run([*gen, "--max-seconds", "1", "--seed", "7", "-o", str(out)], capfd)
    assert code == 0, err
    sidecar = tmp_path / "song.codes.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [sidecar.name, out.name]
    kept = SongCodes.load(sidecar, model=folder.fingerprint(tiny_ckpt))
    assert kept.request == SongRequest.of("piano", "la", max_seconds=1, seed=7)
    assert kept.ended == codes.lm_end(kept.codes, kept.request.sampling)

    again = tmp_path / "again.wav"
    decode = ["decode", "--model-path", str(tiny_ckpt)]
    code, err = run([*decode, str(out), "-o", str(again)], capfd)  # the audio names its codes
    assert code == 0, err
    assert again.read_bytes() == out.read_bytes() and sidecar.is_file()  # kept


def test_decode_refuses_in_one_line(tiny_ckpt: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "out.wav"
    decode = ["decode", "--model-path", str(tiny_ckpt), "-o", str(out)]
    audio = tmp_path / "song.wav"
    audio.write_bytes(b"RIFF")  # someone else's song: no sidecar beside it
    code, err = run([*decode, str(audio)], capfd)
    assert code == 2 and len(err) == 1 and "no codes beside" in err[0] and not out.exists()

    damaged = sidecar_path(audio)
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, err = run([*decode, str(audio)], capfd)
    assert code == 2 and len(err) == 1 and "damaged" in err[0] and not out.exists()

    song(model="another", frames=6).save(damaged)  # made with another checkpoint
    code, err = run([*decode, str(damaged)], capfd)
    assert code == 2 and len(err) == 1 and not out.exists()
    assert "made with another checkpoint (another" in err[0] and "--force" in err[0]
    code, err = run([*decode, str(damaged), "--force"], capfd)
    assert code == 0, err
    assert out.is_file()
