"""`heartmula-rt gen --count N` and `--batch-file`: many songs in one batch, end to end on the
tiny fixture, against the Python API; every bad line refused before a model loads; Ctrl-C in
either stage keeps every song's work."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import soundfile as sf
import torch
import tqdm

import heartmula_rt
import heartmula_rt.runtime.pipeline
from heartmula_rt import cli
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.request import SongRequest
from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.runtime.codes import SongCodes
from heartmula_rt.runtime.runner import SongRunner

SAMPLES_PER_FRAME = 3840
TAGS, LYRICS = "piano,happy", "[verse]\nla la la\n"


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


def _as_written(pipe, wav: torch.Tensor, path: Path) -> bytes:
    path.parent.mkdir(exist_ok=True)
    write_audio(path, wav, pipe.sample_rate)
    return path.read_bytes()


def test_count_makes_takes_as_the_api_does(pipe, tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "song.wav"
    args = ["gen", "--model-path", str(tiny_ckpt), "--tags", TAGS, "--lyrics", LYRICS]
    args += ["--max-seconds", "1", "--topk", "20", "--seed", "5", "--count", "3"]
    code, stdout, err = run([*args, "-o", str(out)], capsys)
    assert code == 0 and stdout == "", err
    names = sorted(p.name for p in tmp_path.iterdir())
    kept = [f"song-{i}{ext}" for i in (1, 2, 3) for ext in (".codes.safetensors", ".wav")]
    assert names == kept  # each song with its codes, nothing else
    for i in (1, 2, 3):
        assert f"take {i}: seed {4 + i}" in err
    assert "wrote 3 songs" in err.strip().splitlines()[-1]

    requests = [
        SongRequest.of(TAGS, LYRICS, max_seconds=1, topk=20, seed=seed) for seed in (5, 6, 7)
    ]
    frames = pipe.generate_frames_batch(requests, rows=6)  # 3 guided songs at once
    made = []
    for i, (request, codes) in enumerate(zip(requests, frames, strict=True), start=1):
        wav = pipe.decode_frames(codes, request.codec, seed=request.sampling.seed)
        expected = _as_written(pipe, wav, tmp_path / "api" / f"{i}.wav")
        assert (tmp_path / f"song-{i}.wav").read_bytes() == expected
        made.append(expected)
    assert len(set(made)) == 3  # each take its own seed


def _write_lines(path: Path, songs: list[dict | str]) -> Path:
    path.write_text(
        "\n".join(s if isinstance(s, str) else json.dumps(s) for s in songs) + "\n",
        encoding="utf-8",
    )
    return path


def test_batch_file_songs_each_with_their_own_settings(
    pipe, tiny_ckpt: Path, tmp_path: Path, capsys
) -> None:
    songs = [
        {"tags": "rock", "lyrics": "[verse]\nhey\n", "output": str(tmp_path / "a.flac"),
         "seconds": 0.8, "seed": 1, "cfg_scale": 1.0, "topk": 5},
        "",  # blank lines are skipped
        {"tags": "jazz", "lyrics": "[chorus]\nnight\n", "output": str(tmp_path / "b.wav"),
         "temperature": 0.8, "num_steps": 3},
    ]  # fmt: skip
    batch = _write_lines(tmp_path / "songs.jsonl", songs)
    code, _, err = run(
        ["gen", "--model-path", str(tiny_ckpt), "--batch-file", str(batch),
         "--max-seconds", "0.4", "--seed", "40"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert f"{batch} line 3: seed 41" in err  # no seed of its own: --seed plus its index
    requests = [
        SongRequest.of("rock", "[verse]\nhey\n", max_seconds=0.8, seed=1, cfg_scale=1.0, topk=5),
        SongRequest.of("jazz", "[chorus]\nnight\n", max_seconds=0.4, temperature=0.8,
                       num_steps=3, seed=41),
    ]  # fmt: skip
    frames = pipe.generate_frames_batch(requests, rows=3)
    for name, request, codes in zip(("a.flac", "b.wav"), requests, frames, strict=True):
        wav = pipe.decode_frames(codes, request.codec, seed=request.sampling.seed)
        assert (tmp_path / name).read_bytes() == _as_written(pipe, wav, tmp_path / "api" / name)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not a JSON object"),
        ('["a"]', "line 2: not a JSON object but list"),
        ('{"tags": "x", "output": "b.wav", "top_k": 3}', "line 2: unknown field 'top_k'"),
        ('{"tags": "x"}', 'line 2: no output: give each song an "output" file name'),
        ('{"tags": "x", "output": "b.wav", "topk": 0}', "line 2: topk must be a whole number"),
        ('{"tags": "", "lyrics": " ", "output": "b.wav"}', "line 2: tags and lyrics are both"),
        ('{"tags": "x", "output": "b.mid"}', "line 2: unknown output extension '.mid'"),
        ('{"tags": "x", "output": "a.wav"}', "line 1 and songs.jsonl line 2 both write a.wav"),
    ],
)
def test_a_bad_line_is_refused_before_loading(
    line: str, message: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_lines(tmp_path / "songs.jsonl", ['{"tags": "x", "output": "a.wav"}', line])
    # No such model folder: an error about it would mean the file was read too late.
    args = ["gen", "--model-path", str(tmp_path / "none"), "--batch-file", "songs.jsonl"]
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["songs.jsonl"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--count", "2", "--batch-file", "x.jsonl"], "give --count or --batch-file, not both"),
        (["--count", "0", "-o", "a.wav"], "--count must be at least 1"),
        (["--count", "2", "-o", "-"], "leave out --stream and -o -"),
        (["--count", "2"], "--count needs -o/--output"),
        (["--batch-file", "x.jsonl", "-o", "a.wav"], "leave out --tags, --lyrics and -o"),
        (["--batch-file", "missing.jsonl"], "--batch-file missing.jsonl does not exist"),
        (["--count", "2", "--batch", "0", "-o", "a.wav"], "songs at once must be a whole"),
        (["--batch", "2", "-o", "a.wav"], "--batch sets songs at once for --count or"),
    ],
)
def test_bad_many_song_flags(extra: list[str], message: str, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tags = [] if "--batch-file" in extra else ["--tags", "x"]
    code, _, err = run(["gen", "--model-path", str(tmp_path / "none"), *tags, *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _interrupt_bar(monkeypatch, desc: str, at: int) -> None:
    """Ctrl-C from the progress bar `desc` once it has counted `at`."""
    real_update = tqdm.tqdm.update

    def update(self, n=1):
        if self.desc == desc and self.n >= at:
            raise KeyboardInterrupt
        return real_update(self, n)

    monkeypatch.setattr(tqdm.tqdm, "update", update)


# The codec on the LM's device (its thread waits for the LM's batch), and on another (the
# host's other name: it decodes beside the LM).
CODEC_DEVICES = pytest.mark.parametrize("codec_device", [[], ["--codec-device", "cpu:0"]])


@CODEC_DEVICES
def test_ctrl_c_in_the_lm_writes_every_song_so_far(
    tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch, codec_device: list[str]
) -> None:
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    batch = _write_lines(
        tmp_path / "songs.jsonl",
        [
            {"tags": "rock", "output": str(short), "seconds": 0.4, "seed": 1},  # 6 frames
            {"tags": "pop", "output": str(long), "seconds": 4, "seed": 2},  # up to 51
        ],
    )
    _interrupt_bar(monkeypatch, "LM", 20)  # once the short song has ended
    args = ["gen", "--model-path", str(tiny_ckpt), "--batch-file", str(batch), *codec_device]
    code, _, err = run(args, capsys)
    assert code == 130, err
    assert sf.info(str(short)).frames == 6 * SAMPLES_PER_FRAME  # whole: it had ended
    partial = tmp_path / "long.partial.wav"
    assert not long.exists() and partial.is_file()
    assert 6 * SAMPLES_PER_FRAME < sf.info(str(partial)).frames < 51 * SAMPLES_PER_FRAME
    # Each file written has its codes beside it: how its LM part ended.
    assert SongCodes.load(tmp_path / "short.codes.safetensors").ended == "length"
    assert SongCodes.load(tmp_path / "long.partial.codes.safetensors").ended == "interrupted"
    assert not (tmp_path / "long.codes.safetensors").exists()


@CODEC_DEVICES
def test_ctrl_c_in_the_codec_keeps_every_songs_frames(
    tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch, codec_device: list[str]
) -> None:
    out = tmp_path / "song.wav"
    args = ["gen", "--model-path", str(tiny_ckpt), "--tags", TAGS, "--max-seconds", "0.8"]
    args += ["--seed", "3", "--count", "2", "-o", str(out), *codec_device]
    assert run(args, capsys)[0] == 0
    whole = {i: (tmp_path / f"song-{i}.wav").read_bytes() for i in (1, 2)}
    for i in (1, 2):
        (tmp_path / f"song-{i}.wav").unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(heartmula_rt.runtime.pipeline.Pipeline, "decode_frames_batch", interrupted)
        code, _, err = run(args, capsys)
    kept = [tmp_path / f"song-{i}.codes.safetensors" for i in (1, 2)]
    assert code == 130 and all(k.is_file() for k in kept), err
    assert "frames of 2 songs are saved" in err and "heartmula-rt decode" in err
    for i, codes in enumerate(kept, start=1):
        target = tmp_path / f"song-{i}.wav"
        code, _, err = run(
            ["decode", str(codes), "--model-path", str(tiny_ckpt), "-o", str(target)], capsys
        )
        assert code == 0, err
        assert target.read_bytes() == whole[i] and codes.is_file()


def test_the_codec_on_its_own_device_decodes_beside_the_lm(
    tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """With the codec on another device, the first song is decoded while the LM makes the
    second (the LM waits at the first song's end until the codec is at work: on one device it
    would wait for ever), and the songs are those one device makes."""
    args = ["gen", "--model-path", str(tiny_ckpt), "--tags", TAGS, "--max-seconds", "1"]
    args += ["--topk", "20", "--seed", "5", "--count", "2", "--batch", "1"]
    alone, beside = tmp_path / "alone" / "song.wav", tmp_path / "beside" / "song.wav"
    alone.parent.mkdir()
    beside.parent.mkdir()
    assert run([*args, "-o", str(alone)], capsys)[0] == 0

    decoding = threading.Event()
    real_decode = HeartCodec.detokenize_many

    def detokenize_many(self, *a, **kw):
        decoding.set()  # inside the codec's lock
        return real_decode(self, *a, **kw)

    real_end = SongRunner._on_end
    overlapped = []

    def on_end(self, song, why):
        real_end(self, song, why)
        if song is self.songs[0]:  # the LM holds its lock until the last song: the codec must not
            overlapped.append(decoding.wait(60))  # need it

    monkeypatch.setattr(HeartCodec, "detokenize_many", detokenize_many)
    monkeypatch.setattr(SongRunner, "_on_end", on_end)
    code, _, err = run([*args, "--codec-device", "cpu:0", "-o", str(beside)], capsys)
    assert code == 0 and overlapped == [True], err
    for i in (1, 2):
        name = f"song-{i}.wav"
        assert (beside.parent / name).read_bytes() == (alone.parent / name).read_bytes()
        kept = SongCodes.load(beside.parent / f"song-{i}.codes.safetensors")
        assert kept.prefixes is not None  # the sidecar completed once its audio was written
