"""`heartmula-rt download`: the official weights from the Hugging Face hub."""

from __future__ import annotations

import argparse

from heartmula_rt.cli import common
from heartmula_rt.config import default_model_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    dl = sub.add_parser("download", help="fetch the official weights from the Hugging Face hub")
    common.add_model_path(dl, f"where to put them (default: {default_model_path()})")
    dl.set_defaults(func=cmd_download)



def cmd_download(args: argparse.Namespace) -> int:
    from heartmula_rt.model import folder

    root = args.model_path or default_model_path()
    folder.download(root)
    folder.check_model_path(root)
    print(f"weights are in {root}")
    return 0


