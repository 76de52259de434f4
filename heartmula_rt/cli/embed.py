"""`heartmula-rt embed FILE -o ref.safetensors`: a reference clip's MuQ-MuLan embedding kept in a
file (docs/reference-audio.md), for `--ref-embedding` on another run or another machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from heartmula_rt.cli import reference
from heartmula_rt.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a reference clip with MuQ-MuLan into a file for --ref-embedding (needs "
        "pip install 'heartmula-rt[ref]'; weights CC BY-NC 4.0)",
    )
    p.add_argument("audio", type=Path, help="the clip: WAV, FLAC, Ogg or MP3")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="the embedding file: .safetensors (with the model and range as metadata) or .npy",
    )
    reference.add_seconds_option(p)
    reference.add_device_option(p)
    p.set_defaults(func=cmd_embed)


def check_embedding_output(path: Path) -> Path:
    """`-o`: a .safetensors or .npy name in a folder that exists, not a folder itself."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".npy"):
        raise UserError(f"an embedding is written as .safetensors or .npy, not {path.name}")
    if not path.parent.is_dir():
        raise UserError(f"output folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"output path {path} is a folder")
    return path


def cmd_embed(args: argparse.Namespace) -> int:
    out = check_embedding_output(args.output)
    args.ref_audio, args.ref_embedding, args.ref_strength = args.audio, None, None
    reference.check_reference_args(args)
    seconds = None if args.ref_seconds is None else reference.parse_seconds(args.ref_seconds)
    embedding = reference.embed_clip(args.audio, seconds, args.ref_device)

    from heartmula_rt.model.reference import DEFAULT_SECONDS, write_embedding

    a, b = DEFAULT_SECONDS if seconds is None else seconds
    write_embedding(out, embedding, source=Path(args.audio).name, seconds=f"{a:g}-{b:g}")
    print(f"wrote {out}: the embedding of {args.audio.name}, {a:g}-{b:g} s", file=sys.stderr)
    return 0
