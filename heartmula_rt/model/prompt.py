"""Tags and lyrics → the prompt's text column (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from heartmula_rt.config import GenConfig
from heartmula_rt.request import check_texts

SLOT_ID = 0  # text id of the reference-audio slot row; its embedding is replaced anyway


@dataclass(frozen=True)
class Prompt:
    """Text column ids [P] (int64, CPU) of `[tags..., SLOT, lyrics...]`, and the SLOT's index."""

    ids: torch.Tensor
    slot_index: int

    def __len__(self) -> int:
        return self.ids.shape[0]


def _encode(tokenizer: Tokenizer, gen: GenConfig, text: str) -> list[int]:
    # The tokenizer's post-processor may already add BOS; add BOS/EOS only where missing.
    ids = tokenizer.encode(text).ids
    if not ids or ids[0] != gen.text_bos_id:
        ids = [gen.text_bos_id, *ids]
    if ids[-1] != gen.text_eos_id:
        ids = [*ids, gen.text_eos_id]
    return ids


def build_prompt(tokenizer: Tokenizer, gen: GenConfig, tags: str, lyrics: str) -> Prompt:
    """The prompt for tags and lyrics (text: reading files is the CLI's business)."""
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
