"""What one request may ask of a server (`ServiceConfig`'s limits): every field a client sets
is bounded here, so that no body (`{"num_steps": 100000000}`, a megabyte of tags) can stall the
songs of every other client. `SongRequest` has already checked each field's own rules (a
number, finite, in its range); these are the server's, each refusal one sentence naming the
limit."""

from __future__ import annotations

from typing import Protocol

from heartmula_rt.errors import UserError
from heartmula_rt.request import SongRequest


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
