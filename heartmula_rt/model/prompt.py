"""Tags and lyrics → the prompt's text column (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from heartmula_rt.config import GenConfig
from heartmula_rt.request import Reference, check_texts

SLOT_ID = 0  # text id of the reference-audio slot row; its embedding is replaced anyway


@dataclass(frozen=True)
class Prompt:
    """Text column ids [P] (int64, CPU) of `[tags..., SLOT, lyrics...]`, the SLOT's index, and
    what the SLOT embeds: `reference`, float32 [muq_dim] on the CPU, is `strength · embedding`
    of the song's reference clip, whose `muq_linear` fills the conditional row's SLOT; None
    (no reference, or strength 0) leaves it `muq_linear(0)`, its bias, exactly as without
    reference audio. Each song of a batch has its own prompt, so its own reference."""

    ids: torch.Tensor
    slot_index: int
    reference: torch.Tensor | None = None

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


def reference_vector(reference: Reference | None) -> torch.Tensor | None:
    """What the SLOT's `muq_linear` takes for `reference`: `strength · embedding` as float32
    [muq_dim], or None where it changes nothing (no reference, strength 0), so that such a
    prompt is the very prompt of a request without one."""
    if reference is None or not reference.active:
        return None
    return torch.tensor(reference.embedding, dtype=torch.float32) * reference.strength


def build_prompt(
    tokenizer: Tokenizer,
    gen: GenConfig,
    tags: str,
    lyrics: str,
    reference: Reference | None = None,
) -> Prompt:
    """The prompt for tags and lyrics (text: reading files is the CLI's business) and, where
    given, a reference clip's embedding for its SLOT."""
    check_texts(tags, lyrics)
    tags = tags.lower()
    if not tags.startswith("<tag>"):
        tags = "<tag>" + tags
    if not tags.endswith("</tag>"):
        tags = tags + "</tag>"
    tag_ids = _encode(tokenizer, gen, tags)
    lyric_ids = _encode(tokenizer, gen, lyrics.lower())
    ids = torch.tensor([*tag_ids, SLOT_ID, *lyric_ids], dtype=torch.long)
    return Prompt(ids=ids, slot_index=len(tag_ids), reference=reference_vector(reference))
