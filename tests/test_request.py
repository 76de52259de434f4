"""The song request: validated once when made, its defaults the only defaults, and the one value
that reaches the engines and the codec."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from heartmula_rt import CodecParams, SamplingParams, SongRequest, UserError
from heartmula_rt.request import (
    cfg_rows,
    max_frames_for,
    prompt_too_long,
    request_from_json,
    seconds_value,
)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"topk": 0}, "topk must be a whole number of at least 1, not 0"),
        ({"topk": 2.5}, "topk must be a whole number"),
        ({"temperature": 0}, "temperature must be a finite number above 0"),
        ({"temperature": math.inf}, "temperature"),
        ({"cfg_scale": -1}, "cfg_scale must be a finite number of 0 or more"),
        ({"cfg_scale": math.nan}, "cfg_scale"),
        ({"cfg_scale": "1.5"}, "cfg_scale must be a number, not '1.5'"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"max_seconds": 0}, "max_seconds must be a number of seconds above 0 and at most 86400"),
        ({"max_seconds": math.inf}, "max_seconds"),
        ({"max_frames": -1}, "the number of frames must be a whole number of at least 0"),
        ({"max_frames": 3, "max_seconds": 1}, "max_seconds or max_frames, not both"),
        ({"num_steps": 0}, "num_steps must be a whole number of at least 1"),
        ({"guidance_scale": -0.5}, "guidance_scale must be a finite number of 0 or more"),
        ({"top_k": 5}, "unknown song setting 'top_k'"),
    ],
)
def test_every_rule_is_checked_when_made(settings: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        SongRequest.of("piano", "la", **settings)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("tags", "lyrics"), [("", ""), (" ", "\n\n")])
def test_a_song_needs_some_text(tags: str, lyrics: str) -> None:
    with pytest.raises(UserError, match="tags and lyrics are both empty"):
        SongRequest(tags, lyrics)


def test_text_must_be_text() -> None:
    with pytest.raises(UserError, match="lyrics must be text, not bytes"):
        SongRequest("piano", b"la la")


def test_defaults_and_keyword_form() -> None:
    song = SongRequest.of("piano", "la", max_seconds=2, seed=3, num_steps=4, topk=7)
    assert song.sampling == SamplingParams(max_frames=25, topk=7, seed=3)
    assert song.codec == CodecParams(num_steps=4)
    assert SongRequest("piano").sampling == SamplingParams()
    assert SamplingParams().max_frames == max_frames_for(240) == 3000
    assert (CodecParams().num_steps, CodecParams().guidance_scale) == (10, 1.25)
    # numpy scalars are numbers too (a web form's values often are)
    assert SongRequest.of("a", topk=np.int64(5), temperature=np.float32(0.5)).sampling.topk == 5


def test_requests_are_values() -> None:
    song = SongRequest.of("piano", "la", seed=1)
    with pytest.raises(FrozenInstanceError):
        song.tags = "rock"  # type: ignore[misc]
    changed = song.with_settings(seed=2, guidance_scale=2.0)
    assert (song.sampling.seed, changed.sampling.seed) == (1, 2)
    assert changed.codec.guidance_scale == 2.0 and changed.tags == song.tags
    assert SongRequest.of("piano", "la", seed=1) == song  # equal values, hashable
    assert len({song, SongRequest.of("piano", "la", seed=1)}) == 1
    with pytest.raises(UserError, match="topk"):
        song.with_settings(topk=0)  # a changed request is checked too


def test_cfg_rows() -> None:
    assert [cfg_rows(s) for s in (0, 1, 1.0001, 1.5)] == [1, 1, 2, 2]
    assert SamplingParams(cfg_scale=1).cfg_rows == 1 and SamplingParams().cfg_rows == 2


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf, 1e308, 86400.5, -1])
def test_a_time_is_a_finite_number_of_seconds(seconds: float) -> None:
    # NaN and 1e308 went on into frame counts (an OverflowError's traceback, a song of 10**309
    # frames); now one sentence naming the field, from the one check the CLI and server share.
    with pytest.raises(UserError, match=r"^from must be a number of seconds from 0 to 86400") as e:
        seconds_value("from", seconds)
    assert "\n" not in str(e.value)
    positive = "max_seconds must be a number of seconds above 0 and at most 86400"
    with pytest.raises(UserError, match=positive):
        max_frames_for(seconds)
    with pytest.raises(UserError, match=positive):
        SongRequest.of("piano", max_seconds=seconds)
    with pytest.raises(UserError, match="^seconds must be a number of seconds above 0 and at most"):
        request_from_json({"tags": "piano", "seconds": seconds}, {})


def test_a_frame_budget_is_bounded() -> None:
    assert seconds_value("to", 86400) == 86400.0 and max_frames_for(86400) == 1_080_000
    with pytest.raises(UserError, match="the number of frames must be at most 1080000"):
        SamplingParams(max_frames=10**12)


@pytest.mark.parametrize(
    ("tags", "lyrics", "name"),
    [
        ("\ud800", "la", "tags"),  # a JSON body's "\ud800": a lone surrogate
        ("piano", "la \udfff la", "lyrics"),
        # argv's invalid byte 0xff, as Python hands it over (surrogateescape)
        (b"pi\xffano".decode("utf-8", "surrogateescape"), "", "tags"),
    ],
)
def test_text_must_be_unicode(tags: str, lyrics: str, name: str) -> None:
    with pytest.raises(UserError, match=f"^{name} is not valid Unicode text: character") as e:
        SongRequest.of(tags, lyrics)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=f"^{name} is not valid Unicode text"):
        request_from_json({"tags": tags, "lyrics": lyrics}, {})


def test_a_long_prompt_names_the_long_part() -> None:
    # Long tags were blamed on the lyrics ("shorten the lyrics").
    tags = prompt_too_long(1100, 20, 10, 1024)
    assert tags is not None and tags.startswith("the tags are too long: 1100 tokens")
    assert "shorten the tags by at least 99 tokens" in tags and "lyrics 20" in tags
    lyrics = prompt_too_long(30, 1000, 10, 1024)
    assert lyrics is not None and "shorten the lyrics by at least 9 tokens" in lyrics
    frames = prompt_too_long(30, 40, 1000, 1024)  # the texts fit; the length does not
    assert frames is not None and "the longest song that fits is 952 frames (76.16 s)" in frames
    assert prompt_too_long(30, 40, 952, 1024) is None
