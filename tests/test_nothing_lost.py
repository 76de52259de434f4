"""Issue #31, "Nothing lost, nobody in": the CLI's and the Python API's share — sidecars that
would collide, a full disk under stdout, a sidecar or an audio file on a full disk, times and
seeds given as nonsense, bench's output, a typo'd lyrics file, resuming a Ctrl-C'd song, and one
type for the Python API's audio. Faults are injected where a real one is impractical: a file
object that fails with ENOSPC; /dev/full and RLIMIT_FSIZE where they are real."""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import tqdm

import heartmula_rt
import heartmula_rt.runtime.codes
from heartmula_rt import cli
from heartmula_rt.errors import UserError
from heartmula_rt.request import SongRequest
from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.runtime.codes import SongCodes

SAMPLES_PER_FRAME = 3840
MAIN = "import sys; from heartmula_rt.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


def run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own errors
        code = int(e.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gen_args(ckpt: Path, *extra: str) -> list[str]:
    return ["gen", "--model-path", str(ckpt), "--tags", "piano,happy", "--lyrics",
            "[verse]\nla la la\n", "--max-seconds", "2", "--seed", "7", *extra]  # fmt: skip


def one_line(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, room: int = 0) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        taken = min(self.room, len(data))
        self.room -= taken
        return taken


# --- item 1: two outputs whose sidecars collide ---------------------------------------------


def test_outputs_whose_sidecars_collide_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [{"tags": "rock", "output": "x.wav"}, {"tags": "pop", "output": "x.flac"}]
    (tmp_path / "songs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["gen", "--model-path", str(tmp_path / "none"), "--batch-file", "songs.jsonl"]
    code, _, err = run(args, capsys)
    one_line(code, err, "would both keep their codes in x.codes.safetensors")
    assert "line 1 (x.wav) and songs.jsonl line 2 (x.flac)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["songs.jsonl"]


# --- item 2: stdout that cannot be written --------------------------------------------------


def _gen_to_stdout(ckpt: Path, stdout, cwd: Path, limit: int | None = None):
    def limited() -> None:  # a file size limit: past it, writes fail (EFBIG) as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", MAIN, *gen_args(ckpt, "-o", "-")],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        preexec_fn=None if limit is None else limited,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def test_stdout_on_a_full_device_is_one_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    with open("/dev/full", "wb") as full:
        proc = _gen_to_stdout(tiny_ckpt, full, tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        last == "heartmula-rt: error: could not write stdout: no space left on device; "
        "nothing was made"
    )


def test_a_truncated_stdout_is_an_error_and_the_codes_are_kept(tiny_ckpt: Path, tmp_path: Path):
    out = tmp_path / "song.wav"
    with open(out, "wb") as f:
        proc = _gen_to_stdout(tiny_ckpt, f, tmp_path, limit=50_000)
    assert out.stat().st_size == 50_000  # what the disk took
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "wrote stdout" not in proc.stderr
    assert last.startswith("heartmula-rt: error: could not write stdout: file too large;")
    # stdout has no path: the codes go to the current folder, named in the line.
    (kept,) = tmp_path.glob("heartmula-7*.codes.safetensors")
    assert f"kept in {kept.name}" in last and "heartmula-rt decode" in last
    codes = SongCodes.load(kept)
    assert codes.seed == 7 and codes.frames > 0


# --- items 12 and 17: the sidecar or the audio on a full disk -------------------------------


def _full_folder(monkeypatch, module, folder: Path) -> None:
    """`module`'s files opened for writing in `folder` fail as on a full disk."""
    real_open = open

    def open_(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).parent == folder:
            return FullDisk()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", open_, raising=False)


def test_a_sidecar_on_a_full_disk_is_kept_elsewhere(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    songs = tmp_path / "songs"
    songs.mkdir()
    _full_folder(monkeypatch, heartmula_rt.runtime.codes, songs)
    code, _, err = run(gen_args(tiny_ckpt, "-o", str(songs / "song.wav")), capsys)
    assert code == 0 and "Traceback" not in err, err
    (kept,) = (tmp_path / "elsewhere").glob("*song.codes.safetensors")
    assert f"could not write {songs / 'song.codes.safetensors'}: no space left on device" in err
    assert f"the song's codes are kept in {kept}" in err
    frames = SongCodes.load(kept).frames
    assert sf.info(str(songs / "song.wav")).frames == frames * SAMPLES_PER_FRAME


def test_a_sidecar_kept_nowhere_says_how_to_make_it_again(tiny_ckpt, tmp_path, capsys, monkeypatch):
    def full(self, path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SongCodes, "save", full)
    code, _, err = run(gen_args(tiny_ckpt, "-o", str(tmp_path / "song.wav")), capsys)
    assert code == 0 and "Traceback" not in err, err
    note = next(line for line in err.splitlines() if "could not keep the song's codes" in line)
    assert "no space left on device" in note and "the same seed (7)" in note


def test_audio_on_a_full_disk_says_so(tmp_path: Path, monkeypatch) -> None:
    import heartmula_rt.runtime.audio as audio

    _full_folder(monkeypatch, audio, tmp_path)
    with pytest.raises(UserError) as e:
        write_audio(tmp_path / "song.flac", torch.zeros(2, 48000))
    assert (
        str(e.value) == f"could not write the audio: no space left on device "
        f"({tmp_path / 'song.flac'})"
    )  # not libsndfile's "System error."
    assert list(tmp_path.iterdir()) == []


def test_audio_past_a_file_size_limit_says_so(tmp_path: Path) -> None:
    code = (
        "import resource, sys, torch\n"
        "from heartmula_rt.errors import UserError\n"
        "from heartmula_rt.runtime.audio import write_audio\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "try:\n"
        f"    write_audio({str(tmp_path / 'song.wav')!r}, torch.zeros(2, 48000))\n"
        "except UserError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    path = tmp_path / "song.wav"
    assert proc.stdout.strip() == f"could not write the audio: file too large ({path})"


# --- items 9 and 16: times given as nonsense, refused naming the flag -------------------------


@pytest.fixture
def song_file(tmp_path: Path) -> Path:
    request = SongRequest.of("piano", "la", max_frames=30, seed=1)
    codes = torch.randint(0, 1000, (8, 31))
    path = tmp_path / "song.codes.safetensors"
    SongCodes(codes, request, "interrupted", "any").save(path)
    return path


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["regen", "--from", "nan"], "--from must be a number of seconds"),
        (["regen", "--from", "inf"], "--from must be a number of seconds"),
        (["regen", "--from", "1e400"], "--from must be a number of seconds"),
        (["regen", "--from", "1", "--to", "nan"], "--to must be a number of seconds"),
        (["extend", "--seconds", "-2"], "--seconds must be a number of seconds above 0"),
        (["extend", "--seconds", "nan"], "--seconds must be a number of seconds above 0"),
        (["extend", "--seconds", "2", "--context-seconds", "-5"], "--context-seconds must be"),
    ],
)
def test_bad_times_name_their_flag(command, message, song_file, tmp_path, capsys) -> None:
    name, *flags = command
    args = [name, str(song_file), "--model-path", str(tmp_path / "none"), *flags]
    code, _, err = run(args, capsys)
    one_line(code, err, message)
    assert "max_seconds" not in err


# --- item 18: the Python API's inputs -------------------------------------------------------


@pytest.mark.parametrize("source", [123, None, b"/tmp/model", 1.5])
def test_load_pipeline_of_a_non_path_is_a_user_error(source) -> None:
    with pytest.raises(UserError, match="load_pipeline takes a checkpoint folder"):
        heartmula_rt.load_pipeline(source)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_decode_seeds_follow_the_clis_rule(pipe, seed) -> None:
    codes = torch.randint(0, 1000, (8, 5))
    with pytest.raises(UserError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        pipe.decode_frames(codes, seed=seed)


def test_check_length_names_the_long_part(pipe) -> None:
    from heartmula_rt.runtime.decode import check_length

    prompt = pipe.prompt(SongRequest.of("piano " * 3000, "la", max_frames=1), fit=False)
    with pytest.raises(UserError, match="the tags are too long") as e:
        check_length(pipe.lm, prompt, 1)
    assert "lyrics" not in str(e.value).split(";")[-1]


# --- item 23: bench's output ----------------------------------------------------------------


def test_bench_writes_nothing_but_its_table_to_stdout_or_here(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["bench", "--synthetic", "tiny", "--device", "cpu", "--engines", "plain",
            "--max-seconds", "0.4", "--repeats", "1", "--warmup", "0", "--no-codec"]  # fmt: skip
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "wrote" not in out and "wrote" in err
    results = tmp_path / "cache" / "heartmula-rt" / "bench-results"
    assert f"results go to {results}" in err
    assert len(list(results.glob("*.json"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no ./benchmarks/results


# --- item 25: a typo'd file name, and resuming a Ctrl-C'd song ---------------------------------


def test_a_text_that_looks_like_a_missing_file_is_noted(capsys) -> None:
    from heartmula_rt.cli.common import read_text_arg

    assert read_text_arg("lyrcs.txt", "--lyrics") == "lyrcs.txt"
    assert "note: --lyrics 'lyrcs.txt' names no file here" in capsys.readouterr().err
    for text in ("piano,happy", "rock/pop", "[verse]\nla la la\n", "la la."):
        assert read_text_arg(text, "--tags") == text
        assert capsys.readouterr().err == ""


def test_ctrl_c_says_resume_and_resume_writes_the_songs_own_name(
    tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    real_update = tqdm.tqdm.update

    def update(self, n=1):
        if self.desc == "LM" and self.n == 5:
            raise KeyboardInterrupt
        return real_update(self, n)

    out = tmp_path / "song.wav"
    args = gen_args(tiny_ckpt, "-o", str(out), "--max-seconds", "4")
    with monkeypatch.context() as m:
        m.setattr(tqdm.tqdm, "update", update)
        code, _, err = run(args, capsys)
    partial = tmp_path / "song.partial.wav"
    assert code == 130 and partial.is_file()
    assert f"`heartmula-rt resume {partial}`" in err
    code, _, err = run(["resume", str(partial), "--model-path", str(tiny_ckpt)], capsys)
    assert code == 0, err
    assert out.is_file() and not (tmp_path / "song.partial-resumed.wav").exists()
    whole = tmp_path / "whole.wav"
    assert run(gen_args(tiny_ckpt, "-o", str(whole), "--max-seconds", "4"), capsys)[0] == 0
    assert torch.equal(
        SongCodes.load(tmp_path / "song.codes.safetensors").codes,
        SongCodes.load(tmp_path / "whole.codes.safetensors").codes,
    )


# --- item 26: one type for the Python API's audio, and saving it --------------------------------


def test_the_api_gives_one_type_and_saves_it(pipe, tmp_path: Path) -> None:
    kwargs = {"max_seconds": 1, "seed": 3, "num_steps": 1}
    wav = pipe.generate("piano", "la la", **kwargs)
    pieces = list(pipe.stream("piano", "la la", **kwargs))
    assert isinstance(wav, torch.Tensor)
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.float32 for p in pieces)
    assert torch.equal(torch.cat(pieces, dim=1), wav)
    assert pipe.save(wav, tmp_path / "song.flac") >= 0
    written, rate = sf.read(str(tmp_path / "song.flac"), dtype="float32")
    assert rate == 48000 and written.shape == (wav.shape[1], 2)
    pipe.save(wav.numpy(), str(tmp_path / "again.wav"))  # a numpy array and a str will do
    assert np.isfinite(sf.read(str(tmp_path / "again.wav"))[0]).all()
