"""Reference audio carried everywhere (#33): both engines' prefill fills each song's own SLOT in
a batch, `Pipeline.prompt` builds it from the request, a stream carries it, the sidecar keeps it
so that extend, regen and resume go on with it, and the command line's flags (`--ref-audio`,
`--ref-embedding`, `--ref-seconds`, `--ref-strength`, `--ref-device`, `heartmula-rt embed`)
make it before the LM loads, refusing bad input in one line.

The embedder of the command-line tests is a stand-in (`FakeMulan`: a fixed random projection
of the clip's loudness over time) given through cli/reference.py's test hook `LOAD_EMBEDDER`;
the real muq package on random weights runs in tests/test_reference.py."""

from __future__ import annotations

import gc
import json
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from batches import run_songs
from cli_runs import resume_cut, run_cli
from torch import nn

import heartmula_rt
from heartmula_rt import cli
from heartmula_rt.cli import reference as cli_reference
from heartmula_rt.model import reference as ref
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import REFERENCE_DIM, Reference, SamplingParams, SongRequest
from heartmula_rt.runtime.codes import SongCodes, request_of_record, request_record
from heartmula_rt.runtime.engine import PlainEngine, StaticEngine
from heartmula_rt.runtime.scheduler import SongRun

TAGS, LYRICS = "piano", "la la"


def embedding(seed: int) -> tuple[float, ...]:
    e = np.random.default_rng(seed).standard_normal(REFERENCE_DIM)
    return tuple((e / np.linalg.norm(e)).tolist())


# Large enough that the tiny random LM's frames change with it.
REF = Reference(embedding(1), 1.0)


@pytest.mark.parametrize("kind", ["plain", "static"])
def test_a_song_with_a_reference_is_the_same_alone_and_among_others(
    kind, lm, gen, tokenizer
) -> None:
    engine = (
        PlainEngine(lm, gen)
        if kind == "plain"
        else StaticEngine(lm, gen, graphs=False, bucket=16, sync_every=3)
    )
    # Few frames: the static engine's sampler runs in Triton's interpreter on the CPU (slow).
    guided = SamplingParams(max_frames=3, topk=5, temperature=0.9, cfg_scale=1.5, seed=1)
    plain = SamplingParams(max_frames=2, topk=20, temperature=1.1, cfg_scale=1.0, seed=2)
    songs = {
        # guided (2 rows), with a reference
        "ref": (build_prompt(tokenizer, gen, TAGS, LYRICS, REF), guided),
        # the same song without one: the reference must change it
        "none": (build_prompt(tokenizer, gen, TAGS, LYRICS), guided),
        # unguided, another reference at half strength
        "other": (build_prompt(tokenizer, gen, "rock", "na na", Reference(embedding(2), 0.5)),
                  plain),
    }  # fmt: skip
    if kind == "static":  # its interpreted sampler is slow: the reference's effect is plain's
        del songs["none"]
    alone = {name: run_songs(engine, [SongRun(p, s)])[0] for name, (p, s) in songs.items()}
    if kind == "plain":
        assert not torch.equal(alone["ref"], alone["none"])
    # plain: 5 rows of songs in 4, "ref" and "none" start, "other" waits for rows.
    runs = [SongRun(p, s) for p, s in songs.values()]
    together = dict(zip(songs, run_songs(engine, runs), strict=True))
    for name in songs:
        assert torch.equal(together[name], alone[name]), name


def test_strength_zero_is_the_song_without_a_reference(lm, gen, tokenizer) -> None:
    engine = PlainEngine(lm, gen)
    sampling = SamplingParams(max_frames=4, topk=5, cfg_scale=1.5, seed=3)
    zero = build_prompt(tokenizer, gen, TAGS, LYRICS, Reference(embedding(1), 0.0))
    none = build_prompt(tokenizer, gen, TAGS, LYRICS)
    a, b = run_songs(engine, [SongRun(zero, sampling), SongRun(none, sampling)])
    assert torch.equal(a, b)


# -- the pipeline: its prompt, a stream, the sidecar ----------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


def test_the_pipelines_prompt_and_songs_carry_the_reference(pipe) -> None:
    request = SongRequest.of(TAGS, LYRICS, reference=REF, max_frames=6, seed=4)
    prompt = pipe.prompt(request)
    assert torch.equal(prompt.reference, torch.tensor(REF.embedding, dtype=torch.float32))
    with_ref = pipe.generate_frames(request)
    without = pipe.generate_frames(replace(request, reference=None))
    assert not torch.equal(with_ref, without)
    batch = pipe.generate_frames_batch([replace(request, reference=None), request], rows=4)
    alone = pipe.run_songs([SongRun(prompt, request.sampling)], 4)[0]
    assert torch.equal(batch[1], alone)


