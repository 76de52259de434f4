"""`heartmula-rt decode`: a song's audio again from its sidecar (runtime/codes.py): its codes,
seed and codec settings, checked against the checkpoint's fingerprint (unless --force) before
any model loads, decoded through the song runner's codec stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from heartmula_rt.cli import common
from heartmula_rt.config import CODEC_PRECISIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    dec = sub.add_parser(
        "decode", help="a song's audio again from its codes (the .codes.safetensors beside it)"
    )
    dec.add_argument(
        "codes",
        type=Path,
        help="a song's <stem>.codes.safetensors sidecar, or its audio file (the sidecar beside "
        "it is read)",
    )
    dec.add_argument(
        "--force",
        action="store_true",
        help="decode codes made with another checkpoint than --model-path's",
    )
    common.add_model_path(dec)
    dec.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    dec.add_argument(
        "--codec-dtype", choices=list(CODEC_PRECISIONS), default=None, help="as for gen"
    )
    dec.add_argument("-o", "--output", type=Path, required=True, help="output audio file")
    dec.set_defaults(func=cmd_decode)



def cmd_decode(args: argparse.Namespace) -> int:
    from heartmula_rt.cli.edit import decode_song
    from heartmula_rt.model import folder
    from heartmula_rt.runtime.audio import check_output_path
    from heartmula_rt.runtime.codes import SongCodes, find_sidecar
    from heartmula_rt.runtime.loader import PipelineConfig, load_pipeline

    out = check_output_path(args.output)
    sidecar = find_sidecar(args.codes)
    song = SongCodes.load(sidecar)
    config = PipelineConfig(
        model_path=common.model_path(args.model_path),
        device=args.device,
        codec_dtype=args.codec_dtype,
        engine="plain",
    )
    common.fetch_weights(config.model_path, args.model_path)
    folder.check_model_path(config.model_path)
    song.check_model(folder.fingerprint(config.model_path), sidecar, force=args.force)
    # The LM is loaded too: a pipeline is both models.
    pipe = load_pipeline(config)
    # The song's codes beside its audio (its own sidecar, or a copy beside another output),
    # with the codec's window prefixes of this audio.
    seconds = decode_song(pipe, song, out)
    print(f"wrote {out}: {seconds:.1f} s of audio from {sidecar}", file=sys.stderr)
    return 0
