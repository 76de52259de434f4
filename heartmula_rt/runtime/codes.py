"""A song's codes on disk: the sidecar every song keeps beside its audio, so that the LM's work
is never lost (an interrupted or failed codec stage, a Ctrl-C, a killed server) and a song can
be decoded again (`heartmula-rt decode`).

The sidecar of `DIR/<stem><ext>` is `DIR/<stem>.codes.safetensors` (`sidecar_path`): a
safetensors file (https://huggingface.co/docs/safetensors) holding one tensor or two,

- `codes`: int64 [8, T], the LM's frames as it made them (frame 0 included, stray ids kept),
- `prefixes` (optional): float32 [W, 104, 256], for each of the song's W codec windows the
  in-context prefix it hands to the next (`HeartCodec.detokenize(..., return_prefixes=True)`),
  as the audio beside it was decoded; with them and that audio (WAV or FLAC), an edit decodes
  only the windows it changes (`HeartCodec.redecode`). A sidecar is first written without them
  as soon as the LM part ends, and again with them once the audio is written; a streamed song's
  sidecar has none,

and the file's metadata, text to text:

- `format`: "heartmula-rt song codes", what the file is;
- `version`: "1", the layout described here (`VERSION`); a reader refuses a version it does
  not know;
- `request`: the song's request as a JSON object: `tags`, `lyrics`, the sampling settings
  `max_frames`, `topk`, `temperature`, `cfg_scale`, `seed`, `stop_at_eos`, and the codec
  settings `num_steps`, `guidance_scale`, and the song's `reference` where it has one
  (`{"embedding": [512 numbers], "strength": s}`; older sidecars have none): the `SongRequest`
  exactly (`request_record`);
- `seed`: the song's seed (the LM's draws and the codec's noise), as in `request`;
- `frames`: T;
- `ended`: how the LM part ended (`ENDS`): `eos`, `length` (its `max_frames`), `interrupted`
  (Ctrl-C, a server stopped or killed: the frames so far), `cancelled` (by its client) or
  `failed` (an error);
- `model`: the fingerprint of the checkpoint that made the codes (`folder.fingerprint`,
  `Pipeline.fingerprint`; `synthetic-<size>` for random weights);
- `runtime`: the heartmula-rt version that wrote the file;
- `lora` (only where the song was made with LoRA adapters; older sidecars have none, and a
  version-1 reader that does not know it ignores it): a JSON list of `{"name", "path",
  "fingerprint", "scale"}`, each adapter the song's LM ran (merged for the whole pipeline, or
  the song's own per-row one): its name, the file or folder it was read from, the sha256 of
  its files (`LoraAdapter.fingerprint`) and the strength it ran at (`LoraRecord`). An edit loads
  them again and refuses a missing or changed file.

A sidecar is written atomically (a temporary file renamed), so it is either whole or absent.
Loading refuses, in one line: a missing file, a file that is not safetensors or is damaged
(prefixes that are not float32 [W, 104, C] with W the windows of T codes included), a
safetensors file that is not a sidecar, a version other than 1, and codes made with another
checkpoint than the one given (unless `force`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from heartmula_rt import __version__
from heartmula_rt.errors import UserError
from heartmula_rt.model.codec.detokenize import PREFIX, plan_windows
from heartmula_rt.request import Reference, SamplingParams, SongRequest

FORMAT = "heartmula-rt song codes"
VERSION = 1
SUFFIX = ".codes.safetensors"
ENDS = ("eos", "length", "interrupted", "cancelled", "failed")
_ONLY_OURS = "only songs made by heartmula-rt gen/serve can be edited or decoded again"


def sidecar_path(audio: Path) -> Path:
    """The sidecar of the audio file `audio`: `<stem>.codes.safetensors` beside it."""
    audio = Path(audio)
    return audio.with_name(f"{audio.stem}{SUFFIX}")


def find_sidecar(path: Path) -> Path:
    """The sidecar a user names: a sidecar itself, or the one beside an audio file (refused in
    one line if there is none)."""
    path = Path(path)
    if path.name.endswith(SUFFIX):
        return path
    if path.name.endswith(".codes.npz"):
        raise UserError(
            f"{path} is a codes file of an older heartmula-rt, which this one no longer reads "
            f"(it reads {SUFFIX} sidecars)"
        )
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise UserError(f"no codes beside {path}: {_ONLY_OURS}")
    return sidecar


def request_record(request: SongRequest) -> dict[str, Any]:
    """A request as the sidecar's `request` object: its texts, every setting by name and, where
    it has one, its `reference` ({"embedding": [512], "strength": s})."""
    record = {
        "tags": request.tags,
        "lyrics": request.lyrics,
        **asdict(request.sampling),
        **asdict(request.codec),
    }
    if request.reference is not None:
        record["reference"] = request.reference.record()
    return record


def request_of_record(fields: dict[str, Any]) -> SongRequest:
    """The request of a sidecar's `request` object (`UserError` if it is not one). An older
    sidecar has no `reference`: its song had none."""
    if not isinstance(fields, dict):
        raise UserError(f"not a JSON object but {type(fields).__name__}")
    settings = dict(fields)
    texts = {name: settings.pop(name, "") for name in ("tags", "lyrics")}
    given = settings.pop("reference", None)
    reference = None if given is None else Reference.of_record(given)
    return SongRequest.of(**texts, reference=reference, **settings)


@dataclass(frozen=True)
class LoraRecord:
    """A LoRA adapter a song was made with, as its sidecar keeps it: its name, where it was
    read from, its files' sha256 and the strength it ran at."""

    name: str
    path: str
    fingerprint: str
    scale: float

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_record(cls, fields: object) -> LoraRecord:
        """A record of a sidecar's `lora` list (`UserError` if it is not one)."""
        if not isinstance(fields, dict) or set(fields) != {"name", "path", "fingerprint", "scale"}:
            raise UserError("a LoRA record is an object of name, path, fingerprint and scale")
        texts = [fields[k] for k in ("name", "path", "fingerprint")]
        scale = fields["scale"]
        if not all(isinstance(t, str) for t in texts) or isinstance(scale, bool):
            raise UserError("a LoRA record's name, path and fingerprint are text")
        if not isinstance(scale, int | float):
            raise UserError(f"a LoRA record's scale is a number, not {scale!r}")
        return cls(*texts, float(scale))


