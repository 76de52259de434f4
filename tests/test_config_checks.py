"""Checkpoint configs and output paths refused when they are read, in one line naming the field
and its range (issue #31): a `max_seq_len` that would allocate terabytes, gen_config.json ids
outside the vocabularies, a song's codes file that is a folder; and the planner's length held
to what the model's context fits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from heartmula_rt import cli
from heartmula_rt.config import MAX_SEQ_LEN, LMConfig
from heartmula_rt.errors import UserError
from heartmula_rt.memory.planner import GiB, checkpoint_configs, plan_memory
from heartmula_rt.model.folder import LM_DIR, load_gen_config, load_lm_config
from heartmula_rt.runtime.audio import check_output_path
from heartmula_rt.runtime.codes import SongCodes


@pytest.fixture
def ckpt_configs(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint's config files (no weights) in a folder of the test's own."""
    root = tmp_path / "ckpt"
    (root / LM_DIR).mkdir(parents=True)
    shutil.copy(tiny_ckpt / LM_DIR / "config.json", root / LM_DIR / "config.json")
    shutil.copy(tiny_ckpt / "gen_config.json", root / "gen_config.json")
    return root


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_huge_context_is_refused_when_the_config_is_read(ckpt_configs: Path) -> None:
    config = ckpt_configs / LM_DIR / "config.json"
    flavor = json.loads(config.read_text())["backbone_flavor"]
    _edit(config, backbone_flavor={**flavor, "max_seq_len": 100_000_000_000})
    with pytest.raises(UserError) as e:
        load_lm_config(config.parent)
    message = str(e.value)
    assert f"max_seq_len must be a whole number from 1 to {MAX_SEQ_LEN}" in message
    assert "100000000000" in message and "\n" not in message
    _edit(config, backbone_flavor={**flavor, "num_heads": "4"})
    with pytest.raises(UserError, match="num_heads must be a whole number of at least 1, not '4'"):
        load_lm_config(config.parent)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("audio_eos_id", 5000, "audio_eos_id must be a whole number from 1 to 1028, not 5000"),
        ("audio_eos_id", 0, "audio_eos_id must be a whole number from 1 to 1028"),
        ("empty_id", -1, "empty_id must be a whole number from 0 to 1028, not -1"),
        ("text_bos_id", 512, "text_bos_id must be a whole number from 0 to 511"),
        ("text_eos_id", 1.5, "text_eos_id must be a whole number"),
    ],
)
def test_gen_config_ids_are_inside_their_vocabularies(
    ckpt_configs: Path, field: str, value: object, message: str
) -> None:
    assert load_gen_config(ckpt_configs).audio_eos_id == 1025  # as shipped
    _edit(ckpt_configs / "gen_config.json", **{field: value})
    with pytest.raises(UserError, match=f"^gen_config.json's {message}"):
        load_gen_config(ckpt_configs)


def test_a_codes_file_that_is_a_folder(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    (tmp_path / "song.codes.safetensors").mkdir()
    with pytest.raises(UserError, match="song.codes.safetensors, where the song's codes go, is"):
        check_output_path(tmp_path / "song.wav")
    with pytest.raises(UserError, match="codes file .* is a folder, not a file"):
        SongCodes.load(tmp_path / "song.codes.safetensors")
    # `gen` refused it only once the song was made: an IsADirectoryError's traceback.
    argv = ["gen", "--model-path", str(tiny_ckpt), "--tags", "piano", "--max-seconds", "0.5"]
    code = cli.main([*argv, "-o", str(tmp_path / "song.wav")])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.codes.safetensors"]


def test_a_plan_is_for_what_the_context_fits(tiny_ckpt: Path) -> None:
    # A 1024-position model: 3000 frames were planned, which `gen` then refused.
    lm_config, codec_config = checkpoint_configs(tiny_ckpt)
    plan = plan_memory(80 * GiB, lm_config, codec_config, max_frames=3000)
    assert plan.max_frames == 1024 - 16 - 1  # after a short prompt
    exact = plan_memory(80 * GiB, lm_config, codec_config, max_frames=3000, prompt_tokens=27)
    assert exact.max_frames == 1024 - 27 - 1
    assert plan_memory(80 * GiB, lm_config, codec_config, max_frames=500).max_frames == 500
    small = dataclasses.replace(
        lm_config, backbone=dataclasses.replace(lm_config.backbone, max_seq_len=16)
    )
    assert isinstance(small, LMConfig)
    with pytest.raises(UserError, match="the model's context of 16 positions holds no song"):
        plan_memory(80 * GiB, small, codec_config, max_frames=3000)
