"""The static decode engine against the plain loop and the reference (SPEC §3-4).

Without a GPU the static step runs eagerly (`graphs=False`) and through torch.compile, with the
fused sampler under Triton's interpreter: everything the graph engine does except the capture
itself. On a GPU machine the same tests run on the GPU, plus the captured engines' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from heartmula_rt.config import GenConfig
from heartmula_rt.errors import UserError
from heartmula_rt.memory.offload import OffloadedLayers
from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.folder import LM_DIR
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import Prompt, build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import GenerationInterrupted
from heartmula_rt.runtime.engine import PlainEngine, StaticEngine, make_engine

pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def lm(tiny_ckpt: Path) -> HeartMuLa:
    """The tiny-public LM in float32 where the sampler kernel runs."""
    return load_lm(tiny_ckpt / LM_DIR, device=DEVICE)[0]


def _cases(fixtures_dir: Path) -> dict[str, dict]:
    cases = json.loads((fixtures_dir / "tiny-public/expected/cases.json").read_text())["cases"]
    return {c["file"]: c for c in cases if c["kind"] == "mula"}


def _run(engine, prompt: Prompt, c: dict, **kwargs) -> torch.Tensor:
    args = {k: c[k] for k in ("topk", "temperature", "cfg_scale")}
    return engine.generate_frames(
        prompt, SamplingParams(max_frames=c["max_frames"], **{**args, **kwargs})
    )


@pytest.mark.parametrize(
    "file", ["mula_cfg15.safetensors", "mula_nocfg.safetensors", "mula_eos.safetensors"]
)
def test_greedy_frames_equal_the_reference(
    file: str, lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer, fixtures_dir: Path
) -> None:
    c = _cases(fixtures_dir)[file]
    expected = load_file(fixtures_dir / "tiny-public/expected" / file)["frames"].long()
    prompt = build_prompt(tokenizer, gen, c["tags"], c["lyrics"])
    # Small buckets and an odd sync interval: many graphs' worth of shapes, and EOS (the eos
    # case stops at frame 13) found in the middle of a run of unchecked frames.
    engine = StaticEngine(lm, gen, graphs=False, bucket=16, sync_every=5)
    frames = _run(engine, prompt, c)
    assert frames.dtype == torch.int64 and frames.device.type == "cpu"
    assert torch.equal(frames, expected)


def test_one_engine_serves_many_songs(lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer) -> None:
    engine = StaticEngine(lm, gen, graphs=False, bucket=32, capacity_step=64)
    plain = PlainEngine(lm, gen)
    short = build_prompt(tokenizer, gen, "rock", "hey")
    long = build_prompt(tokenizer, gen, "piano,happy", "[Verse]\n" + "la la la\n" * 12)
    requests = [  # (prompt, max_frames, cfg_scale, reallocates)
        (short, 20, 1.0, True),
        (short, 30, 1.5, True),  # 2 rows (guidance)
        (short, 25, 1.5, False),  # the same rows, fewer positions
        (short, 25, 1.0, True),  # 1 row: a batch keeps its row count (its matmuls' shapes)
        (long, 40, 2.0, True),  # 2 rows again, more positions
        (short, 30, 1.5, False),
    ]
    for prompt, max_frames, cfg_scale, reallocates in requests:
        before = engine._state
        kwargs = {"max_frames": max_frames, "topk": 1, "cfg_scale": cfg_scale}
        frames = engine.generate_frames(prompt, SamplingParams(**kwargs))
        assert (engine._state is not before) == reallocates
        assert engine._state.capacity >= len(prompt) + max_frames
        assert torch.equal(frames, plain.generate_frames(prompt, SamplingParams(**kwargs)))


def test_seeded_sampling_repeats(lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer) -> None:
    engine = StaticEngine(lm, gen, graphs=False)
    prompt = build_prompt(tokenizer, gen, "jazz", "[Verse]\nhello\n")
    runs = [
        engine.generate_frames(prompt, SamplingParams(max_frames=10, seed=s, stop_at_eos=False))
        for s in (1, 2, 1)
    ]
    assert all(r.shape == (8, 11) for r in runs)
    assert torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], runs[1])
    # Within one song the RNG moves on: frames are not repeats of each other.
    assert len({tuple(col.tolist()) for col in runs[0].T}) > 8


def test_ctrl_c_keeps_the_frames_made(lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer) -> None:
    prompt = build_prompt(tokenizer, gen, "pop", "[Chorus]\nla\n")
    full = PlainEngine(lm, gen).generate_frames(prompt, SamplingParams(max_frames=30, topk=1))
    engine = StaticEngine(lm, gen, graphs=False, sync_every=4)

    def stop_after(n: int) -> None:
        if n >= 9:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as stop:
        engine.generate_frames(prompt, SamplingParams(max_frames=30, topk=1), on_frame=stop_after)
    made = stop.value.frames
    assert made.shape[1] == 9  # frame 0 + two runs of 4
    assert torch.equal(made, full[:, :9])


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_static_engine_serves_calls_in_and_out_of_inference_mode(
    first: str, tiny_ckpt: Path, gen: GenConfig, tokenizer: Tokenizer
) -> None:
    # A fresh LM: its lazily built RoPE tables come from the first call's mode too.
    lm = load_lm(tiny_ckpt / LM_DIR, device=DEVICE)[0]
    prompt = build_prompt(tokenizer, gen, "pop", "[Chorus]\nla\n")
    kwargs = {"max_frames": 12, "topk": 1, "cfg_scale": 1.5}
    expected = PlainEngine(lm, gen).generate_frames(prompt, SamplingParams(**kwargs))
    engine = StaticEngine(lm, gen, graphs=False)
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    other = "no_grad" if first == "inference_mode" else "inference_mode"
    for mode in (first, other, first):  # the state made in the first mode serves both
        with modes[mode]():
            assert torch.equal(
                engine.generate_frames(prompt, SamplingParams(**kwargs)), expected
            ), mode


def test_compiled_step_equals_the_plain_loop(
    lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer, fixtures_dir: Path
) -> None:
    c = _cases(fixtures_dir)["mula_cfg15.safetensors"]
    prompt = build_prompt(tokenizer, gen, c["tags"], c["lyrics"])
    # aot_eager: the whole step traced as one graph (fullgraph) with its state mutations
    # functionalized, including the recompile with a dynamic kv length at the second bucket;
    # inductor's CPU code generation would add minutes and is not the GPU's code anyway.
    engine = StaticEngine(
        lm, gen, compile=True, compile_backend="aot_eager", graphs=False, bucket=16
    )
    plain = PlainEngine(lm, gen)
    assert torch.equal(_run(engine, prompt, c), _run(plain, prompt, c))


def test_compile_engine_refuses_streamed_layers(
    tiny_ckpt: Path, gen: GenConfig, tokenizer: Tokenizer
) -> None:
    lm = load_lm(tiny_ckpt / LM_DIR, device=DEVICE)[0]
    lm.backbone.layers = OffloadedLayers(lm.backbone.layers, DEVICE, resident=1)
    with pytest.raises(UserError, match="use --engine graph") as refused:
        StaticEngine(lm, gen, compile=True, compile_backend="aot_eager", graphs=False)
    assert "\n" not in str(refused.value)
    # The graph engine's step runs over them, making the plain loop's frames.
    prompt = build_prompt(tokenizer, gen, "pop", "[Chorus]\nla\n")
    kwargs = {"max_frames": 12, "topk": 1, "cfg_scale": 1.5}
    frames = StaticEngine(lm, gen, graphs=False).generate_frames(prompt, SamplingParams(**kwargs))
    assert torch.equal(
        frames, PlainEngine(lm, gen).generate_frames(prompt, SamplingParams(**kwargs))
    )


def test_engine_choice(tiny_lm: HeartMuLa, gen: GenConfig) -> None:  # tiny_lm: on the CPU
    assert make_engine("plain", tiny_lm, gen).name == "plain"
    with pytest.raises(UserError, match="unknown engine 'fast'"):
        make_engine("fast", tiny_lm, gen)
    for name in ("graph", "compile"):
        with pytest.raises(UserError, match=f"the {name} engine needs a CUDA GPU"):
            make_engine(name, tiny_lm, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["graph", pytest.param("compile", marks=pytest.mark.inductor)])
def test_gpu_engines_equal_the_reference_and_reuse_graphs(
    name: str, lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer, fixtures_dir: Path
) -> None:
    engine = make_engine(name, lm, gen)
    cases = _cases(fixtures_dir)
    captured = []
    for _ in range(3):  # a shape is captured at its second frame; later songs only replay
        for file, c in cases.items():
            expected = load_file(fixtures_dir / "tiny-public/expected" / file)["frames"].long()
            prompt = build_prompt(tokenizer, gen, c["tags"], c["lyrics"])
            assert torch.equal(_run(engine, prompt, c), expected), file
        captured.append(len(engine._graphs))
    assert captured[2] == captured[1] > 0
    prompt = build_prompt(tokenizer, gen, "jazz", "hello")
    runs = [engine.generate_frames(prompt, SamplingParams(max_frames=20, seed=s)) for s in (3, 3)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.gpu
def test_one_side_stream_per_engine(
    lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer, streams_made: list[str]
) -> None:
    # Each (rows, bucket)'s first frame runs on a side stream; torch keeps a cuBLAS workspace
    # per stream that ran a matmul, so all of them must share one.
    engine = StaticEngine(lm, gen, bucket=16)
    short = build_prompt(tokenizer, gen, "jazz", "hello")
    long = build_prompt(tokenizer, gen, "piano,happy", "[Verse]\n" + "la la la\n" * 12)
    for prompt, cfg_scale in ((short, 1.5), (long, 1.5), (short, 1.0)):  # new buckets each time
        engine.generate_frames(
            prompt, SamplingParams(max_frames=40, cfg_scale=cfg_scale, seed=0, stop_at_eos=False)
        )
    assert streams_made == ["heartmula_rt.model.side_stream"]