def lm_end(codes: torch.Tensor, sampling: SamplingParams) -> str:
    """How a song's LM part that made `codes` [8, T] to its end ended: its length, or EOS."""
    return "length" if codes.shape[1] >= sampling.max_frames + 1 else "eos"


@dataclass(frozen=True)
class SongCodes:
    """A song's codes [8, T] int64 with what made them: the request (its seed included), how
    its LM part ended (`ENDS`), the checkpoint's fingerprint and the runtime's version; and,
    once its audio is decoded in one piece, the codec's window prefixes float32 [W, 104, 256]
    (`prefixes`, None if not kept: see the module's docstring)."""

    codes: torch.Tensor
    request: SongRequest
    ended: str
    model: str
    runtime: str = __version__
    prefixes: torch.Tensor | None = None
    lora: tuple[LoraRecord, ...] = ()  # the adapters its LM ran (none: the base model)

    def __post_init__(self) -> None:
        if self.ended not in ENDS:
            raise ValueError(f"ended must be one of {', '.join(ENDS)}, not {self.ended!r}")
        if self.codes.ndim != 2:
            raise ValueError(f"codes must be [codebooks, T], not {list(self.codes.shape)}")
        wrong = _wrong_prefixes(self.prefixes, self.codes.shape[1])
        if wrong:
            raise ValueError(wrong)

    @property
    def seed(self) -> int | None:
        return self.request.sampling.seed

    @property
    def frames(self) -> int:
        return self.codes.shape[1]

    def metadata(self) -> dict[str, str]:
        """The file's metadata (see the module's docstring)."""
        return {
            "format": FORMAT,
            "version": str(VERSION),
            "request": json.dumps(request_record(self.request), ensure_ascii=False),
            "seed": json.dumps(self.seed),
            "frames": str(self.frames),
            "ended": self.ended,
            "model": self.model,
            "runtime": self.runtime,
            # Only where there are adapters: a sidecar without them is as it always was.
            **({"lora": json.dumps([r.record() for r in self.lora])} if self.lora else {}),
        }

    def save(self, path: Path) -> None:
        """Write the sidecar to `path` atomically: a temporary file beside it, renamed."""
        path = Path(path)
        tensors = {"codes": self.codes.detach().to("cpu", torch.int64).contiguous()}
        if self.prefixes is not None:
            tensors["prefixes"] = self.prefixes.detach().to("cpu", torch.float32).contiguous()
        data = save(tensors, metadata=self.metadata())
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise

    @classmethod
    def load(cls, path: Path, *, model: str | None = None, force: bool = False) -> SongCodes:
        """The sidecar at `path`, refused in one line (`UserError`) if it is missing, damaged,
        not a sidecar, of an unknown version, or (given `model`, a checkpoint's fingerprint)
        made with another checkpoint, unless `force`."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"codes file {path} does not exist")
        if path.is_dir():
            raise UserError(f"codes file {path} is a folder, not a file")
        damaged = f"{path} is damaged or not a safetensors file"
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                codes = f.get_tensor("codes") if "codes" in names else None
                prefixes = f.get_tensor("prefixes") if "prefixes" in names else None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{damaged} ({e})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a song codes file of heartmula-rt: {_ONLY_OURS}")
        version = meta.get("version")
        if version != str(VERSION):
            newer = version is not None and version.isdigit() and int(version) > VERSION
            made = f"a newer heartmula-rt (version {version})" if newer else f"version {version!r}"
            raise UserError(f"{path} was made by {made}; this one reads version {VERSION}")
        song = _from_file(path, codes, meta, prefixes)
        if model is not None:
            song.check_model(model, path, force=force)
        return song

    def check_model(self, model: str, path: Path | str = "the codes", *, force: bool = False):
        """Refuse codes made with another checkpoint than the one of fingerprint `model`, in
        one line, unless `force`."""
        if self.model != model and not force:
            raise UserError(
                f"{path} was made with another checkpoint ({self.model}, this one is {model}); "
                "--force uses it anyway"
            )


def _wrong_prefixes(prefixes: torch.Tensor | None, frames: int) -> str | None:
    """What is wrong with `prefixes` as the window prefixes of a song of `frames` codes (None:
    nothing, or no prefixes)."""
    if prefixes is None:
        return None
    windows = len(plan_windows(frames)[1])
    if (
        not isinstance(prefixes, torch.Tensor)
        or prefixes.dtype != torch.float32
        or prefixes.ndim != 3
        or prefixes.shape[0] != windows
        or prefixes.shape[1] != PREFIX
        or prefixes.shape[2] == 0
    ):
        got = (
            f"{list(prefixes.shape)} {prefixes.dtype}"
            if isinstance(prefixes, torch.Tensor)
            else type(prefixes).__name__
        )
        return (
            f"its prefixes are {got}, not float32 [{windows}, {PREFIX}, C]: one per codec window "
            f"of its {frames} frames"
        )
    return None


def _from_file(
    path: Path,
    codes: torch.Tensor | None,
    meta: dict[str, str],
    prefixes: torch.Tensor | None = None,
) -> SongCodes:
    """A version-1 sidecar's contents, checked (a `UserError` naming what is wrong)."""
    damaged = f"{path} is damaged"
    missing = [k for k in ("request", "frames", "ended", "model", "runtime") if k not in meta]
    if codes is None or missing:
        raise UserError(f"{damaged}: it has no {'codes' if codes is None else missing[0]}")
    if codes.ndim != 2 or codes.dtype != torch.int64:
        raise UserError(
            f"{damaged}: its codes are {list(codes.shape)} {codes.dtype}, not [8, T] int64"
        )
    if meta["frames"] != str(codes.shape[1]):
        raise UserError(f"{damaged}: it says {meta['frames']} frames but holds {codes.shape[1]}")
    if meta["ended"] not in ENDS:
        raise UserError(f"{damaged}: unknown end {meta['ended']!r}; one of {', '.join(ENDS)}")
    try:
        request = request_of_record(json.loads(meta["request"]))
    except (json.JSONDecodeError, UserError, TypeError) as e:
        raise UserError(f"{damaged}: its request is not a song's ({e})") from None
    wrong = _wrong_prefixes(prefixes, codes.shape[1])
    if wrong:
        raise UserError(f"{damaged}: {wrong}")
    lora: tuple[LoraRecord, ...] = ()
    if "lora" in meta:  # older sidecars have none
        try:
            given = json.loads(meta["lora"])
            if not isinstance(given, list):
                raise UserError("it is not a list")
            lora = tuple(LoraRecord.of_record(r) for r in given)
        except (json.JSONDecodeError, UserError) as e:
            raise UserError(f"{damaged}: its LoRA records are not readable ({e})") from None
    return SongCodes(codes, request, meta["ended"], meta["model"], meta["runtime"], prefixes, lora)


__all__ = [
    "ENDS",
    "FORMAT",
    "VERSION",
    "LoraRecord",
    "SongCodes",
    "find_sidecar",
    "lm_end",
    "sidecar_path",
]