def test_a_stream_with_a_reference_equals_generate(pipe) -> None:
    request = SongRequest.of(TAGS, LYRICS, reference=REF, max_seconds=4, seed=1, num_steps=1)
    stream = pipe.stream(request)
    pieces = list(stream)
    expected = pipe.generate(request)
    assert np.array_equal(np.concatenate(pieces, axis=1), expected.numpy())
    plain = pipe.generate(replace(request, reference=None))
    assert plain.shape != expected.shape or not torch.equal(plain, expected)


def test_the_sidecar_keeps_the_reference(tmp_path: Path) -> None:
    request = SongRequest.of(TAGS, LYRICS, reference=Reference(embedding(5), 0.25), seed=1)
    record = request_record(request)
    assert record["reference"] == {"embedding": list(embedding(5)), "strength": 0.25}
    assert request_of_record(json.loads(json.dumps(record))) == request
    older = request_record(replace(request, reference=None))
    assert "reference" not in older and request_of_record(older).reference is None
    path = tmp_path / "s.codes.safetensors"
    SongCodes(torch.zeros(8, 5, dtype=torch.long), request, "length", "x").save(path)
    assert SongCodes.load(path).request == request
    with pytest.raises(heartmula_rt.UserError, match="512 numbers"):
        request_of_record({**record, "reference": {"embedding": [1.0], "strength": 1}})


# -- the command line -------------------------------------------------------------------------


