"""Streaming: the incremental window decoder, the engines' `on_codes` hook, `SongStream` and
`Pipeline.stream`, each against the non-streamed path of the same seed, bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import heartmula_rt
from heartmula_rt import cli
from heartmula_rt.model.codec.detokenize import HOP, WINDOW
from heartmula_rt.request import CodecParams, SamplingParams, SongRequest
from heartmula_rt.runtime.engine import PlainEngine, StaticEngine
from heartmula_rt.runtime.pipeline import Pipeline
from heartmula_rt.runtime.stream import SongStream

SAMPLES_PER_CODE = 3840
STEPS = 1  # one ODE step per window: the stream's bookkeeping, not the ODE, is under test
ONE_STEP = CodecParams(num_steps=STEPS)
TAGS, LYRICS = "piano", "la la"


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path) -> Pipeline:
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


def random_codes(num_codes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1024, (8, num_codes), generator=torch.Generator().manual_seed(seed))


def test_window_decoder_streams_what_detokenize_returns(pipe: Pipeline) -> None:
    codec = pipe.codec
    codes = random_codes(2 * HOP + WINDOW - 40, 0)  # 3 windows, the last one padded by tiling
    codes[5, : WINDOW + 10] = 1024 + torch.arange(WINDOW + 10) % 4  # only strays for a while
    codes[2, 100:103] = 1027  # strays with a valid id before them
    expected = codec.detokenize(codes, ONE_STEP, generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    decoder = codec.window_decoder(ONE_STEP, generator=g)
    pieces, emitted_at = [], []
    with torch.inference_mode():
        for start in range(0, codes.shape[1], 97):  # pieces of any size, across windows
            new = decoder.push(codes[:, start : start + 97])
            pieces += new
            emitted_at += [min(start + 97, codes.shape[1])] * len(new)
        pieces += decoder.finish()
    # Window 0 waits for codebook 5's first valid id (frame 382, in the push ending at 388),
    # window 1 comes with its last code (691, in the push ending at 776), window 2 (past the
    # real codes) only at the end.
    assert emitted_at == [388, 776]
    assert [p.shape[1] for p in pieces[:2]] == [HOP * SAMPLES_PER_CODE] * 2
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == expected.shape == (2, codes.shape[1] * SAMPLES_PER_CODE)
    assert torch.equal(streamed, expected)


@pytest.mark.parametrize("static", [False, True], ids=["plain", "static"])
def test_on_codes_hands_over_every_frame_once(pipe: Pipeline, static: bool) -> None:
    if static:
        pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")
        engine = StaticEngine(pipe.lm, pipe.gen_config, graphs=False, sync_every=5)
    else:
        engine = PlainEngine(pipe.lm, pipe.gen_config)
    got: list[torch.Tensor] = []
    prompt = pipe.prompt(SongRequest.of("metal", "[chorus]\nla la la\n", max_frames=40))  # eos case
    frames = engine.generate_frames(
        prompt, SamplingParams(max_frames=40, topk=1, cfg_scale=2.0), on_codes=got.append
    )
    assert frames.shape[1] == 13  # ends on EOS: the EOS frame is never handed over
    handed = torch.cat(got, dim=1)
    # A prefix of the result: the static engine's frames after its last EOS check before the
    # EOS come only with the return value.
    assert torch.equal(handed, frames[:, : handed.shape[1]])
    assert handed.shape[1] == frames.shape[1] or static


def test_static_engine_makes_plain_calls_after_a_stream(pipe: Pipeline) -> None:
    pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")
    engine = StaticEngine(pipe.lm, pipe.gen_config, graphs=False)
    kwargs = {"max_frames": 10, "topk": 1, "stop_at_eos": False}
    prompt = pipe.prompt(SongRequest.of(TAGS, LYRICS, **kwargs))
    g = torch.Generator().manual_seed(0)
    sampling = SamplingParams(**kwargs)
    stream = SongStream(pipe, prompt, sampling, ONE_STEP, generator=g, engine=engine)
    list(stream)  # the engine's state is made in the stream's worker
    assert torch.equal(engine.generate_frames(prompt, SamplingParams(**kwargs)), stream.frames)


@pytest.mark.gpu
def test_gpu_pipeline_streams_and_generates_in_any_order(tiny_ckpt: Path) -> None:
    # The graph engine and the codec's CUDA graph: their state kept across songs serves both
    # generate (inference mode in the codec) and the stream's worker (no_grad).
    gpu = heartmula_rt.load_pipeline(tiny_ckpt, device="cuda", dtype="float32")
    kwargs = {"max_seconds": 8, "seed": 2, "num_steps": STEPS}
    expected = gpu.generate(TAGS, LYRICS, **kwargs).numpy()
    for _ in range(2):
        assert np.array_equal(np.concatenate(list(gpu.stream(TAGS, LYRICS, **kwargs)), 1), expected)
    assert np.array_equal(gpu.generate(TAGS, LYRICS, **kwargs).numpy(), expected)


@pytest.mark.gpu
def test_gpu_songs_reuse_the_codec_stream(tiny_ckpt: Path, streams_made: list[str]) -> None:
    gpu = heartmula_rt.load_pipeline(tiny_ckpt, device="cuda", dtype="float32")
    kwargs = {"max_seconds": 8, "seed": 2, "num_steps": STEPS}
    list(gpu.stream(TAGS, LYRICS, **kwargs))
    first_song = list(streams_made)
    assert first_song.count("heartmula_rt.model.side_stream") == 2  # the engine's and the codec's
    list(gpu.stream(TAGS, LYRICS, **kwargs))
    assert streams_made == first_song  # the second song made none


def test_pipeline_stream_equals_generate_on_eos(pipe: Pipeline) -> None:
    kwargs = {"max_seconds": 8, "seed": 1, "num_steps": STEPS}
    stream = pipe.stream(TAGS, LYRICS, **kwargs)
    pieces = list(stream)
    assert 0 < stream.frames.shape[1] < 101 and not stream.interrupted  # EOS, one padded window
    assert stream.first_audio_s is not None and stream.first_audio_s > 0
    assert all(p.dtype == torch.float32 and p.shape[0] == 2 for p in pieces)  # as generate's
    expected = pipe.generate(TAGS, LYRICS, **kwargs)
    assert np.array_equal(np.concatenate(pieces, axis=1), expected.numpy())


def _stream_and_compare(
    pipe: Pipeline, on_frame, *, codec_seed: int, max_frames: int, seed: int
) -> SongStream:
    """A SongStream of the tiny pipeline, every frame of `max_frames` made (no EOS stop), whose
    pieces must equal the non-streamed decode of its frames; `on_frame(n, stream)` is called
    from the worker. Returns the finished stream."""
    holder: list[SongStream] = []
    holder.append(
        SongStream(
            pipe,
            pipe.prompt(SongRequest.of(TAGS, LYRICS, max_frames=max_frames)),
            SamplingParams(max_frames=max_frames, seed=seed, stop_at_eos=False),
            ONE_STEP,
            generator=torch.Generator().manual_seed(codec_seed),
            on_frame=lambda n: on_frame(n, holder[0]),
        )
    )
    stream = holder[0]
    pieces = list(stream)
    expected = pipe.codec.detokenize(
        stream.frames, ONE_STEP, generator=torch.Generator().manual_seed(codec_seed)
    )
    assert np.array_equal(np.concatenate(pieces, axis=1), expected.numpy())
    return stream


def test_song_stream_over_two_windows(pipe: Pipeline) -> None:
    """Random weights end early on EOS; without stopping there, 381 frames make two windows,
    the first decoded while the LM still runs, and the EOS ids among them are stray ids."""
    audio_before_last_frame = []

    def on_frame(n: int, stream: SongStream) -> None:
        if n == 381:
            audio_before_last_frame.append(stream.first_audio_s is not None)

    stream = _stream_and_compare(pipe, on_frame, codec_seed=4, max_frames=380, seed=5)
    assert stream.frames.shape[1] == 381
    assert audio_before_last_frame == [True]  # window 0 was out before the LM had finished


def test_stop_ends_the_song_where_the_lm_stopped(pipe: Pipeline) -> None:
    def on_frame(n: int, stream: SongStream) -> None:
        if n == 20:
            stream.stop()

    stream = _stream_and_compare(pipe, on_frame, codec_seed=6, max_frames=400, seed=0)
    assert stream.interrupted and 20 <= stream.frames.shape[1] <= 22


def test_worker_errors_reach_the_consumer(pipe: Pipeline) -> None:
    def on_frame(n: int) -> None:  # runs in the worker
        if n == 3:
            raise heartmula_rt.UserError("the listener went away")

    stream = pipe.stream(TAGS, LYRICS, max_seconds=1, seed=0, on_frame=on_frame)
    with pytest.raises(heartmula_rt.UserError, match="listener went away"):
        list(stream)


def test_bad_settings_are_refused_before_the_worker_starts(pipe: Pipeline) -> None:
    with pytest.raises(heartmula_rt.UserError, match="topk"):
        pipe.stream(TAGS, LYRICS, max_seconds=1, seed=0, topk=0)


def gen(tiny_ckpt: Path, out: str, *extra: str) -> int:
    args = ["gen", "--model-path", str(tiny_ckpt), "--tags", TAGS, "--lyrics", LYRICS]
    return cli.main([*args, "--max-seconds", "1", "--seed", "1", "-o", out, *extra])


def test_cli_stream_writes_the_same_file(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert gen(tiny_ckpt, str(tmp_path / "plain.wav")) == 0
    assert gen(tiny_ckpt, str(tmp_path / "song.wav"), "--stream") == 0
    assert "first audio after" in capsys.readouterr().err
    names = ["plain.codes.safetensors", "plain.wav", "song.codes.safetensors", "song.wav"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # renamed, each with its codes
    assert (tmp_path / "song.wav").read_bytes() == (tmp_path / "plain.wav").read_bytes()


def test_cli_streams_wav_to_stdout(tiny_ckpt: Path, tmp_path: Path, capsysbinary) -> None:
    assert gen(tiny_ckpt, str(tmp_path / "plain.wav")) == 0
    capsysbinary.readouterr()
    assert gen(tiny_ckpt, "-") == 0
    out = capsysbinary.readouterr().out  # the WAV and nothing else
    assert out[44:] == (tmp_path / "plain.wav").read_bytes()[44:]


def test_cli_stream_needs_wav(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert gen(tiny_ckpt, str(tmp_path / "song.flac"), "--stream") == 2
    assert "--stream writes WAV" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# A stream's whole life in a fresh interpreter, which must exit 0 (a worker thread still inside
# torch when the interpreter ends aborts it: "terminate called without an active exception").
LIFE_PRELUDE = """
import gc, sys, threading
import heartmula_rt
from heartmula_rt.runtime.stream import SongStream
from heartmula_rt.request import CodecParams, SamplingParams, SongRequest

