"""GPU micro-benchmarks (pytest-benchmark): the sampler, one decode frame, one codec window, and
each quantized linear's plain and fast forward.

    pytest benchmarks/ --benchmark-json=micro.json

Skipped without a CUDA GPU or pytest-benchmark. Synthetic 3B bf16 LM weights and the full float32
codec are made on the GPU once per session. A round is one timed call of the benchmarked function
followed by a device sync; where a round holds several calls, `extra_info.calls` says how many.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from heartmula_rt.quant.fast import fast_module
from heartmula_rt.quant.formats import FORMATS

from heartmula_rt.config import WINDOW
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.model.sampling import cfg_mix, sample_topk
from heartmula_rt.model.synthetic import Models, synthetic_models, synthetic_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import decode_one_frame, prefill, song_draw
from heartmula_rt.runtime.engine import make_engine

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("the micro-benchmarks need a CUDA GPU", allow_module_level=True)

DEVICE = torch.device("cuda")
SONG_FRAMES = 64


def timed(benchmark, fn: Callable[[], object], *, calls: int = 1, rounds: int = 20) -> None:
    """Benchmark `calls` calls of fn and a sync per round, after two warm-up rounds."""

    def round_() -> None:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(DEVICE)

    benchmark.extra_info["calls"] = calls
    benchmark.pedantic(round_, rounds=rounds, warmup_rounds=2)


@pytest.fixture(scope="module")
def models() -> Models:
    return synthetic_models("3B", DEVICE, torch.bfloat16)


@pytest.fixture(scope="module")
def prompt(models: Models) -> Prompt:
    return synthetic_prompt(256, models.lm_config.text_vocab_size)


# Songs per sampler call: one song, and a batch's worth.
SAMPLER_SONGS = [1, 16]


def _codebook_logits(songs: int) -> torch.Tensor:
    """Codebook-0 logits of one CFG step: [cond, uncond] rows of the 8197-token vocabulary, per
    song."""
    g = torch.Generator(DEVICE).manual_seed(0)
    return torch.randn(2 * songs, 8197, generator=g, device=DEVICE).to(torch.bfloat16)


@pytest.mark.parametrize("songs", SAMPLER_SONGS)
def test_sampler_plain(benchmark, songs: int) -> None:
    """CFG mixing and top-k 50 sampling in torch (torch.topk for the threshold)."""
    logits, g = _codebook_logits(songs), torch.Generator(DEVICE).manual_seed(0)
    timed(
        benchmark,
        lambda: sample_topk(cfg_mix(logits[0::2], logits[1::2], 1.5), 50, 1.0, g),
        calls=100,
    )


@pytest.mark.parametrize("songs", SAMPLER_SONGS)
def test_sampler_fused(benchmark, songs: int) -> None:
    """The fused Triton sampler on the same rows (radix select for the threshold)."""
    sampling = pytest.importorskip("heartmula_rt.kernels.sampling")
    logits = _codebook_logits(songs)
    ints, floats = sampling.new_state(2 * songs, DEVICE)
    for i in range(songs):
        song = sampling.song_state(2 * i, 2, seed=i, topk=50, cfg_scale=1.5, temperature=1.0)
        ints[2 * i : 2 * i + 2] = song[0]
        floats[2 * i : 2 * i + 2] = song[1]
    timed(benchmark, lambda: sampling.fused_sample(logits, ints, floats, 1), calls=100)


@torch.inference_mode()
def test_decode_frame_plain(benchmark, models: Models, prompt: Prompt) -> None:
    """`decode.decode_one_frame` alone, always at the first position after the prompt."""
    sampling = SamplingParams()
    draw = song_draw(sampling, torch.device(DEVICE))
    cache = models.lm.new_cache(sampling.cfg_rows, len(prompt) + 1)
    frame, _ = prefill(models.lm, prompt, cache, draw)
    timed(
        benchmark,
        lambda: decode_one_frame(models.lm, frame, len(prompt), cache, None, draw),
        calls=10,
        rounds=10,
    )


@pytest.mark.parametrize("engine", ["plain", "graph"])
def test_song_frames(benchmark, models: Models, prompt: Prompt, engine: str) -> None:
    """A whole short song (prefill + SONG_FRAMES frames): per frame, mostly, for each engine;
    the first warm-up round captures the graph engine's graphs."""
    eng = make_engine(engine, models.lm, models.gen_config)
    benchmark.extra_info["frames"] = SONG_FRAMES
    benchmark.pedantic(
        lambda: eng.generate_frames(
            prompt, SamplingParams(max_frames=SONG_FRAMES, seed=0, stop_at_eos=False)
        ),
        rounds=5,
        warmup_rounds=1,
    )


