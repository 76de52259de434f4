"""The plain generation loop's behaviour around the parity cases (SPEC §3-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from heartmula_rt.config import GenConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import Prompt, build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import GenerationInterrupted, generate_frames, prefill, song_draw


@pytest.fixture(scope="module")
def prompt(tiny_ckpt: Path, gen: GenConfig) -> Prompt:
    tokenizer = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    return build_prompt(tokenizer, gen, "Rock,Energetic", "[Verse]\nhello world\n")


def _sampled(tiny_lm: HeartMuLa, prompt: Prompt, gen: GenConfig, cfg_scale: float) -> torch.Tensor:
    return generate_frames(tiny_lm, prompt, gen, SamplingParams(12, cfg_scale=cfg_scale, seed=11))


def test_cfg_switching_on_one_model_matches_fresh_models(
    tiny_lm: HeartMuLa, tiny_ckpt: Path, prompt: Prompt, gen: GenConfig
) -> None:
    runs = [_sampled(tiny_lm, prompt, gen, cfg) for cfg in (1.5, 1.0, 1.5, 1.0)]
    fresh = [
        _sampled(load_lm(tiny_ckpt / "HeartMuLa-oss-3B")[0], prompt, gen, cfg) for cfg in (1.5, 1.0)
    ]
    assert torch.equal(runs[0], fresh[0]) and torch.equal(runs[2], fresh[0])
    assert torch.equal(runs[1], fresh[1]) and torch.equal(runs[3], fresh[1])
    assert not torch.equal(runs[0], runs[1])  # guidance does change the draws


def test_cfg_below_one_is_unguided(tiny_lm: HeartMuLa, prompt: Prompt, gen: GenConfig) -> None:
    assert torch.equal(_sampled(tiny_lm, prompt, gen, 0.5), _sampled(tiny_lm, prompt, gen, 1.0))


def test_zero_frames_gives_frame_zero(tiny_lm: HeartMuLa, prompt: Prompt, gen: GenConfig) -> None:
    frames = generate_frames(tiny_lm, prompt, gen, SamplingParams(max_frames=0, topk=1))
    assert frames.shape == (8, 1)
    assert torch.equal(
        frames, generate_frames(tiny_lm, prompt, gen, SamplingParams(max_frames=5, topk=1))[:, :1]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"topk": 0}, "topk"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"cfg_scale": -0.5}, "cfg_scale"),
        ({"max_frames": -1}, "frames"),
        ({"max_frames": 1024}, "context"),
    ],
)
def test_bad_settings_are_user_errors(
    tiny_lm: HeartMuLa, prompt: Prompt, gen: GenConfig, kwargs: dict, message: str
) -> None:
    kwargs = {"max_frames": 4, **kwargs}
    with pytest.raises(UserError, match=message):
        generate_frames(tiny_lm, prompt, gen, SamplingParams(**kwargs))


def test_longest_allowed_request(tiny_lm: HeartMuLa, gen: GenConfig) -> None:
    """prompt + max_frames + 1 may reach the backbone's max_seq_len exactly."""
    limit = tiny_lm.config.backbone.max_seq_len
    long_prompt = Prompt(ids=torch.full((limit - 4,), 7), slot_index=3)
    never_stop = GenConfig(audio_eos_id=tiny_lm.config.audio_vocab_size)
    with pytest.raises(UserError, match="context"):
        generate_frames(tiny_lm, long_prompt, never_stop, SamplingParams(max_frames=4, topk=1))
    frames = generate_frames(tiny_lm, long_prompt, never_stop, SamplingParams(max_frames=3, topk=1))
    assert frames.shape == (8, 4)


def test_interrupt_returns_partial_frames(
    tiny_lm: HeartMuLa, prompt: Prompt, gen: GenConfig
) -> None:
    seen: list[int] = []

    def on_frame(n: int) -> None:
        seen.append(n)
        if n == 5:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as info:
        generate_frames(
            tiny_lm, prompt, gen, SamplingParams(max_frames=20, topk=1), on_frame=on_frame
        )
    assert isinstance(info.value, KeyboardInterrupt)
    assert seen == [1, 2, 3, 4, 5]
    full = generate_frames(tiny_lm, prompt, gen, SamplingParams(max_frames=20, topk=1))
    assert info.value.frames.shape == (8, 5)
    assert torch.equal(info.value.frames, full[:, :5])


def test_bfloat16_model_runs(
    tiny_ckpt: Path, tiny_lm: HeartMuLa, prompt: Prompt, gen: GenConfig
) -> None:
    bf16 = load_lm(tiny_ckpt / "HeartMuLa-oss-3B", dtype=torch.bfloat16)[0]
    frames = generate_frames(bf16, prompt, gen, SamplingParams(max_frames=6, cfg_scale=1.5, topk=1))
    assert frames.dtype == torch.int64 and frames.shape[0] == 8 and frames.shape[1] >= 1
    assert int(frames.min()) >= 0 and int(frames.max()) < gen.audio_eos_id
    # The prompt step's logits stay close to float32 (greedy tokens may flip: margins are small).
    draw = song_draw(SamplingParams(topk=1, cfg_scale=1.5), tiny_lm.device)
    with torch.no_grad():
        _, logits16 = prefill(bf16, prompt, bf16.new_cache(2, len(prompt)), draw)
        _, logits32 = prefill(tiny_lm, prompt, tiny_lm.new_cache(2, len(prompt)), draw)
    assert logits16.dtype == torch.bfloat16
    torch.testing.assert_close(logits16.float(), logits32, rtol=0, atol=0.15)
