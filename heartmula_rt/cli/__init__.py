"""`heartmula-rt`: a thin command line over the Python API — this dispatcher and one module per
command (gen, extend/resume/regen, decode, plan, bench, serve, download, embed), each parsing its
flags and calling the library; the flag groups they share are in common.py (reference.py's for
reference audio).

Every user mistake is one line on stderr and exit code 2; nothing heavy (torch) is loaded before
the inputs and the output path have been checked.
"""

from __future__ import annotations

import argparse
import sys

from heartmula_rt import __version__
from heartmula_rt.cli import bench, decode, download, edit, embed, gen, plan, serve
from heartmula_rt.cli.common import EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser
from heartmula_rt.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="heartmula-rt", description="Fast HeartMuLa music generation.")
    parser.add_argument("--version", action="version", version=f"heartmula-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (gen, plan, decode, download, bench, serve, embed):
        command.add_parser(sub)
    edit.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"heartmula-rt: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