pipe = heartmula_rt.load_pipeline(sys.argv[1], device="cpu")

def long_stream():  # every frame of a long song: the worker is busy for a while
    return SongStream(
        pipe, pipe.prompt(SongRequest.of("piano", "la la", max_frames=1000)),
        SamplingParams(max_frames=1000, stop_at_eos=False), CodecParams(num_steps=1),
    )

def no_worker_left():
    gc.collect()
    assert threading.enumerate() == [threading.main_thread()], threading.enumerate()
"""

LIVES = {
    "exit-without-iterating": "s = pipe.stream('piano', 'la la', max_seconds=60, seed=0)",
    "exit-after-break": "s = long_stream()\nfor piece in s:\n    break",
    "stop-then-exit": """
s = long_stream()
next(s)
s.stop()
no_worker_left()  # stop() returns with the worker done: the rest is queued
assert s.interrupted and s.frames.shape[1] < 1001
assert sum(p.shape[1] for p in s) > 0  # the song to the frame where the LM stopped
""",
    "stop-before-the-first-frame": """
s = long_stream()
s.stop()
no_worker_left()
assert s.interrupted
""",
    "close": """
s = long_stream()
next(s)
s.close()
no_worker_left()
assert list(s) == []  # unread pieces dropped, the iteration over
s.close()  # again: nothing to do
""",
    "context-manager": """
with long_stream() as s:
    next(s)
no_worker_left()
""",
    "garbage-collected": """
for piece in long_stream():
    break  # nothing holds the stream now
no_worker_left()
s = long_stream()
del s
no_worker_left()
""",
    "waiting-for-the-pipeline": """
s = long_stream()
waiting = long_stream()  # its worker waits for the first song's lock
waiting.close()
s.close()
no_worker_left()
""",
}


@pytest.mark.parametrize("life", list(LIVES))
def test_stream_closes_at_any_point(tiny_ckpt: Path, life: str) -> None:
    code = LIFE_PRELUDE + LIVES[life]
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_ckpt)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
