"""What one request may ask of a server (`ServiceConfig`'s limits): every field a client sets
is bounded here, so that no body (`{"num_steps": 100000000}`, a megabyte of tags) can stall the
songs of every other client. `SongRequest` has already checked each field's own rules (a
number, finite, in its range); these are the server's, each refusal one sentence naming the
limit."""

from __future__ import annotations

import math
from typing import Protocol

from heartmula_rt.errors import UserError
from heartmula_rt.request import SongRequest

MAX_REFERENCE_LENGTH = 1.01  # of a reference's embedding; MuQ-MuLan's are of length 1


class Limits(Protocol):
    """The fields of `ServiceConfig` read here."""

    max_num_steps: int
    max_guidance_scale: float
    max_cfg_scale: float
    max_temperature: float
    max_tags_chars: int
    max_lyrics_chars: int


def check_limits(request: SongRequest, limits: Limits, *, max_topk: int) -> None:
    """Refuse a request over one of the server's limits (`max_topk`: the server's, at most the
    model's audio vocabulary, past which top-k sampling has nothing more to choose from). The
    seed needs no limit of its own: `SongRequest` keeps it in [0, 2**63)."""
    for name, chars in (("tags", limits.max_tags_chars), ("lyrics", limits.max_lyrics_chars)):
        given = len(getattr(request, name))
        if given > chars:
            raise UserError(
                f"{name} must be at most {chars} characters on this server, not {given}"
            )
    sampling, codec = request.sampling, request.codec
    for name, value, most in (
        ("num_steps", codec.num_steps, limits.max_num_steps),
        ("guidance_scale", codec.guidance_scale, limits.max_guidance_scale),
        ("cfg_scale", sampling.cfg_scale, limits.max_cfg_scale),
        ("temperature", sampling.temperature, limits.max_temperature),
        ("topk", sampling.topk, max_topk),
    ):
        if value > most:
            raise UserError(f"{name} must be at most {most:g} on this server, not {value:g}")
    if request.reference is not None:
        # MuQ-MuLan's embeddings have length 1 (heartmula-rt's are normalised): a longer one
        # only drives the LM's reference slot far from anything it was trained on.
        length = math.sqrt(math.fsum(v * v for v in request.reference.embedding))
        if length > MAX_REFERENCE_LENGTH:
            raise UserError(
                f"a reference embedding's length (L2 norm) must be at most "
                f"{MAX_REFERENCE_LENGTH:g} on this server, not {length:.4g}"
            )
