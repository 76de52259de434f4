"""Tags and lyrics → the prompt's text column (SPEC §2)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from .config import GenConfig
from .errors import UserError

SLOT_ID = 0  # text id of the reference-audio slot row; its embedding is replaced anyway


@dataclass(frozen=True)
class Prompt:
    """Text column ids [P] (int64, CPU) of `[tags..., SLOT, lyrics...]`, and the SLOT's index."""

    ids: torch.Tensor
    slot_index: int

    def __len__(self) -> int:
        return self.ids.shape[0]


# A one-line argument ending like this is meant as a file, and a missing one is a typo, not text.
TEXT_FILE_SUFFIXES = (".txt", ".lrc", ".md")


def read_text(value: str) -> str:
    """The contents of the file `value` names, if it names one; otherwise `value` itself."""
    if not os.path.isfile(value):
        if "\n" not in value and value.strip().lower().endswith(TEXT_FILE_SUFFIXES):
            raise UserError(f"text file {value} does not exist")
        return value
    try:
        # utf-8-sig: a leading byte-order mark (Windows editors) is not part of the text.
        with open(value, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{value} is not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {value} ({e.strerror})") from None


def _encode(tokenizer: Tokenizer, gen: GenConfig, text: str) -> list[int]:
    # The tokenizer's post-processor may already add BOS; add BOS/EOS only where missing.
    ids = tokenizer.encode(text).ids
    if not ids or ids[0] != gen.text_bos_id:
        ids = [gen.text_bos_id, *ids]
    if ids[-1] != gen.text_eos_id:
        ids = [*ids, gen.text_eos_id]
    return ids


def check_texts(tags: str, lyrics: str) -> None:
    if not tags.strip() and not lyrics.strip():
        raise UserError("tags and lyrics are both empty; give at least one of them")


def build_prompt(tokenizer: Tokenizer, gen: GenConfig, tags: str, lyrics: str) -> Prompt:
    """The prompt for tags and lyrics given as text (see `read_text` for file arguments)."""
    check_texts(tags, lyrics)
    tags = tags.lower()
    if not tags.startswith("<tag>"):
        tags = "<tag>" + tags
    if not tags.endswith("</tag>"):
        tags = tags + "</tag>"
    tag_ids = _encode(tokenizer, gen, tags)
    lyric_ids = _encode(tokenizer, gen, lyrics.lower())
    ids = torch.tensor([*tag_ids, SLOT_ID, *lyric_ids], dtype=torch.long)
    return Prompt(ids=ids, slot_index=len(tag_ids))
