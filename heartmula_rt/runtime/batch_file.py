"""`heartmula-rt gen --batch-file songs.jsonl`: one song per line, read and checked whole before
any model loads.

Each line is a JSON object: `tags` and `lyrics` (text, never file names), `output` (the audio
file, relative to the current folder), and any of `seconds`, `seed`, `topk`, `temperature`,
`cfg_scale`, `num_steps`, `guidance_scale`; what a line leaves out comes from the command line's
flags, then the request's defaults. Blank lines are skipped. A bad line is one `UserError`
naming the file and its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heartmula_rt.errors import UserError
from heartmula_rt.request import SongRequest, request_from_json


@dataclass(frozen=True)
class BatchSong:
    """One song of a batch: what to make and where it goes; `where` names it in messages."""

    request: SongRequest
    output: Path
    where: str


def read_batch_file(path: Path, defaults: dict[str, Any]) -> list[BatchSong]:
    """Every song of `path`, `defaults` (`SongRequest.of` settings) under each line's own."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"--batch-file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--batch-file {path} is not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read --batch-file {path} ({e.strerror})") from None
    songs = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path} line {number}"
            try:
                songs.append(_song(line, where, defaults))
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
    if not songs:
        raise UserError(f"--batch-file {path} holds no song (one JSON object per line)")
    return songs


def _song(line: str, where: str, defaults: dict[str, Any]) -> BatchSong:
    try:
        fields = json.loads(line)
    except ValueError as e:
        raise UserError(f"not a JSON object ({e})") from None
    if isinstance(fields, dict) and not _is_text(fields.get("output")):
        raise UserError('no output: give each song an "output" file name')
    request, extra = request_from_json(fields, defaults, also=("output",))
    return BatchSong(request, Path(extra["output"]), where)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())
