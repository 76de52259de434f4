"""The compile engine's frame step through real inductor on the CPU (C++ code generation).

tests/test_engine.py traces the step with `aot_eager`; here inductor also lowers and compiles
it, in a fresh cache folder, so CI really compiles: the whole step must be one graph
(`fullgraph=True`), recompiled at most once per position bucket, and its frames must be the
plain loop's (greedy) and the uncompiled step's (sampled, same seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch._inductor.metrics as inductor_metrics
from tokenizers import Tokenizer
from torch._inductor.compile_fx import compile_fx
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from heartmula_rt.config import GenConfig
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import Prompt, build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import PlainEngine, StaticEngine

pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")

# Small buckets, so a short song crosses several; few frames, because the fused sampler runs
# under Triton's interpreter here (most of the test's time besides compiling).
BUCKET = 4
FRAMES = 12


@dataclass
class CountingInductor:
    """A torch.compile backend: inductor, counting its compilations and generated kernels."""

    kernels: list[int] = field(default_factory=list)  # per compilation

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        inductor_metrics.reset()
        compiled = compile_fx(gm, example_inputs)
        self.kernels.append(inductor_metrics.generated_kernel_count)
        return compiled


@dataclass
class Compiled:
    engine: StaticEngine
    backend: CountingInductor


@pytest.fixture(scope="module")
def prompt(tiny_ckpt: Path, gen: GenConfig) -> Prompt:
    tokenizer = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    return build_prompt(tokenizer, gen, "piano,happy,wedding", "[Verse]\nla la la\n")


@pytest.fixture(scope="module")
def compiled(
    tiny_lm: HeartMuLa, gen: GenConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Compiled]:
    """One compile engine for the module's tests; each test counts the compilations it adds."""
    torch._dynamo.reset()  # no compiled code or dynamic-shape decisions from earlier tests
    torch._dynamo.utils.counters.clear()
    backend = CountingInductor()
    with temporary_cache_dir(str(tmp_path_factory.mktemp("inductor-cache"))):
        engine = StaticEngine(
            tiny_lm, gen, compile=True, compile_backend=backend, graphs=False, bucket=BUCKET
        )
        yield Compiled(engine, backend)
    torch._dynamo.reset()


def _buckets(engine: StaticEngine, prompt: Prompt, frames: int) -> int:
    """How many position buckets the steps of a song read."""
    capacity = engine._state.capacity
    return len({engine._kv_len(len(prompt) + n, capacity) for n in range(frames)})


def _greedy(engine, prompt: Prompt, cfg_scale: float) -> torch.Tensor:
    kwargs = {"max_frames": FRAMES, "topk": 1, "cfg_scale": cfg_scale, "stop_at_eos": False}
    return engine.generate_frames(prompt, SamplingParams(**kwargs))


@pytest.mark.parametrize("cfg_scale", [1.5, 1.0])  # 2 rows (guidance), then 1
def test_compiled_greedy_frames_equal_the_plain_loop(
    compiled: Compiled, tiny_lm: HeartMuLa, gen: GenConfig, prompt: Prompt, cfg_scale: float
) -> None:
    before = len(compiled.backend.kernels)
    frames = _greedy(compiled.engine, prompt, cfg_scale)
    assert torch.equal(frames, _greedy(PlainEngine(tiny_lm, gen), prompt, cfg_scale))
    compiles = len(compiled.backend.kernels) - before
    buckets = _buckets(compiled.engine, prompt, FRAMES)
    print(
        f"cfg {cfg_scale}: {compiles} inductor compilations over {buckets} buckets, "
        f"kernels generated per compilation: {compiled.backend.kernels[before:]}"
    )
    assert buckets >= 3
    # The first bucket specializes kv_len, the second recompiles with it dynamic, and every
    # later bucket reuses that (after the other row count kv_len is dynamic from the start).
    assert compiles <= min(2, buckets)
    assert all(count > 0 for count in compiled.backend.kernels)
    assert not torch._dynamo.utils.counters["graph_break"]  # fullgraph: one graph per compile


def test_compiled_sampled_frames_equal_the_uncompiled_step(
    compiled: Compiled, tiny_lm: HeartMuLa, gen: GenConfig, prompt: Prompt
) -> None:
    kwargs = {"max_frames": 6, "topk": 50, "cfg_scale": 1.5, "seed": 7, "stop_at_eos": False}
    uncompiled = StaticEngine(tiny_lm, gen, graphs=False, bucket=BUCKET)
    frames = compiled.engine.generate_frames(prompt, SamplingParams(**kwargs))
    assert torch.equal(frames, uncompiled.generate_frames(prompt, SamplingParams(**kwargs)))
    # Sampled, not greedy: the frames are not all the same.
    assert len({tuple(col.tolist()) for col in frames.T}) > 3
