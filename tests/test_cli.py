"""`heartmula-rt` end to end on the tiny fixture, and every bad input the CLI must refuse."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import tqdm

import heartmula_rt
import heartmula_rt.runtime.runner
from heartmula_rt import cli
from heartmula_rt.cli import common
from heartmula_rt.config import default_dtype
from heartmula_rt.model.folder import LM_DIR
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import CodecParams, SamplingParams, SongRequest
from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.runtime.codes import SongCodes
from heartmula_rt.runtime.loader import PipelineConfig, parse_device

SAMPLES_PER_FRAME = 3840  # 48 kHz / 12.5 frames per second


@pytest.fixture(scope="module")
def expected_frames(tiny_ckpt: Path) -> int:
    """How many frames the CLI's settings give, asked of the Python API."""
    pipe = heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")
    frames = pipe.generate_frames("piano,happy", "[verse]\nla la la\n", max_frames=25, seed=7)
    return frames.shape[1]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gen_args(tiny_ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "gen",
        "--model-path",
        str(tiny_ckpt),
        "--tags",
        "piano,happy",
        "--lyrics",
        "[verse]\nla la la\n",
        "--max-seconds",
        "2",
        "--seed",
        "7",
        "-o",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".mp3"])
def test_gen_writes_each_format(
    tiny_ckpt: Path, expected_frames: int, tmp_path: Path, ext: str, capsys
) -> None:
    out = tmp_path / f"song{ext}"
    code, stdout, err = run(gen_args(tiny_ckpt, out), capsys)
    assert code == 0 and stdout == ""  # stdout carries a command's product only
    info = sf.info(str(out))
    assert info.channels == 2 and info.samplerate == 48000
    data, _ = sf.read(str(out))
    assert data.shape == (expected_frames * SAMPLES_PER_FRAME, 2)
    assert "RTF" in err.strip().splitlines()[-1]
    kept = [out.name, "song.codes.safetensors"]  # the song and its codes, no temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_gen_is_reproducible_with_seed(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    args = ["--topk", "20", "--temperature", "0.9"]
    assert run(gen_args(tiny_ckpt, a, *args), capsys)[0] == 0
    assert run(gen_args(tiny_ckpt, b, *args), capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_console_script(tiny_ckpt: Path, tmp_path: Path) -> None:
    exe = shutil.which("heartmula-rt", path=os.path.dirname(sys.executable))
    assert exe, "the heartmula-rt console script is not installed"
    out = tmp_path / "x.wav"
    proc = subprocess.run([exe, *gen_args(tiny_ckpt, out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_ctrl_c_writes_partial(tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C during the LM stage decodes what exists into <stem>.partial<ext>."""
    real_update = tqdm.tqdm.update

    def update(self, n=1):
        # on_frame runs after each frame is made: the 6th call finds 6 frames made
        if self.desc == "LM" and self.n == 5:
            raise KeyboardInterrupt
        return real_update(self, n)

    monkeypatch.setattr(tqdm.tqdm, "update", update)
    out = tmp_path / "song.flac"
    code, _, err = run(gen_args(tiny_ckpt, out), capsys)
    assert code == 130
    partial = tmp_path / "song.partial.flac"
    assert not out.exists() and partial.is_file()
    assert sf.info(str(partial)).frames == 6 * SAMPLES_PER_FRAME
    assert "partial" in err
    kept = SongCodes.load(tmp_path / "song.partial.codes.safetensors")  # its codes beside it
    assert (kept.frames, kept.ended) == (6, "interrupted")


def test_ctrl_c_in_the_codec_keeps_the_frames(
    tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The LM's work survives a Ctrl-C in the codec stage; `decode` finishes the song."""
    whole = tmp_path / "whole.wav"
    assert run(gen_args(tiny_ckpt, whole), capsys)[0] == 0
    real_update = tqdm.tqdm.update

    def update(self, n=1):
        if self.desc == "codec":
            raise KeyboardInterrupt
        return real_update(self, n)

    out = tmp_path / "song.wav"
    with monkeypatch.context() as m:
        m.setattr(tqdm.tqdm, "update", update)
        code, _, err = run(gen_args(tiny_ckpt, out), capsys)
    kept = tmp_path / "song.codes.safetensors"
    assert code == 130 and not out.exists() and kept.is_file()
    assert f"frames are saved in {kept}" in err and "heartmula-rt decode" in err
    code, _, err = run(
        ["decode", str(kept), "--model-path", str(tiny_ckpt), "-o", str(out)], capsys
    )
    assert code == 0, err
    assert out.read_bytes() == whole.read_bytes() and kept.is_file()


def test_a_failed_codec_keeps_the_frames(tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise heartmula_rt.UserError("could not write song.wav (No space left on device)")

    monkeypatch.setattr(heartmula_rt.runtime.runner, "write_audio", disk_full)
    code, _, err = run(gen_args(tiny_ckpt, tmp_path / "song.wav"), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("heartmula-rt: error: could not write song.wav")
    assert last.endswith(f"frames are saved in {tmp_path / 'song.codes.safetensors'}")
    assert (tmp_path / "song.codes.safetensors").is_file() and not (tmp_path / "song.wav").exists()


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"heartmula-rt {heartmula_rt.__version__}"


def test_stray_codec_ids_noted_once_per_song(tiny_ckpt: Path, tmp_path: Path, capsys, caplog):
    """The library says it at debug level only; the CLI once per song (here `decode`'s)."""
    pipe = heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")
    codes = torch.randint(0, 1024, (8, 30), generator=torch.Generator().manual_seed(0))
    codes[3, 5] = codes[6, 7] = 1025
    with caplog.at_level(logging.INFO):
        pipe.decode_frames(codes, CodecParams(num_steps=1))
    assert not caplog.records
    request = SongRequest.of("piano", seed=0)
    SongCodes(codes, request, "eos", pipe.fingerprint).save(tmp_path / "song.codes.safetensors")
    args = ["decode", str(tmp_path / "song.codes.safetensors"), "--model-path", str(tiny_ckpt)]
    code, _, err = run([*args, "-o", str(tmp_path / "song.wav")], capsys)
    assert code == 0 and err.count("replaced 2 codec ids ≥ 1024") == 1


def test_broken_pipe_is_an_error(tiny_ckpt: Path) -> None:
    """`-o -` into a pipe whose reader has gone: said, and exit 141 as a Unix tool would."""
    exe = shutil.which("heartmula-rt", path=os.path.dirname(sys.executable))
    closed = subprocess.Popen(
        [sys.executable, "-c", "import os, time; os.close(0); time.sleep(600)"],
        stdin=subprocess.PIPE,
    )
    try:
        args = gen_args(tiny_ckpt, Path("-"))
        proc = subprocess.run([exe, *args], stdout=closed.stdin, stderr=subprocess.PIPE, text=True)
    finally:
        closed.kill()
    assert proc.returncode == 141, proc.stderr
    assert "broken pipe" in proc.stderr.strip().splitlines()[-1]


# --- bad input: one line on stderr, exit 2, no traceback, no output file -----------------------


def bad_model(tmp_path: Path, fixtures_dir: Path, damage) -> Path:
    root = Path(shutil.copytree(fixtures_dir / "tiny-public" / "ckpt", tmp_path / "ckpt"))
    damage(root)
    return root


def not_utf8(tmp_path: Path) -> str:
    path = tmp_path / "lyrics.txt"
    path.write_bytes(b"caf\xe9 au lait\n")
    return str(path)


BAD_INPUTS = {
    "missing model folder": (lambda t, f: ["--model-path", str(t / "nope")], "does not exist"),
    "model path is a file": (
        lambda t, f: ["--model-path", str(f / "tiny-public" / "ckpt" / "tokenizer.json")],
        "tokenizer.json is a file; give the checkpoint folder",
    ),
    "missing LM file": (
        lambda t, f: [
            "--model-path",
            str(bad_model(t, f, lambda r: (r / LM_DIR / "model.safetensors").unlink())),
        ],
        "no model.safetensors",
    ),
    "truncated safetensors": (
        lambda t, f: [
            "--model-path",
            str(
                bad_model(
                    t,
                    f,
                    lambda r: (r / LM_DIR / "model.safetensors").write_bytes(
                        (f / "tiny-public/ckpt" / LM_DIR / "model.safetensors").read_bytes()[
                            :100_000
                        ]
                    ),
                )
            ),
        ],
        "damaged or truncated",
    ),
    "wrong shape": (
        lambda t, f: [
            "--model-path",
            str(
                bad_model(
                    t,
                    f,
                    lambda r: (r / LM_DIR / "config.json").write_text(
                        (r / LM_DIR / "config.json")
                        .read_text()
                        .replace('"intermediate_dim": 160', '"intermediate_dim": 96')
                    ),
                )
            ),
        ],
        "has shape",
    ),
    "unknown flavor": (
        lambda t, f: [
            "--model-path",
            str(
                bad_model(
                    t,
                    f,
                    lambda r: (r / LM_DIR / "config.json").write_text(
                        '{"backbone_flavor": "llama-1T", "decoder_flavor": "llama-300M"}'
                    ),
                )
            ),
        ],
        "unknown model flavor",
    ),
    "empty tags and lyrics": (lambda t, f: ["--tags", " ", "--lyrics", ""], "both empty"),
    "topk 0": (lambda t, f: ["--topk", "0"], "topk"),
    "temperature 0": (lambda t, f: ["--temperature", "0"], "temperature"),
    "negative cfg": (lambda t, f: ["--cfg-scale", "-1"], "cfg"),
    "prompt too long": (lambda t, f: ["--lyrics", "la " * 2000], "too long"),
    "too many frames": (lambda t, f: ["--max-seconds", "100"], "too long"),
    "non-UTF-8 lyrics file": (lambda t, f: ["--lyrics", not_utf8(t)], "UTF-8"),
    "infinite length": (lambda t, f: ["--max-seconds", "inf"], "max_seconds"),
    "infinite temperature": (lambda t, f: ["--temperature", "inf"], "temperature"),
    "seed out of range": (lambda t, f: ["--seed", str(2**64)], "seed"),
    "non-numeric topk": (lambda t, f: ["--topk", "many"], "invalid int"),
    "unknown dtype": (lambda t, f: ["--dtype", "float8"], "invalid choice"),
    "unknown device": (lambda t, f: ["--device", "tpu"], "device"),
    "zero threads": (
        lambda t, f: ["--threads", "0"],
        "threads must be a whole number of at least 1",
    ),
}


def exit_code(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case: str, tiny_ckpt: Path, fixtures_dir: Path, tmp_path: Path, capfd) -> None:
    make_args, message = BAD_INPUTS[case]
    out = tmp_path / "out" / "song.wav"
    out.parent.mkdir()
    # argparse lets a later option win: the bad value overrides the good one in gen_args
    code = exit_code(gen_args(tiny_ckpt, out) + make_args(tmp_path, fixtures_dir))
    assert_refused(code, capfd.readouterr().err, message, out)


def test_error_after_loading_is_the_only_line(tiny_ckpt: Path, tmp_path: Path, capfd) -> None:
    """The default 240 s does not fit the fixture's context: refused once the LM is loaded,
    with the longest length that fits, as the one line of stderr."""
    args = gen_args(tiny_ckpt, tmp_path / "song.wav")
    del args[args.index("--max-seconds") : args.index("--max-seconds") + 2]
    assert exit_code(args) == 2
    (line,) = capfd.readouterr().err.strip().splitlines()
    longest = re.search(r"the longest song that fits is (\d+) frames \(([\d.]+) s", line)
    assert longest, line
    frames, seconds = int(longest[1]), float(longest[2])
    assert seconds == pytest.approx(frames * 0.08)
    assert exit_code([*args, "--max-seconds", str(seconds)]) == 0  # and it does fit
    assert exit_code([*args, "--max-seconds", str(seconds + 0.1)]) == 2  # one frame more


def assert_refused(code: int, err: str, message: str, out: Path) -> None:
    """Exit 2, one error line holding `message` and ending stderr, no traceback, no output."""
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []


def test_non_finite_weights_refused(
    fixtures_dir: Path, tmp_path: Path, overwrite_tensor_data, capfd
) -> None:
    root = bad_model(tmp_path, fixtures_dir, lambda r: None)
    shard = root / LM_DIR / "model.safetensors"
    overwrite_tensor_data(shard, "audio_head", b"\xff" * 4000)  # 1000 float32 NaNs
    out = tmp_path / "out" / "song.wav"
    out.parent.mkdir()
    code = exit_code(gen_args(root, out))
    message = f"{shard}: tensor 'audio_head' holds 1000 non-finite values (NaN or Inf)"
    assert_refused(code, capfd.readouterr().err, message, out)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("song.aiff", "unknown output extension"),
        ("missing/song.wav", "does not exist"),
        ("song", "unknown output extension"),
    ],
)
def test_bad_output_path_checked_before_loading(tmp_path: Path, name: str, message: str, capfd):
    # a model path that does not exist: the output check must come first
    code = exit_code(gen_args(tmp_path / "no-model", tmp_path / name))
    err = capfd.readouterr().err
    assert code == 2 and message in err and "no-model" not in err


def test_unwritable_output(tmp_path: Path, capfd) -> None:
    # /proc refuses new files even to root, which os.access alone would not tell
    code = exit_code(gen_args(tmp_path / "no-model", Path("/proc/song.wav")))
    assert code == 2 and "its folder /proc takes no new files" in capfd.readouterr().err


def test_download_offline_says_how(tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = exit_code(["download", "--model-path", str(tmp_path / "weights")])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "could not download HeartMuLa/HeartMuLaGen" in err[0] and "hf download" in err[0]


def test_one_device_default_for_the_api_and_the_cli() -> None:
    """`auto` everywhere: a GPU user calling load_pipeline(path) gets the GPU, as gen does."""
    api = PipelineConfig.device  # the default load_pipeline's options take
    for command in (["gen", "-o", "x.wav"], ["decode", "x.codes.safetensors", "-o", "x.wav"]):
        assert cli.build_parser().parse_args(command).device == api == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert parse_device("auto").type == expected
    assert default_dtype(parse_device("auto")) == ("bfloat16" if expected == "cuda" else "float32")


def test_the_lms_device_by_either_name() -> None:
    """--lm-device is --device (the LM's; the codec's too unless --codec-device)."""
    for command in ("gen", "serve", "bench"):
        for flag in ("--device", "--lm-device"):
            args = cli.build_parser().parse_args([command, flag, "cuda:1", "--codec-device", "cpu"])
            assert (args.device, args.codec_device) == ("cuda:1", "cpu")


def test_song_defaults_live_in_the_request(tiny_ckpt: Path) -> None:
    """gen leaves every song setting it is not given to `SamplingParams`; load_pipeline's
    options to `PipelineConfig`."""
    args = cli.build_parser().parse_args(["gen", "-o", "x.wav", "--tags", "piano"])
    assert common.song_request(args) == SongRequest("piano")
    assert common.song_request(args).sampling == SamplingParams()
    given = cli.build_parser().parse_args(["gen", "-o", "x.wav", "--tags", "a", "--topk", "3"])
    assert common.song_request(given).sampling == SamplingParams(topk=3)
    pipe = heartmula_rt.load_pipeline(tiny_ckpt)
    assert pipe.config == PipelineConfig(model_path=tiny_ckpt)


# --- text arguments: a file's name reads the file, anything else is the text ------------------


def test_text_argument_from_file_stdin_or_value(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "lyrics.txt"
    path.write_text("[Verse]\nÉté, ça va\n", encoding="utf-8")
    assert common.read_text_arg(str(path), "--lyrics") == "[Verse]\nÉté, ça va\n"
    assert common.read_text_arg("[Verse]\nplain text\n", "--lyrics") == "[Verse]\nplain text\n"
    assert common.read_text_arg(str(tmp_path), "--lyrics") == str(tmp_path)  # a folder: text
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffpiano".encode())
    assert common.read_text_arg(str(bom), "--tags") == "piano"
    monkeypatch.setattr(sys, "stdin", io.StringIO("[chorus]\nfrom a pipe\n"))
    assert common.read_text_arg("-", "--lyrics") == "[chorus]\nfrom a pipe\n"


def test_text_argument_that_names_no_file_is_sung_as_text(tiny_ckpt: Path, tmp_path: Path) -> None:
    """`--lyrics lyrics.txt` with no such file used to be refused as a missing file; it is text,
    through the CLI as through the API."""
    for value in ("lyrics.txt", "song.LRC", str(tmp_path / "notes.md")):
        assert common.read_text_arg(value, "--lyrics") == value
    out = tmp_path / "song.wav"
    args = ["gen", "--model-path", str(tiny_ckpt), "--tags", "piano", "--lyrics", "lyrics.txt"]
    assert cli.main([*args, "--max-seconds", "1", "--seed", "3", "-o", str(out)]) == 0
    pipe = heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")
    wav = pipe.generate("piano", "lyrics.txt", max_seconds=1, seed=3)
    write_audio(tmp_path / "api.wav", wav, pipe.sample_rate)
    assert out.read_bytes() == (tmp_path / "api.wav").read_bytes()


def test_a_file_path_given_to_the_api_is_text(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The API never opens what a string names: lyrics that are an existing file's path are
    sung as that path's characters, not as the file's contents."""
    path = tmp_path / "lyrics.txt"
    path.write_text("[verse]\nsecret contents\n")
    pipe = heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")
    as_given = pipe.prompt(SongRequest.of("piano", str(path), max_frames=5))
    literal = build_prompt(pipe.tokenizer, pipe.gen_config, "piano", str(path))
    contents = build_prompt(pipe.tokenizer, pipe.gen_config, "piano", path.read_text())
    assert torch.equal(as_given.ids, literal.ids)
    assert not torch.equal(as_given.ids, contents.ids)
    frames = pipe.generate_frames("piano", str(path), max_frames=5, seed=1, topk=1)
    assert torch.equal(
        frames,
        pipe.generate_frames(
            SongRequest("piano", str(path)).with_settings(max_frames=5, seed=1, topk=1)
        ),
    )


def test_only_one_text_from_stdin(tiny_ckpt: Path, tmp_path: Path, capfd) -> None:
    args = ["gen", "--model-path", str(tiny_ckpt), "--tags", "-", "--lyrics", "-"]
    assert exit_code([*args, "-o", str(tmp_path / "x.wav")]) == 2
    assert "only one of --tags and --lyrics can read stdin" in capfd.readouterr().err