class FakeMulan(nn.Module):
    """A stand-in for muq.MuQMuLan's call `mulan(wavs=[1, n]) → [1, 512]`: a fixed random
    projection of the clip's loudness in 16 parts."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(REFERENCE_DIM, 16, generator=g))

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        x = wavs[0]
        parts = x[: x.shape[0] // 16 * 16].view(16, -1).abs().mean(dim=1)
        return (self.proj @ parts)[None]


@pytest.fixture
def embedders(monkeypatch) -> list[weakref.ref]:
    """The test hook: every embedder the command line loads is a FakeMulan's, kept weakly so
    that a test can tell it was freed."""
    made: list[weakref.ref] = []

    def load(device: str) -> ref.Embedder:
        embedder = ref.embedder_of(FakeMulan(), device)
        made.append(weakref.ref(embedder.mulan))
        return embedder

    monkeypatch.setattr(cli_reference, "LOAD_EMBEDDER", load)
    return made


def clip(path: Path, seconds: float = 3.0, rate: int = 24000, freq: float = 440.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t) * np.linspace(0.2, 1.0, t.shape[0])
    sf.write(path, wave.astype(np.float32), rate)
    return path


def gen_args(tiny_ckpt: Path, out: Path, *extra) -> list:
    return ["gen", "--model-path", tiny_ckpt, "--tags", TAGS, "--lyrics", LYRICS,
            "--max-seconds", "1", "--seed", "7", "-o", out, *extra]  # fmt: skip


def test_gen_with_ref_audio_embeds_once_and_frees_the_embedder_before_the_lm(
    tiny_ckpt: Path, tmp_path: Path, capsys, embedders, monkeypatch
) -> None:
    wav = clip(tmp_path / "clip.wav", 5.0)
    import heartmula_rt.runtime.loader as loader

    loads = []
    real_load = loader.load_pipeline

    def load_pipeline(*args, **kwargs):
        gc.collect()
        loads.append([alive() is not None for alive in embedders])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loader, "load_pipeline", load_pipeline)
    args = ["--ref-audio", wav, "--ref-seconds", "1-4", "--ref-strength", "0.5"]
    code, err = run_cli(gen_args(tiny_ckpt, tmp_path / "song.wav", *args), capsys)
    assert code == 0, err
    assert len(embedders) == 1 and loads == [[False]]  # loaded once, freed before the LM
    song = SongCodes.load(tmp_path / "song.codes.safetensors")
    embedder = ref.embedder_of(FakeMulan())
    expected = embedder.embed(ref.read_reference_audio(wav, (1.0, 4.0)))
    assert song.request.reference == Reference(tuple(expected.tolist()), 0.5)


def test_embed_then_ref_embedding_is_ref_audio(
    tiny_ckpt: Path, tmp_path: Path, capsys, embedders
) -> None:
    wav = clip(tmp_path / "clip.flac", 4.0, rate=44100)
    out = tmp_path / "ref.safetensors"
    code, err = run_cli(["embed", wav, "-o", out, "--ref-seconds", "0-3"], capsys)
    assert code == 0 and f"wrote {out}" in err, err
    code, err = run_cli(gen_args(tiny_ckpt, tmp_path / "a.wav", "--ref-embedding", out), capsys)
    assert code == 0, err
    args = ["--ref-audio", wav, "--ref-seconds", "0-3"]
    code, err = run_cli(gen_args(tiny_ckpt, tmp_path / "b.wav", *args), capsys)
    assert code == 0, err
    a = SongCodes.load(tmp_path / "a.codes.safetensors")
    b = SongCodes.load(tmp_path / "b.codes.safetensors")
    assert a.request.reference == b.request.reference is not None
    assert torch.equal(a.codes, b.codes)
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    code, err = run_cli(gen_args(tiny_ckpt, tmp_path / "c.wav"), capsys)
    assert code == 0, err
    plain = SongCodes.load(tmp_path / "c.codes.safetensors")
    assert plain.request.reference is None
    assert plain.codes.shape != a.codes.shape or not torch.equal(plain.codes, a.codes)


def test_count_gives_every_take_the_reference(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    e = tmp_path / "ref.npy"
    np.save(e, np.asarray(embedding(3), np.float32))
    args = ["--ref-embedding", e, "--ref-strength", "0.8", "--count", "2"]
    code, err = run_cli(gen_args(tiny_ckpt, tmp_path / "t.wav", *args), capsys)
    assert code == 0, err
    for i in (1, 2):
        take = SongCodes.load(tmp_path / f"t-{i}.codes.safetensors")
        assert take.request.reference == Reference(np.asarray(embedding(3), np.float32), 0.8)


def test_resume_extend_and_regen_go_on_with_the_songs_reference(
    tiny_ckpt: Path, tmp_path: Path, capsys
) -> None:
    e = tmp_path / "ref.npy"
    np.save(e, np.asarray(embedding(1), np.float32))
    model = ["--model-path", tiny_ckpt]
    args = ["gen", *model, "--tags", TAGS, "--lyrics", LYRICS, "--topk", "20", "--seed", "4",
            "--ref-embedding", e]  # fmt: skip
    assert run_cli([*args, "--max-seconds", "2", "-o", tmp_path / "a.wav"], capsys)[0] == 0
    assert run_cli([*args, "--max-seconds", "3", "-o", tmp_path / "b.wav"], capsys)[0] == 0
    whole = SongCodes.load(tmp_path / "b.codes.safetensors")
    assert whole.request.reference is not None
    # resume: a cut song finished exactly, which only its reference gives
    cut, resumed = resume_cut(whole, tmp_path, model, capsys)
    assert torch.equal(resumed.codes, whole.codes)
    assert resumed.request.reference == whole.request.reference
    # the same cut without its reference: another song
    bare = replace(cut, request=replace(cut.request, reference=None))
    bare.save(tmp_path / "bare.codes.safetensors")
    assert run_cli(["resume", tmp_path / "bare.codes.safetensors", *model], capsys)[0] == 0
    assert not torch.equal(SongCodes.load(tmp_path / "bare-resumed.codes.safetensors").codes,
                           whole.codes)  # fmt: skip
    # extend: the 2 s song made 1 s longer is the 3 s song (seed 4 runs to its length)
    assert whole.ended == "length"
    code, err = run_cli(["extend", tmp_path / "a.wav", *model, "--seconds", "1"], capsys)
    assert code == 0, err
    extended = SongCodes.load(tmp_path / "a-extended.codes.safetensors")
    assert torch.equal(extended.codes, whole.codes)
    assert extended.request.reference == whole.request.reference
    # regen: the takes keep the song's reference, or take the one given
    code, err = run_cli(["regen", tmp_path / "b.wav", *model, "--from", "1", "--seed", "9"], capsys)
    assert code == 0, err
    assert SongCodes.load(tmp_path / "b-regen.codes.safetensors").request.reference == (
        whole.request.reference
    )
    other = tmp_path / "other.npy"
    np.save(other, np.asarray(embedding(2), np.float32))
    regen = ["regen", tmp_path / "b.wav", *model, "--from", "1", "--seed", "9", "-o"]
    code, err = run_cli([*regen, tmp_path / "new.wav", "--ref-embedding", other,
                     "--ref-strength", "0.5"], capsys)  # fmt: skip
    assert code == 0, err
    new = SongCodes.load(tmp_path / "new.codes.safetensors").request.reference
    assert new == Reference(np.asarray(embedding(2), np.float32), 0.5)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    rate = 24000
    sf.write(tmp_path / "silent.wav", np.zeros(3 * rate, np.float32), rate)
    sf.write(tmp_path / "short.wav", 0.5 * np.ones(rate // 2, np.float32), rate)
    clip(tmp_path / "ok.wav", 3.0)
    (tmp_path / "text.wav").write_text("not audio")
    np.save(tmp_path / "small.npy", np.zeros(100, np.float32))
    np.save(tmp_path / "nan.npy", np.full(512, np.nan, np.float32))
    long = tmp_path / "three-hours.wav"  # sparse: its header says 3 hours of 8 kHz
    frames = 3 * 3600 * 8000
    with sf.SoundFile(long, "w", 8000, 1, subtype="PCM_16") as f:
        f.write(np.zeros(8000, np.int16))
    header = bytearray(long.read_bytes()[:44])
    header[4:8] = (36 + 2 * frames).to_bytes(4, "little")
    header[40:44] = (2 * frames).to_bytes(4, "little")
    with open(long, "r+b") as f:
        f.write(header)
        f.truncate(44 + 2 * frames)
    d = tmp_path
    return {
        "not audio": (["--ref-audio", d / "text.wav"], "not an audio file"),
        "missing": (["--ref-audio", d / "none.wav"], "does not exist"),
        "silence": (["--ref-audio", d / "silent.wav"], "silent"),
        "short": (["--ref-audio", d / "short.wav"], "0.50 s long"),
        "three hours": (["--ref-audio", long], "180 minutes long"),
        "range outside": (["--ref-audio", d / "ok.wav", "--ref-seconds", "5-9"], "past the end"),
        "range backwards": (["--ref-audio", d / "ok.wav", "--ref-seconds", "2-1"], "0 <= A < B"),
        "range form": (["--ref-audio", d / "ok.wav", "--ref-seconds", "5"], "A-B"),
        "small embedding": (["--ref-embedding", d / "small.npy"], "512 numbers"),
        "nan embedding": (["--ref-embedding", d / "nan.npy"], "NaN"),
        "strength alone": (["--ref-strength", "0.5"], "needs --ref-audio or --ref-embedding"),
        "strength range": (["--ref-embedding", d / "small.npy", "--ref-strength", "2"],
                           "from 0 to 1"),
        "seconds alone": (["--ref-seconds", "0-3"], "give --ref-audio"),
        "both": (["--ref-audio", d / "ok.wav", "--ref-embedding", d / "small.npy"],
                 "not allowed with argument"),
        "device": (["--ref-audio", d / "ok.wav", "--ref-device", "tpu"], "cpu or cuda"),
    }  # fmt: skip


def test_bad_reference_input_is_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys, embedders, monkeypatch
) -> None:
    import heartmula_rt.runtime.loader as loader

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(loader, "load_pipeline", no_model)
    inputs = tmp_path / "in"
    inputs.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    for case, (extra, message) in _bad_inputs(inputs).items():
        for args in (
            gen_args(tmp_path / "no-model", out / "song.wav", *extra),
            ["embed", inputs / "ok.wav", "-o", out / "ref.safetensors", *extra],
        ):
            if args[0] == "embed":  # embed takes a clip and its range, not the other flags
                if "--ref-audio" not in extra or case == "both":
                    continue
                i = extra.index("--ref-audio")
                args = ["embed", extra[i + 1], "-o", out / "ref.safetensors",
                        *extra[:i], *extra[i + 2:]]  # fmt: skip
            code, err = run_cli(args, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and message in lines[0], (case, args[0], err)
            assert list(out.iterdir()) == [], case
    assert embedders == []  # every refusal came before the embedder loaded


def test_a_missing_extra_is_one_line_naming_the_install(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "muq", None)  # import muq → ImportError
    wav = clip(tmp_path / "clip.wav")
    code, err = run_cli(["embed", wav, "-o", tmp_path / "ref.npy"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "pip install 'heartmula-rt[ref]'" in err
    assert not (tmp_path / "ref.npy").exists()


def test_plan_counts_the_embedder_where_it_runs(capsys) -> None:
    def last_line(*extra: str) -> str:
        assert cli.main(["plan", "--vram", "12G", *extra]) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]

    on_gpu = last_line("--ref-device", "cuda")
    assert on_gpu.startswith("reference embedder") and "GiB cpu" in on_gpu and "GiB gpu" in on_gpu
    on_cpu = last_line("--ref-device", "cpu")
    assert "GiB cpu" in on_cpu and "gpu" not in on_cpu
    assert "reference embedder" not in last_line()


def test_plan_says_when_the_embedder_does_not_fit_the_gpu(tiny_ckpt: Path, capsys) -> None:
    small = ["--vram", "1.5G", "--model-path", str(tiny_ckpt), "--max-seconds", "10"]
    assert cli.main(["plan", *small, "--ref-device", "cuda"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "more than the GPU's 1.50 GiB: embed on the CPU (--ref-device cpu)" in line
