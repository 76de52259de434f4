"""The command line run in the test's own process (tests/test_edit.py and
tests/test_reference_wiring.py), and a song cut short and resumed through it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from heartmula_rt import cli
from heartmula_rt.runtime.codes import SongCodes


def run_cli(args: list, capsys) -> tuple[int, str]:
    """`heartmula-rt ARGS…`: its exit code (argparse's own refusals too) and its stderr."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own refusals
        code = int(e.code)
    return code, capsys.readouterr().err


def resume_cut(whole: SongCodes, folder: Path, model: list, capsys) -> tuple[SongCodes, SongCodes]:
    """`whole` cut after its 9th frame as if interrupted (folder/cut.codes.safetensors), then
    `heartmula-rt resume` of it with the `model` flags: the cut song and the resumed one."""
    cut = replace(whole, codes=whole.codes[:, :9], ended="interrupted")
    cut.save(folder / "cut.codes.safetensors")
    code, err = run_cli(["resume", folder / "cut.codes.safetensors", *model], capsys)
    assert code == 0, err
    return cut, SongCodes.load(folder / "cut-resumed.codes.safetensors")
