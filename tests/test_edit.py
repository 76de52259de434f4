"""Song editing on the CPU with the tiny checkpoint (edit.py): a song resumed from any frame with
its seed is the uninterrupted song exactly (plain and static engines); a song continued past
the backbone's context goes on in runs of bounded memory; a section made again keeps every
frame before it, and with an end the frames after it; bad ranges are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import tqdm
from cli_runs import resume_cut, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

import heartmula_rt
from heartmula_rt import cli
from heartmula_rt.errors import UserError
from heartmula_rt.request import SongRequest
from heartmula_rt.runtime import runner
from heartmula_rt.runtime import scheduler as scheduler_module
from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.runtime.codes import SongCodes
from heartmula_rt.runtime.engine import StaticEngine

TAGS, LYRICS = "piano,happy", "[verse]\nla la la\n"
SAMPLES_PER_FRAME = 3840


def song(frames: int, **settings) -> SongRequest:
    settings = {"topk": 20, "temperature": 1.1, "seed": 7, "stop_at_eos": False, **settings}
    return SongRequest.of(TAGS, LYRICS, max_frames=frames - 1, **settings)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


@pytest.mark.parametrize("guided", [True, False])
def test_a_resumed_song_is_the_uninterrupted_song(pipe, guided: bool) -> None:
    request = song(30, cfg_scale=1.5 if guided else 1.0)
    whole = pipe.generate_frames(request)
    assert whole.shape == (8, 30)
    for kept in (1, 2, 13, 29):
        assert torch.equal(pipe.continue_frames(request, whole[:, :kept]), whole), kept


def test_the_static_engine_resumes_exactly(pipe) -> None:
    static = StaticEngine(pipe.lm, pipe.gen_config, graphs=False, bucket=16, sync_every=3)
    request = song(12)
    prompt = pipe.prompt(request)
    whole = static.generate_frames(prompt, request.sampling)
    run = scheduler_module.SongRun(prompt, request.sampling, given=whole[:, :5].T.contiguous())
    assert torch.equal(static.run_song(run), whole)


def test_a_song_with_eos_resumes_to_its_eos(pipe) -> None:
    request = SongRequest.of(
        "metal", "[chorus]\nla la la\n", max_frames=40, topk=1, seed=3, cfg_scale=2.0
    )  # fmt: skip  (greedy: ends by EOS at frame 13)
    whole = pipe.generate_frames(request)
    assert whole.shape[1] == 13
    assert torch.equal(pipe.continue_frames(request, whole[:, :6]), whole)


def test_extending_with_new_lyrics_keeps_the_song(pipe) -> None:
    first = pipe.generate_frames(song(20))
    longer = song(35).with_settings(seed=8)
    extended = pipe.continue_frames(
        SongRequest(TAGS, LYRICS + "[chorus]\nna na\n", longer.sampling), first
    )
    assert extended.shape == (8, 35) and torch.equal(extended[:, :20], first)
    with pytest.raises(UserError, match="already has 20 frames"):
        pipe.continue_frames(song(20), first)


@pytest.fixture(scope="module")
def short_context(tiny_ckpt: Path, tmp_path_factory) -> Path:
    """The tiny checkpoint with a backbone context of 96 positions."""
    folder = tmp_path_factory.mktemp("short") / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    config_path = folder / "HeartMuLa-oss-3B" / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone_flavor"]["max_seq_len"] = 96
    config_path.write_text(json.dumps(config))
    return folder


def test_a_song_goes_past_the_context_in_bounded_runs(short_context: Path, monkeypatch) -> None:
    pipe = heartmula_rt.load_pipeline(short_context, device="cpu")
    request = song(150)
    prompt = len(pipe.prompt(request, fit=False))
    fits = 96 - prompt
    with pytest.raises(UserError, match="extend"):  # gen says how to go longer
        pipe.generate_frames(request)

    caches: list[int] = []
    real = scheduler_module.Scheduler.__init__

    def recording(self, rows, positions, **kw):
        caches.append(positions)
        real(self, rows, positions, **kw)

    monkeypatch.setattr(scheduler_module.Scheduler, "__init__", recording)
    made: list[int] = []
    long = pipe.continue_frames(request, pipe.generate_frames(song(10)), context_frames=20,
                                on_frame=made.append)  # fmt: skip
    assert long.shape == (8, 150)
    assert len(caches) >= 3 and max(caches) <= 96  # runs, each within the context
    assert made == sorted(made) and made[-1] == 150
    # Its first run is the song as far as it fits, and a seed repeats it all.
    assert torch.equal(long[:, :fits], pipe.continue_frames(song(fits), long[:, :10]))
    again = pipe.continue_frames(request, long[:, :10], context_frames=20)
    assert torch.equal(again, long)


def test_a_section_made_again(pipe) -> None:
    request = song(40)
    whole = pipe.generate_frames(request)
    same, other, third = pipe.regenerate_frames(request, whole, 15, seeds=[7, 8, 9])
    assert torch.equal(same[:, :15], whole[:, :15]) and torch.equal(other[:, :15], whole[:, :15])
    assert not torch.equal(other, whole) and not torch.equal(other, third)
    # One take with the song's own seed, alone in its rows: the song itself.
    (alone,) = pipe.regenerate_frames(request, whole, 15, seeds=[7])
    assert torch.equal(alone, whole)

    takes = pipe.regenerate_frames(request, whole, 10, 25, seeds=[11, 12])
    for take in takes:
        assert take.shape == whole.shape
        assert torch.equal(take[:, :10], whole[:, :10]) and torch.equal(take[:, 25:], whole[:, 25:])
        assert not torch.equal(take[:, 10:25], whole[:, 10:25])


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (0, None, "starts after frame 0"),
        (40, None, "within the song's 40 frames"),
        (10, 10, "ends after its start"),
        (10, 41, "by 40"),
    ],
)
def test_bad_sections_are_refused(pipe, start: int, end: int | None, message: str) -> None:
    whole = torch.zeros(8, 40, dtype=torch.long)
    with pytest.raises(UserError, match=message):
        pipe.regenerate_frames(song(40), whole, start, end, seeds=[1])


def test_bad_frames_are_refused(pipe) -> None:
    with pytest.raises(UserError, match=r"int64 tensor \[8, T\]"):
        pipe.continue_frames(song(10), torch.zeros(7, 3, dtype=torch.long))


# -- the commands: heartmula-rt extend, resume, regen --------------------------------------


def test_extend_continues_as_a_longer_song_would(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    model = ["--model-path", tiny_ckpt]
    gen = ["gen", *model, "--tags", TAGS, "--lyrics", LYRICS, "--topk", "20", "--seed", "3"]
    assert run_cli([*gen, "--max-seconds", "2", "-o", tmp_path / "a.wav"], capsys)[0] == 0
    assert run_cli([*gen, "--max-seconds", "3", "-o", tmp_path / "b.wav"], capsys)[0] == 0
    longer = SongCodes.load(tmp_path / "b.codes.safetensors")
    if longer.ended != "length":
        pytest.skip("the random model drew EOS early")
    code, err = run_cli(["extend", tmp_path / "a.wav", *model, "--seconds", "1"], capsys)
    assert code == 0, err
    extended = SongCodes.load(tmp_path / "a-extended.codes.safetensors")
    # The same seed and texts: the frames a 3 s song makes, and its audio.
    assert torch.equal(extended.codes, longer.codes)
    assert (tmp_path / "a-extended.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_resume_finishes_an_interrupted_song_exactly(
    tiny_ckpt: Path, tmp_path: Path, capsys
) -> None:
    model = ["--model-path", tiny_ckpt]
    args = ["gen", *model, "--tags", TAGS, "--max-seconds", "2", "--seed", "5"]
    assert run_cli([*args, "-o", tmp_path / "whole.wav"], capsys)[0] == 0
    whole = SongCodes.load(tmp_path / "whole.codes.safetensors")
    resumed = resume_cut(whole, tmp_path, model, capsys)[1]
    assert torch.equal(resumed.codes, whole.codes)
    assert (tmp_path / "cut-resumed.wav").read_bytes() == (tmp_path / "whole.wav").read_bytes()


def made_song(tiny_ckpt: Path, folder: Path, seconds: str, frames: int, capsys) -> tuple:
    """The `--model-path` and float32 codec flags, and folder/song.wav's codes: `seconds` of an
    unguided song (seed 6, top 5) made by gen, skipped where EOS came before `frames`."""
    model = ["--model-path", tiny_ckpt, "--codec-dtype", "float32"]
    args = ["gen", *model, "--tags", TAGS, "--max-seconds", seconds, "--seed", "6", "--topk", "5"]
    args += ["--cfg-scale", "1.0"]  # fmt: skip
    assert run_cli([*args, "-o", folder / "song.wav"], capsys)[0] == 0
    song = SongCodes.load(folder / "song.codes.safetensors")
    if song.frames < frames:
        pytest.skip("the random model drew EOS early")
    return model, song


def test_regen_keeps_what_is_outside_the_section(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    model, song = made_song(tiny_ckpt, tmp_path, "36", 440, capsys)
    code, err = run_cli(
        ["regen", tmp_path / "song.wav", *model, "--from", "0:32", "--to", "34.4", "--count", "2"],
        capsys,
    )
    assert code == 0, err
    original, _ = sf.read(tmp_path / "song.wav", dtype="int16")
    start, end = 400, 430  # 32 s and 34.4 s in 80 ms frames
    for i in (1, 2):
        take = SongCodes.load(tmp_path / f"song-regen-{i}.codes.safetensors")
        assert take.frames == song.frames
        assert torch.equal(take.codes[:, :start], song.codes[:, :start])
        assert torch.equal(take.codes[:, end:], song.codes[:, end:])
        assert not torch.equal(take.codes[:, start:end], song.codes[:, start:end])
        audio, _ = sf.read(tmp_path / f"song-regen-{i}.wav", dtype="int16")
        # The first window (codes 0..371) is unchanged: its audio, up to where the second
        # window's crossfade begins (code 320), is the original's sample for sample.
        first_window = 320 * SAMPLES_PER_FRAME
        assert np.array_equal(audio[:first_window], original[:first_window])
        assert not np.array_equal(audio, original)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["regen", "{song}", "--from", "9"], "--from 9 s is outside the song"),
        (["regen", "{song}", "--from", "0"], "--from 0 s is outside the song"),
        (["regen", "{song}", "--from", "0:01", "--to", "0:00.5"], "must come after --from"),
        (["regen", "{song}", "--from", "1:75"], "--from takes seconds or m:ss"),
        (["regen", "{song}", "--from", "1", "--count", "0"], "--count must be at least 1"),
        (["extend", "{song}", "--seconds", "0.01"], "at least one 80 ms frame"),
        (["resume", "{song}"], "nothing to resume"),
        (["extend", "{dir}/none.wav", "--seconds", "1"], "no codes beside"),
        (["regen", "{dir}/bad.codes.safetensors", "--from", "1"], "damaged"),
    ],
)
def test_bad_edits_are_one_line(
    args: list[str], message: str, tiny_ckpt: Path, tmp_path: Path, capsys
) -> None:
    song = tmp_path / "s.codes.safetensors"
    SongCodes(torch.zeros(8, 20, dtype=torch.long), song_request(), "length", "x").save(song)
    (tmp_path / "bad.codes.safetensors").write_bytes(b"\x00" * 40)
    before = sorted(p.name for p in tmp_path.iterdir())
    filled = [a.format(song=song, dir=tmp_path) for a in args]
    code, err = run_cli([*filled, "--model-path", tmp_path / "no-model"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def song_request() -> SongRequest:
    return SongRequest.of(TAGS, LYRICS, max_frames=19, seed=1)


# -- an edit's audio decodes only the codec windows it changes (HeartCodec.redecode) -----------


def test_a_sidecar_keeps_the_codecs_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "s.codes.safetensors"
    codes = torch.zeros(8, 400, dtype=torch.long)  # two codec windows
    prefixes = torch.randn(2, 104, 256, generator=torch.Generator().manual_seed(1))
    SongCodes(codes, song_request(), "length", "x", prefixes=prefixes).save(path)
    kept = SongCodes.load(path)
    assert kept.prefixes.dtype == torch.float32 and torch.equal(kept.prefixes, prefixes)
    SongCodes(codes, song_request(), "length", "x").save(path)  # without: still a sidecar
    assert SongCodes.load(path).prefixes is None
    with pytest.raises(ValueError, match=r"not float32 \[2, 104, C\]"):
        SongCodes(codes, song_request(), "length", "x", prefixes=prefixes[:1])
    with safe_open(path, "pt") as f:  # one window's prefixes too few: damaged, in one line
        meta = f.metadata()
    save_file({"codes": codes, "prefixes": prefixes[:1].contiguous()}, path, metadata=meta)
    with pytest.raises(UserError, match=r"damaged: its prefixes are \[1, 104, 256\]") as refused:
        SongCodes.load(path)
    assert "\n" not in str(refused.value)


def test_regen_decodes_only_the_changed_windows(
    pipe, tiny_ckpt: Path, tmp_path: Path, capsys
) -> None:
    model, song = made_song(tiny_ckpt, tmp_path, "58", 726, capsys)
    assert song.prefixes.shape == (3, 104, 256)  # windows at codes 0, 320 and 640
    # 56 s to 57.6 s: codes 700..719, in window 2 only; window 1 is decoded again for the
    # crossfade into it, and window 0 not at all.
    regen = ["regen", tmp_path / "song.wav", *model, "--from", "0:56", "--to", "57.6"]
    code, err = run_cli([*regen, "--seed", "9"], capsys)
    assert code == 0, err
    assert "codec: decoded 2 of 3 windows; the audio before 51.2 s is song.wav's" in err
    take = SongCodes.load(tmp_path / "song-regen.codes.safetensors")
    assert not torch.equal(take.codes, song.codes)
    assert torch.equal(take.codes[:, 720:], song.codes[:, 720:])
    # The same audio as the whole take decoded, to the byte, and the same prefixes.
    whole, prefixes = pipe.decode_frames(
        take.codes, take.request.codec, seed=take.request.noise_seed, return_prefixes=True
    )
    write_audio(tmp_path / "whole.wav", whole)
    assert (tmp_path / "song-regen.wav").read_bytes() == (tmp_path / "whole.wav").read_bytes()
    assert torch.equal(take.prefixes, prefixes)
    original, _ = sf.read(tmp_path / "song.wav", dtype="int16")
    audio, _ = sf.read(tmp_path / "song-regen.wav", dtype="int16")
    kept = 640 * SAMPLES_PER_FRAME  # window 2's region begins at code 640
    assert np.array_equal(audio[:kept], original[:kept]) and not np.array_equal(audio, original)

    # extend: the song's last window changes too (its padding was the song's own codes).
    code, err = run_cli(["extend", tmp_path / "song.wav", *model, "--seconds", "0.16"], capsys)
    assert code == 0, err
    assert "codec: decoded 2 of 3 windows; the audio before 51.2 s is song.wav's" in err
    longer = SongCodes.load(tmp_path / "song-extended.codes.safetensors")
    assert longer.frames == 728 and torch.equal(longer.codes[:, :726], song.codes)
    assert longer.prefixes.shape == (3, 104, 256)
    assert torch.equal(longer.prefixes[:2], song.prefixes[:2])  # window 1 decoded again: the same
    # (that its audio is the whole longer song's: tests/test_codec_redecode.py, a continuation)
    audio, _ = sf.read(tmp_path / "song-extended.wav", dtype="int16")
    assert len(audio) == 728 * SAMPLES_PER_FRAME
    assert np.array_equal(audio[:kept], original[:kept])


def test_regen_of_a_lossy_song_decodes_every_window(
    pipe, tiny_ckpt: Path, tmp_path: Path, capsys
) -> None:
    model = ["--model-path", tiny_ckpt, "--codec-dtype", "float32"]
    gen = ["gen", *model, "--tags", TAGS, "--max-seconds", "2", "--seed", "3", "--topk", "20"]
    assert run_cli([*gen, "-o", tmp_path / "song.mp3"], capsys)[0] == 0
    assert SongCodes.load(tmp_path / "song.codes.safetensors").prefixes.shape[0] == 1
    for given, note in (
        ("song.mp3", "note: song.mp3 is lossy: decoding every window"),
        ("song.codes.safetensors", "song.codes.safetensors holds the song's codes, not its audio"),
    ):
        out = tmp_path / f"regen-{given}.mp3"
        regen = ["regen", tmp_path / given, *model, "--from", "1", "--seed", "4", "-o", out]
        code, err = run_cli(regen, capsys)
        assert code == 0, err
        assert err.count(note) == 1 and "codec: decoded" not in err
        take = SongCodes.load(out.with_name(f"{out.stem}.codes.safetensors"))
        whole, prefixes = pipe.decode_frames(
            take.codes, take.request.codec, seed=take.request.noise_seed, return_prefixes=True
        )
        write_audio(tmp_path / "whole.mp3", whole)
        assert out.read_bytes() == (tmp_path / "whole.mp3").read_bytes()
        assert torch.equal(take.prefixes, prefixes)


def test_a_crash_keeps_the_frames_and_resume_finishes_the_song(
    tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    model = ["--model-path", tiny_ckpt]
    args = ["gen", *model, "--tags", TAGS, "--max-seconds", "2", "--seed", "8"]
    assert run_cli([*args, "-o", tmp_path / "whole.wav"], capsys)[0] == 0
    whole = SongCodes.load(tmp_path / "whole.codes.safetensors")

    monkeypatch.setattr(runner, "SAVE_EVERY_S", 0.0)  # save at every frame
    real_update = tqdm.tqdm.update

    def crash(self, n=1):
        if self.desc == "LM" and self.n >= 12:
            raise RuntimeError("the machine went away")
        return real_update(self, n)

    monkeypatch.setattr(tqdm.tqdm, "update", crash)
    with pytest.raises(RuntimeError, match="went away"):
        cli.main([str(a) for a in [*args, "-o", tmp_path / "cut.wav"]])
    monkeypatch.undo()
    cut = SongCodes.load(tmp_path / "cut.codes.safetensors")
    assert cut.ended == "interrupted" and 12 <= cut.frames < whole.frames
    assert torch.equal(cut.codes, whole.codes[:, : cut.frames])
    assert not (tmp_path / "cut.wav").exists()
    code, err = run_cli(["resume", tmp_path / "cut.codes.safetensors", *model], capsys)
    assert code == 0, err
    resumed = SongCodes.load(tmp_path / "cut-resumed.codes.safetensors")
    assert torch.equal(resumed.codes, whole.codes)


def test_a_sidecar_continues_as_its_frames_do(pipe) -> None:
    request = song(16)
    whole = pipe.generate_frames(request)
    kept = SongCodes(whole[:, :6], request, "interrupted", pipe.fingerprint)
    assert torch.equal(pipe.continue_frames(request, kept), whole)
