"""The reference-audio flags gen, extend and regen share (docs/reference-audio.md), and the
one embedding a command makes of them: `--ref-audio FILE [--ref-seconds A-B]` (embedded by
MuQ-MuLan on `--ref-device`, loaded, run once and freed before the LM loads) or
`--ref-embedding FILE` (a file `heartmula-rt embed` wrote), and `--ref-strength S`.

Every flag is checked before any model loads (`check_reference_args`), and the clip is read and
checked before the embedder loads. Nothing here imports torch until an embedding is made.

Test hook: `LOAD_EMBEDDER`, None by default (then `model.reference.load_embedder`), is what
loads the embedder, called as `LOAD_EMBEDDER(device)`; tests set it to give a small random
MuQ-MuLan (or any `model.reference.Embedder`) instead of the published weights.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from heartmula_rt.errors import UserError
from heartmula_rt.request import REFERENCE_DIM, Reference

DEFAULT_DEVICE = "cpu"
# The test hook (see the module's docstring): device → a model.reference.Embedder.
LOAD_EMBEDDER: Callable[[str], Any] | None = None


def add_reference_options(p: argparse.ArgumentParser) -> None:
    """`--ref-audio` or `--ref-embedding` (one of them), `--ref-seconds`, `--ref-strength`,
    `--ref-device`."""
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--ref-audio",
        type=Path,
        default=None,
        help="a reference clip (WAV, FLAC, Ogg, MP3) the song leans towards: its MuQ-MuLan "
        "embedding fills the prompt's reference slot (needs the extra: pip install "
        "'heartmula-rt[ref]'; weights CC BY-NC 4.0)",
    )
    given.add_argument(
        "--ref-embedding",
        type=Path,
        default=None,
        help="a reference embedding instead of a clip: a .safetensors (`heartmula-rt embed`) "
        "or .npy of 512 numbers",
    )
    add_seconds_option(p)
    p.add_argument(
        "--ref-strength",
        type=float,
        default=None,
        help="how strongly the reference steers the song, 0 (not at all) to 1 (the default)",
    )
    add_device_option(p)


def add_seconds_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ref-seconds",
        default=None,
        metavar="A-B",
        help="the part of the clip to embed, in seconds (default 0-30; an end past the clip is "
        "cut to it)",
    )


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ref-device",
        default=DEFAULT_DEVICE,
        help="where MuQ-MuLan embeds the clip: cpu (the default) or cuda[:N]; it is freed "
        "before the LM loads",
    )


def parse_seconds(text: str) -> tuple[float, float]:
    """`--ref-seconds A-B` → (A, B) (model.reference.parse_seconds, imported when asked)."""
    from heartmula_rt.model.reference import parse_seconds as parse

    return parse(text)


def check_device(name: str) -> str:
    """`--ref-device`: cpu or cuda[:N] (whether that GPU exists is said when the embedder
    loads)."""
    kind, _, index = str(name).partition(":")
    if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
        return str(name)
    raise UserError(f"--ref-device is cpu or cuda[:N], not {name!r}")


def check_reference_args(args: argparse.Namespace) -> None:
    """Every reference flag, before anything loads: --ref-seconds only with --ref-audio,
    --ref-strength only with a reference, a strength from 0 to 1, the given file there."""
    audio = getattr(args, "ref_audio", None)
    embedding = getattr(args, "ref_embedding", None)
    if audio is not None and embedding is not None:
        raise UserError("give --ref-audio or --ref-embedding, not both")
    if getattr(args, "ref_seconds", None) is not None:
        if audio is None:
            raise UserError("--ref-seconds is the part of --ref-audio to embed: give --ref-audio")
        parse_seconds(args.ref_seconds)
    strength = getattr(args, "ref_strength", None)
    if strength is not None:
        if audio is None and embedding is None:
            raise UserError("--ref-strength needs --ref-audio or --ref-embedding")
        Reference((0.0,) * REFERENCE_DIM, strength)  # its range, in the request's own words
    if audio is not None:
        check_device(args.ref_device)
        if not Path(audio).is_file():
            raise UserError(f"reference audio {audio} does not exist")
    if embedding is not None and not Path(embedding).is_file():
        raise UserError(f"reference embedding {embedding} does not exist")


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a reference."""
    return getattr(args, "ref_audio", None) is not None or (
        getattr(args, "ref_embedding", None) is not None
    )


def load_embedder(device: str) -> Any:
    """The embedder on `device`: the test hook's, else MuQ-MuLan's published weights."""
    if LOAD_EMBEDDER is not None:
        return LOAD_EMBEDDER(device)
    from heartmula_rt.model.reference import load_embedder as load

    return load(device)


def embed_clip(path: Path, seconds: tuple[float, float] | None, device: str) -> Any:
    """float32 [512] of the clip `path` (its part `seconds`, default the first 30 s): the
    clip is read and checked first, then the embedder is loaded on `device`, run once and
    freed (its GPU memory handed back) before this returns."""
    import torch

    from heartmula_rt.model.reference import DEFAULT_SECONDS, read_reference_audio

    wav = read_reference_audio(Path(path), DEFAULT_SECONDS if seconds is None else seconds)
    if check_device(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--ref-device {device} asked for, but this torch build sees no CUDA GPU")
    embedder = load_embedder(device)
    try:
        return embedder.embed(wav)
    finally:
        del embedder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reference_of_args(args: argparse.Namespace) -> Reference | None:
    """The Reference the command line asks for, None if none (checked first; see
    `check_reference_args`)."""
    check_reference_args(args)
    strength = 1.0 if args.ref_strength is None else args.ref_strength
    if getattr(args, "ref_embedding", None) is not None:
        from heartmula_rt.model.reference import reference_of_file

        return reference_of_file(args.ref_embedding, strength)
    if getattr(args, "ref_audio", None) is None:
        return None
    seconds = None if args.ref_seconds is None else parse_seconds(args.ref_seconds)
    embedding = embed_clip(args.ref_audio, seconds, args.ref_device)
    return Reference(tuple(embedding.tolist()), strength)
