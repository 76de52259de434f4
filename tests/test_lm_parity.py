"""The LM against the reference's outputs on the tiny public checkpoint (SPEC §2-3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from heartmula_rt.model.folder import load_gen_config
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import decode_one_frame, generate_frames, prefill, song_draw


def _mula_cases(fixtures_dir: Path) -> list[dict]:
    cases = json.loads((fixtures_dir / "tiny-public/expected/cases.json").read_text())["cases"]
    return [c for c in cases if c["kind"] == "mula"]


CASE_FILES = ["mula_cfg15.safetensors", "mula_nocfg.safetensors", "mula_eos.safetensors"]


@pytest.fixture(params=CASE_FILES)
def case(request, fixtures_dir: Path) -> tuple[dict, dict]:
    by_file = {c["file"]: c for c in _mula_cases(fixtures_dir)}
    expected = load_file(fixtures_dir / "tiny-public/expected" / request.param)
    return by_file[request.param], expected


def test_every_mula_case_is_covered(fixtures_dir: Path) -> None:
    assert sorted(c["file"] for c in _mula_cases(fixtures_dir)) == sorted(CASE_FILES)


def test_prompt(case, tokenizer: Tokenizer, tiny_ckpt: Path) -> None:
    c, expected = case
    prompt = build_prompt(tokenizer, load_gen_config(tiny_ckpt), c["tags"], c["lyrics"])
    assert torch.equal(prompt.ids, expected["prompt_ids"])
    assert prompt.slot_index == int(expected["muq_index"])


def test_first_step_logits(case, tiny_lm: HeartMuLa, tokenizer: Tokenizer, tiny_ckpt: Path) -> None:
    c, expected = case
    prompt = build_prompt(tokenizer, load_gen_config(tiny_ckpt), c["tags"], c["lyrics"])
    sampling = SamplingParams(
        topk=c["topk"], temperature=c["temperature"], cfg_scale=c["cfg_scale"]
    )
    draw = song_draw(sampling, tiny_lm.device)
    cache = tiny_lm.new_cache(sampling.cfg_rows, len(prompt) + 1)
    with torch.no_grad():
        frame, logits0 = prefill(tiny_lm, prompt, cache, draw)
        _, logits1 = decode_one_frame(tiny_lm, frame, len(prompt), cache, None, draw)
    torch.testing.assert_close(logits0, expected["c0_logits_step0"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits1, expected["c0_logits_step1"], rtol=0, atol=1e-4)


def test_greedy_frames(case, tiny_lm: HeartMuLa, tokenizer: Tokenizer, tiny_ckpt: Path) -> None:
    c, expected = case
    gen = load_gen_config(tiny_ckpt)
    prompt = build_prompt(tokenizer, gen, c["tags"], c["lyrics"])
    frames = generate_frames(
        tiny_lm,
        prompt,
        gen,
        SamplingParams(
            max_frames=c["max_frames"],
            topk=c["topk"],
            temperature=c["temperature"],
            cfg_scale=c["cfg_scale"],
        ),
    )
    assert frames.dtype == torch.int64 and frames.device.type == "cpu"
    assert frames.shape == (8, c["n_frames"])
    assert torch.equal(frames, expected["frames"].long())
