"""One song request: what to sing, how the LM samples it, how the codec decodes it.

A `SongRequest` is made once — by the CLI from argv, by an app, later by the server from an HTTP
body — and flows unchanged to the engine (`sampling`) and the codec (`codec`). Every rule is
checked when it is made, and its fields' defaults are the only defaults: a new knob is a field
here plus the code that uses it, nothing in between. Text is text: nothing here (or below it)
reads a file; reading `--lyrics FILE` is the CLI's business.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any

from heartmula_rt.errors import UserError

FRAME_MS = 80  # 12.5 LM frames per second
DEFAULT_MAX_SECONDS = 240.0
# The longest song any request may ask for, whatever the model: a day. Far past any model's
# context (extend goes on past it), and small enough that a length like 1e308 s is refused
# here in one sentence rather than becoming a frame budget of 10**309 further down.
LONGEST_SECONDS = 86400.0
MAX_FRAMES = int(LONGEST_SECONDS * 1000) // FRAME_MS


def _whole(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise UserError(f"{name} must be a whole number of at least {least}, not {value!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be a number, not {value!r}")
    return float(value)


def _check_seed(name: str, seed: object) -> None:
    whole = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if seed is not None and not (whole and 0 <= seed < 2**63):
        raise UserError(f"{name} must be an integer in [0, 2**63), not {seed!r}")


def check_seed(name: str, seed: object) -> None:
    """A seed (None: random) as every entry takes it: the CLI's --seed, a request's, an HTTP
    body's and `Pipeline.decode_frames(seed=...)`'s: an integer in [0, 2**63)."""
    _check_seed(name, seed)


def seconds_value(name: str, value: object, *, least: float = 0.0, positive: bool = False) -> float:
    """A time in seconds a user gave (`--max-seconds`, an HTTP body's `seconds`, `from`, `to`):
    a finite number from `least` (above it with `positive`) to LONGEST_SECONDS, else one
    sentence naming `name`. NaN, infinities and lengths like 1e308 are refused here, before any
    frame count is made of them."""
    seconds = _number(name, value)
    low = seconds > least if positive else seconds >= least
    if not (low and seconds <= LONGEST_SECONDS):  # NaN fails every comparison
        span = f"above {least:g} and at most" if positive else f"from {least:g} to"
        raise UserError(
            f"{name} must be a number of seconds {span} {LONGEST_SECONDS:g}, not {value!r}"
        )
    return seconds


def max_frames_for(max_seconds: float) -> int:
    """The reference's frame budget: max_audio_length_ms // 80."""
    max_seconds = seconds_value("max_seconds", max_seconds, positive=True)
    return int(max_seconds * 1000) // FRAME_MS


def check_texts(tags: str, lyrics: str) -> None:
    if not tags.strip() and not lyrics.strip():
        raise UserError("tags and lyrics are both empty; give at least one of them")


def check_text(name: str, text: object) -> None:
    """`text` is text that can be written as UTF-8: a str with no lone surrogate. A JSON body's
    "\\ud800" arrives as one, and so does a command line's invalid byte (Python keeps argv's
    undecodable bytes as surrogate escapes); the tokenizer, the sidecar and the job database
    would each fail on it later with a traceback."""
    if not isinstance(text, str):
        raise UserError(f"{name} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{name} is not valid Unicode text: character {e.start + 1} is "
            f"{text[e.start]!r}, which UTF-8 cannot hold (an invalid byte or a lone surrogate)"
        ) from None


def prompt_too_long(
    tag_tokens: int, lyric_tokens: int, max_frames: int, context: int
) -> str | None:
    """Why a prompt of `tag_tokens` tags and `lyric_tokens` lyrics (with its SLOT token between
    them) plus `max_frames` frames after frame 0 does not fit a backbone of `context`
    positions, None if it fits. When the texts alone leave no room for a frame, it says which
    of them is the long one and by how many tokens the prompt is over; else how many frames
    fit. The caller adds how its user changes a length (a flag, a field)."""
    prompt = tag_tokens + 1 + lyric_tokens
    if prompt + max_frames + 1 <= context:
        return None
    fits = context - prompt - 1  # frames after frame 0 that fit after this prompt
    if fits > 0:
        return (
            f"the prompt ({prompt} tokens) plus {max_frames} frames is too long for the model's "
            f"context of {context}; with this prompt the longest song that fits is {fits} "
            f"frames ({fits * FRAME_MS / 1000:g} s)"
        )
    over = 1 - fits  # tokens to cut for one frame to fit
    part, tokens = ("tags", tag_tokens) if tag_tokens >= lyric_tokens else ("lyrics", lyric_tokens)
    return (
        f"the {part} are too long: {tokens} tokens of a {prompt}-token prompt (tags {tag_tokens}, "
        f"lyrics {lyric_tokens}), and the model's context of {context} has no room left for "
        f"the song; shorten the {part} by at least {over} tokens"
    )


def check_songs(songs: object) -> None:
    """Songs at once (of a batch, a plan, the codec): a whole number of at least 1."""
    if isinstance(songs, bool) or not isinstance(songs, int) or songs < 1:
        raise UserError(f"songs at once must be a whole number of at least 1, not {songs!r}")


def cfg_rows(cfg_scale: float) -> int:
    """LM rows of one song: 2 ([cond, uncond]) with guidance, i.e. a scale above 1, else 1."""
    return 2 if cfg_scale > 1 else 1


@dataclass(frozen=True)
class SamplingParams:
    """How the LM makes one song's frames (SPEC §4)."""

    max_frames: int = max_frames_for(DEFAULT_MAX_SECONDS)  # after frame 0
    topk: int = 50
    temperature: float = 1.0
    cfg_scale: float = 1.5  # classifier-free guidance; ≤ 1: none, one LM row
    seed: int | None = None  # None: random; a seed also draws the codec's noise
    stop_at_eos: bool = True  # False: every frame of max_frames (benchmarks on random weights)

    def __post_init__(self) -> None:
        _whole("the number of frames", self.max_frames, 0)
        if self.max_frames > MAX_FRAMES:
            raise UserError(
                f"the number of frames must be at most {MAX_FRAMES} ({LONGEST_SECONDS:g} s), "
                f"not {self.max_frames}"
            )
        _whole("topk", self.topk, 1)
        if not 0 < _number("temperature", self.temperature) < math.inf:
            raise UserError(f"temperature must be a finite number above 0, not {self.temperature}")
        if not 0 <= _number("cfg_scale", self.cfg_scale) < math.inf:
            raise UserError(f"cfg_scale must be a finite number of 0 or more, not {self.cfg_scale}")
        _check_seed("seed", self.seed)

    @property
    def cfg_rows(self) -> int:
        return cfg_rows(self.cfg_scale)


@dataclass(frozen=True)
class CodecParams:
    """How the codec turns one song's frames into audio (SPEC §5)."""

    num_steps: int = 10  # Euler steps of the flow-matching ODE per window
    guidance_scale: float = 1.25  # the DiT's classifier-free guidance
    # The seed of the codec's noise; None: the song's seed. A section made again with another
    # seed keeps the song's noise, so its unchanged windows sound the same (edit.py).
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        _whole("num_steps", self.num_steps, 1)
        if not 0 <= _number("guidance_scale", self.guidance_scale) < math.inf:
            raise UserError(
                f"guidance_scale must be a finite number of 0 or more, not {self.guidance_scale}"
            )
        _check_seed("noise_seed", self.noise_seed)


REFERENCE_DIM = 512  # MuQ-MuLan's embedding, the LM's muq_dim (SPEC §2)


@dataclass(frozen=True)
class Reference:
    """A reference clip's MuQ-MuLan embedding and how strongly it steers the song: the
    conditional row's prompt SLOT becomes `muq_linear(strength · embedding)` (SPEC §2).
    Strength 0 is no reference at all: the SLOT keeps `muq_linear(0)`, bit for bit.

    The embedding is kept as plain floats (no torch here): made from a list, a tuple, a numpy
    array or a 1-d tensor, and written to a sidecar or a JSON body as a list (`record`)."""

    embedding: tuple[float, ...]
    strength: float = 1.0

    def __post_init__(self) -> None:
        given = self.embedding
        if isinstance(given, (str, bytes)) or not hasattr(given, "__len__"):
            raise UserError(
                f"a reference embedding must be {REFERENCE_DIM} numbers, not {type(given).__name__}"
            )
        if len(given) != REFERENCE_DIM:
            raise UserError(
                f"a reference embedding must have {REFERENCE_DIM} numbers (MuQ-MuLan's), "
                f"not {len(given)}"
            )
        try:
            values = tuple(float(v) for v in given if not isinstance(v, bool))
        except (TypeError, ValueError):
            values = ()
        if len(values) != REFERENCE_DIM:
            raise UserError("a reference embedding must hold only numbers")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise UserError(
                f"a reference embedding must hold finite numbers; number {bad + 1} is {values[bad]}"
            )
        strength = _number("the reference strength", self.strength)
        if not 0 <= strength <= 1:
            raise UserError(f"the reference strength must be from 0 to 1, not {self.strength}")
        # Frozen: the checked, converted values replace what was given.
        object.__setattr__(self, "embedding", values)
        object.__setattr__(self, "strength", strength)

    @property
    def active(self) -> bool:
        """Whether it changes the prompt at all (strength above 0)."""
        return self.strength > 0

    def record(self) -> dict[str, Any]:
        """As JSON: {"embedding": [512 floats], "strength": s} (a sidecar, an HTTP body)."""
        return {"embedding": list(self.embedding), "strength": self.strength}

    @classmethod
    def of_record(cls, record: object) -> Reference:
        """The inverse of `record`; anything else is one sentence."""
        if not isinstance(record, dict) or set(record) - {"embedding", "strength"}:
            raise UserError('a reference must be {"embedding": [numbers], "strength": number}')
        if "embedding" not in record:
            raise UserError("a reference needs its embedding")
        return cls(record["embedding"], record.get("strength", 1.0))


_SAMPLING = {f.name for f in fields(SamplingParams)}
_CODEC = {f.name for f in fields(CodecParams)}


@dataclass(frozen=True)
class SongRequest:
    """A song: tags and lyrics as text (never a file name), and its sampling and codec
    settings."""

    tags: str = ""
    lyrics: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    codec: CodecParams = field(default_factory=CodecParams)
    reference: Reference | None = None  # a reference clip's embedding; None: none (SPEC §2)
    # A served LoRA adapter by name (serve --lora NAME=PATH), run on this song's rows alone, at
    # `lora_scale` times the adapter's own strength; None: the base model (or what the
    # pipeline merged for every song).
    lora: str | None = None
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.reference is not None and not isinstance(self.reference, Reference):
            raise UserError(f"reference must be a Reference, not {type(self.reference).__name__}")
        check_lora_choice(self.lora, self.lora_scale)
        for name in ("tags", "lyrics"):
            check_text(name, getattr(self, name))
        check_texts(self.tags, self.lyrics)

    @property
    def noise_seed(self) -> int | None:
        """The seed of the codec's noise: `codec.noise_seed`, else the song's seed."""
        given = self.codec.noise_seed
        return self.sampling.seed if given is None else given

    @classmethod
    def of(
        cls,
        tags: str = "",
        lyrics: str = "",
        *,
        reference: Reference | None = None,
        lora: str | None = None,
        lora_scale: float = 1.0,
        **settings: Any,
    ) -> SongRequest:
        """The keyword form: `max_seconds` (or `max_frames`) and any field of `SamplingParams`
        or `CodecParams` by name, and the song's own served LoRA (`lora`, `lora_scale`); what
        is not given keeps its default."""
        request = cls(tags, lyrics, reference=reference, lora=lora, lora_scale=lora_scale)
        return request.with_settings(**settings)

    def with_settings(self, *, max_seconds: float | None = None, **settings: Any) -> SongRequest:
        """This request with some sampling or codec fields changed, named as `of` takes them."""
        unknown = sorted(set(settings) - _SAMPLING - _CODEC)
        if unknown:
            raise UserError(f"unknown song setting {unknown[0]!r}; use {', '.join(_names())}")
        sampling = {k: v for k, v in settings.items() if k in _SAMPLING}
        if max_seconds is not None:
            if "max_frames" in sampling:
                raise UserError("give max_seconds or max_frames, not both")
            sampling["max_frames"] = max_frames_for(max_seconds)
        codec = {k: v for k, v in settings.items() if k in _CODEC}
        return replace(
            self, sampling=replace(self.sampling, **sampling), codec=replace(self.codec, **codec)
        )


LORA_SCALE_MAX = 2.0  # a song's LoRA strength: 0 (none) to twice the adapter's own


def check_lora_choice(name: object, scale: object) -> None:
    """A song's adapter name (None, or 1-64 of letters, digits, `_`, `-`, `.`) and strength
    (a number from 0 to LORA_SCALE_MAX)."""
    if name is not None:
        if not isinstance(name, str):
            raise UserError(f"lora must be an adapter's name (text), not {type(name).__name__}")
        if not (
            0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-.") for c in name)
        ):
            raise UserError(
                f"lora {name[:80]!r} is not an adapter's name (1-64 letters, digits, _ - .)"
            )
    value = _number("lora_scale", scale)
    if not 0 <= value <= LORA_SCALE_MAX:  # NaN fails it too
        raise UserError(f"lora_scale must be from 0 to {LORA_SCALE_MAX:g}, not {scale!r}")


def _names() -> list[str]:
    return ["max_seconds", *sorted(_SAMPLING | _CODEC)]


# The defaults as values, for signatures that take settings optionally.
DEFAULT_SAMPLING = SamplingParams()
DEFAULT_CODEC = CodecParams()


# A song as a JSON object (a batch file's line, an HTTP body): its texts and settings by name.
JSON_TEXTS = ("tags", "lyrics")
JSON_SETTINGS = (
    "seconds",
    "seed",
    "topk",
    "temperature",
    "cfg_scale",
    "num_steps",
    "guidance_scale",
)
# A song's own LoRA adapter (served per song) and its strength: request fields, not settings.
JSON_LORA = ("lora", "lora_scale")


def request_from_json(
    fields: object, defaults: dict[str, Any], *, also: tuple[str, ...] = ()
) -> tuple[SongRequest, dict[str, Any]]:
    """(the request, the fields named in `also`) of a JSON object: `tags` and `lyrics` as text,
    `seconds` and the other settings by name, over `defaults` (`SongRequest.of` settings).
    `also` names fields the caller reads itself (an output file, a format); any other field is
    refused."""
    if not isinstance(fields, dict):
        raise UserError(f"not a JSON object but {type(fields).__name__}")
    allowed = (*JSON_TEXTS, *also, *JSON_SETTINGS, *JSON_LORA)
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r}; use {', '.join(allowed)}")
    texts = {name: fields.get(name, "") for name in JSON_TEXTS}
    given = {k: fields[k] for k in JSON_SETTINGS if fields.get(k) is not None}  # null: default
    settings = {**defaults, **given}
    if "seconds" in settings:  # checked under the name its writer gave it
        settings["max_seconds"] = seconds_value("seconds", settings.pop("seconds"), positive=True)
    request = SongRequest.of(**texts, **settings)
    lora = {k: fields[k] for k in JSON_LORA if fields.get(k) is not None}  # null: none
    if lora:
        request = replace(request, **lora)
    return request, {k: fields[k] for k in also if k in fields}