@pytest.fixture(scope="module")
def window_codes(models: Models) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(models.codec_config.codebook_size, (8, WINDOW), generator=g)


def test_codec_window_dit(benchmark, models: Models, window_codes: torch.Tensor) -> None:
    """Flow matching of one 30 s window: conditioning and 10 guided Euler steps of the DiT."""
    timed(
        benchmark,
        lambda: next(
            models.codec.window_latents(window_codes, generator=torch.Generator().manual_seed(0))
        ),
        rounds=5,
    )


def test_codec_window_scalar(benchmark, models: Models, window_codes: torch.Tensor) -> None:
    """The scalar decoder on one window's latents: 744 latent frames → 30 s of stereo."""
    g = torch.Generator().manual_seed(0)
    latents = next(models.codec.window_latents(window_codes, generator=g))
    timed(benchmark, lambda: models.codec.decode_window(latents), rounds=5)


# The 3B backbone's matmul shapes (out, in): q/o, k/v, w1/w3, w2; and the 8197-way heads.
LINEAR_SHAPES = [(3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192), (8197, 3072)]


@pytest.mark.parametrize("impl", ["plain", "fast", "compiled"])
@pytest.mark.parametrize("mode", ["none", "int8", "nf4", "int4"])
def test_quantized_linears(benchmark, mode: str, impl: str) -> None:
    """One decode step's input (2 rows: CFG) through one weight of each 3B shape, bf16: the
    bf16 matmul ("none"), the stored format's dequantize-then-matmul ("plain"), its fast twin
    ("fast": Triton int8, bitsandbytes NF4, tinygemm int4) and the plain module through
    torch.compile ("compiled": inductor fuses the dequantization into the matmul, what torchao's
    weight-only modes amount to). GB/s in extra_info: the weights' bytes per call over the time.
    """
    if mode == "none" and impl != "plain":
        pytest.skip("bf16 has one implementation")
    g = torch.Generator(DEVICE).manual_seed(0)
    modules = []
    for out, n in LINEAR_SHAPES:
        w = torch.randn(out, n, generator=g, device=DEVICE).to(torch.bfloat16) / n**0.5
        if mode == "none":
            modules.append(lambda x, w=w: torch.nn.functional.linear(x, w))
            continue
        module = FORMATS[mode].from_weight(w)
        if impl == "fast":
            module = fast_module(module, DEVICE, torch.bfloat16)
            if type(module) in FORMATS.values():
                pytest.skip(f"no fast {mode} kernel here (bitsandbytes missing?)")
        modules.append(torch.compile(module, fullgraph=True) if impl == "compiled" else module)
    xs = [
        torch.randn(2, n, generator=g, device=DEVICE).to(torch.bfloat16) for _, n in LINEAR_SHAPES
    ]
    bytes_per_call = {"none": 2.0, "int8": 1.0, "nf4": 0.5 + 2 / 64, "int4": 0.5 + 4 / 128}[mode]
    weights = sum(out * n for out, n in LINEAR_SHAPES)
    benchmark.extra_info["weight_bytes"] = round(weights * bytes_per_call)

    def all_shapes() -> None:
        for module, x in zip(modules, xs, strict=True):
            module(x)

    all_shapes()  # compile and autotune outside the timing
    timed(benchmark, all_shapes, calls=20, rounds=10)
    seconds = benchmark.stats.stats.median / 20
    benchmark.extra_info["gbps"] = benchmark.extra_info["weight_bytes"] / seconds / 1e9
