"""Real CUDA graph captures where they used to go wrong: a model on a GPU that is not the current
one (the codec on cuda:1), and the LM's thread and the codec's thread capturing at once on one
GPU. Each capture must make what the same model makes without graphs, or alone."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from torch import Tensor

from heartmula_rt.config import LATENTS_PER_CODE, WINDOW, GenConfig
from heartmula_rt.model.checkpoint import load_codec, load_lm
from heartmula_rt.model.codec.dit import Estimator
from heartmula_rt.model.codec.graphed import GraphedEstimator
from heartmula_rt.model.folder import CODEC_DIR, LM_DIR
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import StaticEngine

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)


def _codec_estimator(tiny_ckpt: Path, device: str) -> tuple[Estimator, int]:
    """The tiny codec's estimator on `device`, and its input channels."""
    codec = load_codec(tiny_ckpt / CODEC_DIR, device=torch.device(device))[0]
    return codec.flow_matching.estimator, codec.config.in_channels


def _window(estimator: Estimator, channels: int, songs: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random estimator inputs of `songs` guided windows, on the estimator's device."""
    device = next(estimator.parameters()).device
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(2 * songs, LATENTS_PER_CODE * WINDOW, channels, generator=g)
    return inp.to(device), torch.rand(2 * songs, generator=g).to(device)


def _frames(engine: StaticEngine, tokenizer: Tokenizer, gen: GenConfig) -> torch.Tensor:
    prompt = build_prompt(tokenizer, gen, "jazz", "hello")
    return engine.generate_frames(prompt, SamplingParams(max_frames=40, seed=1, stop_at_eos=False))


@two_gpus
def test_a_codec_on_the_second_gpu_captures_there(tiny_ckpt: Path) -> None:
    estimator, channels = _codec_estimator(tiny_ckpt, "cuda:1")
    fast = GraphedEstimator(estimator)
    torch.cuda.set_device(0)  # the LM's GPU is the current one
    with torch.inference_mode():
        for songs in (1, 2, 1):
            inp, t = _window(estimator, channels, songs, seed=songs)
            torch.testing.assert_close(fast(inp, t), estimator(inp, t), rtol=1e-5, atol=1e-5)
    assert [key[2] for key in fast._captured] == [torch.device("cuda:1")] * 2


@two_gpus
def test_an_engine_on_the_second_gpu_captures_there(
    tiny_ckpt: Path, tokenizer: Tokenizer, gen: GenConfig
) -> None:
    lm = load_lm(tiny_ckpt / LM_DIR, device="cuda:0")[0]
    expected = _frames(StaticEngine(lm, gen), tokenizer, gen)
    torch.cuda.set_device(0)
    engine = StaticEngine(load_lm(tiny_ckpt / LM_DIR, device="cuda:1")[0], gen)
    for _ in range(2):  # captured at a shape's second frame; the second song replays
        assert torch.equal(_frames(engine, tokenizer, gen), expected)
    assert engine._graphs


def test_the_lm_and_the_codec_capture_at_once_on_one_gpu(
    tiny_ckpt: Path, tokenizer: Tokenizer, gen: GenConfig
) -> None:
    """Fresh engines and estimators in two threads, each capturing anew, started together:
    every result equals the one made alone."""
    device = torch.device("cuda")
    lm = load_lm(tiny_ckpt / LM_DIR, device=device)[0]
    estimator, channels = _codec_estimator(tiny_ckpt, "cuda")
    rounds = 4
    frames = _frames(StaticEngine(lm, gen), tokenizer, gen)
    windows = [_window(estimator, channels, 1 + i % 2, seed=i) for i in range(rounds)]
    with torch.inference_mode():
        velocities = [estimator(*w) for w in windows]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def lm_thread() -> None:
        start.wait()
        for _ in range(rounds):
            assert torch.equal(_frames(StaticEngine(lm, gen), tokenizer, gen), frames)

    def codec_thread() -> None:
        start.wait()
        with torch.inference_mode():
            for window, velocity in zip(windows, velocities, strict=True):
                out = GraphedEstimator(estimator)(*window)
                torch.testing.assert_close(out, velocity, rtol=1e-5, atol=1e-5)

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as e:  # reported by the test's thread below
                errors.append(e)
                start.abort()

        return run

    threads = [threading.Thread(target=guarded(w)) for w in (lm_thread, codec_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
