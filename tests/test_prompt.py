"""Tags and lyrics → prompt ids (SPEC §2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from heartmula_rt.config import GenConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.prompt import build_prompt

GEN = GenConfig(text_bos_id=0, text_eos_id=1, audio_eos_id=1025, empty_id=0)
BOS, EOS = GEN.text_bos_id, GEN.text_eos_id


def _plain(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _split(tokenizer: Tokenizer, tags: str, lyrics: str) -> tuple[list[int], list[int]]:
    prompt = build_prompt(tokenizer, GEN, tags, lyrics)
    ids = prompt.ids.tolist()
    assert ids[prompt.slot_index] == 0
    return ids[: prompt.slot_index], ids[prompt.slot_index + 1 :]


@pytest.mark.parametrize(
    "tags", ["Piano,Happy", "<tag>piano,happy", "piano,happy</tag>", "<TAG>Piano,Happy</TAG>"]
)
def test_tags_are_lowercased_and_wrapped_once(tokenizer: Tokenizer, tags: str) -> None:
    tag_ids, _ = _split(tokenizer, tags, "la")
    assert tag_ids == [BOS, *_plain(tokenizer, "<tag>piano,happy</tag>"), EOS]


def test_lyrics_are_lowercased_not_stripped(tokenizer: Tokenizer) -> None:
    _, lyric_ids = _split(tokenizer, "rock", "[Verse]\nHello\n")
    assert lyric_ids == [BOS, *_plain(tokenizer, "[verse]\nhello\n"), EOS]


@pytest.mark.parametrize(
    "single",
    [
        None,  # no post-processor: the rule adds BOS and EOS
        "<|begin_of_text|> $A",  # the fixture's (and Llama-3's) post-processor: BOS only
        "<|begin_of_text|> $A <|end_of_text|>",
    ],
)
def test_bos_and_eos_added_only_where_missing(fixtures_dir: Path, single: str | None) -> None:
    tok = Tokenizer.from_file(str(fixtures_dir / "tiny-public/ckpt/tokenizer.json"))
    specials = [("<|begin_of_text|>", BOS), ("<|end_of_text|>", EOS)]
    tok.post_processor = None if single is None else TemplateProcessing(single, None, specials)
    tag_ids, lyric_ids = _split(tok, "rock", "la la")
    assert tag_ids == [BOS, *_plain(tok, "<tag>rock</tag>"), EOS]
    assert lyric_ids == [BOS, *_plain(tok, "la la"), EOS]


def test_one_side_empty(tokenizer: Tokenizer) -> None:
    tag_ids, lyric_ids = _split(tokenizer, "rock", "")
    assert lyric_ids == [BOS, EOS]
    tag_ids, lyric_ids = _split(tokenizer, "", "la")
    assert tag_ids == [BOS, *_plain(tokenizer, "<tag></tag>"), EOS]


@pytest.mark.parametrize("tags, lyrics", [("", ""), ("  ", "\n\n"), ("\t", "")])
def test_both_empty_is_a_user_error(tokenizer: Tokenizer, tags: str, lyrics: str) -> None:
    with pytest.raises(UserError, match="empty"):
        build_prompt(tokenizer, GEN, tags, lyrics)
