"""What a CUDA graph capture cannot contain, checked without a GPU.

A capture records kernels without running them, so a captured step must never wait for the
device (`.item()`, `bool(t)`, a copy to the host), copy host data in (`torch.tensor(list)`,
which also syncs), or allocate a tensor whose size depends on values (`nonzero`, boolean
masks). `capture_guard` fails on each of these. The steps the engines capture run under it at
full size on the meta device, after one warm call outside it, as the engines warm every shape
before capturing it: the LM's frame step (`StaticEngine._step`; bf16, with and without CFG, and
with each quantized format) and the codec's estimator over one guided window
(`codec/graphed.py`). Meta tensors hold no data, so anything that reads a value also fails
there. Not visible here: CUDA API calls such as `torch.cuda.synchronize()`.

How each owner captures is checked here too, with torch's CUDA calls replaced by recorders: both
engines capture through `graphs.capture` (under their model's device, on their own side stream,
holding the process's capture lock), and the codec keeps a graph per batch shape, the last
`MAX_GRAPHS` used. The real captures run in the GPU tests (test_capture_gpu.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from heartmula_rt.quant import quantize_model
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from heartmula_rt.config import (
    CODEC_PRESETS,
    LATENTS_PER_CODE,
    LM_PRESETS,
    WINDOW,
    GenConfig,
    LMConfig,
)
from heartmula_rt.model import graphs
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.codec.graphed import MAX_GRAPHS, GraphedEstimator
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import StaticEngine

pytest.importorskip("triton", reason="the static engine's sampler is a Triton kernel")

aten = torch.ops.aten
CAPACITY = 1024  # one cache capacity step


class CaptureUnsafe(AssertionError):
    """Something ran that a CUDA graph capture cannot hold."""


# Tensors made from host data: a host-to-device copy (and a sync) on every call.
_FROM_HOST = {
    torch.tensor,
    torch.as_tensor,
    torch.asarray,
    torch.from_numpy,
    torch.frombuffer,
    Tensor.new_tensor,
}
_BOOL_DTYPES = (torch.bool, torch.uint8)  # index masks: the result's size is their count


class _NoHostData(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FROM_HOST:
            raise CaptureUnsafe(f"{func.__name__} copies host data to the device")
        return func(*args, **(kwargs or {}))


class _NoSyncNoDynamicShapes(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if torch.Tag.data_dependent_output in func.tags or func is aten.is_nonzero.default:
            raise CaptureUnsafe(f"{func} reads a tensor's value on the host (a sync)")
        if torch.Tag.dynamic_output_shape in func.tags and not _index_by_integers(func, args):
            raise CaptureUnsafe(f"{func} allocates a result whose size depends on values")
        if any(t.device.type == "cpu" for t in tensors) or _device(kwargs) == "cpu":
            raise CaptureUnsafe(f"{func} touches host memory (a copy to or from the device)")
        return func(*args, **kwargs)


def _index_by_integers(func, args) -> bool:
    """Indexing by integer tensors: its result's size is the indices', not their values'."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return all(i is None or i.dtype not in _BOOL_DTYPES for i in args[1])


def _device(kwargs: dict) -> str | None:
    device = kwargs.get("device")
    return None if device is None else torch.device(device).type


@contextlib.contextmanager
def capture_guard() -> Iterator[None]:
    """Raise CaptureUnsafe at the first thing inside that a CUDA graph capture cannot hold."""
    with torch.no_grad(), _NoHostData(), _NoSyncNoDynamicShapes():
        yield


def _meta_lm(quant: str = "none") -> HeartMuLa:
    with torch.device("meta"):
        lm = HeartMuLa(LMConfig.from_dict(LM_PRESETS["3B"])).to(torch.bfloat16)
    return quantize_model(lm, quant)


def _frame_step(lm: HeartMuLa, cfg_scale: float) -> Callable[[], None]:
    """One frame of the static engine on meta, warmed once outside the guard."""
    engine = StaticEngine(lm, GenConfig(), graphs=False)
    step = engine.one_song_step(SamplingParams(cfg_scale=cfg_scale), CAPACITY)

    with torch.no_grad():
        step()  # the engine's uncaptured first frame of a shape (RoPE tables built here)
    return step


@pytest.fixture(scope="module")
def lm() -> HeartMuLa:
    return _meta_lm()


@pytest.mark.parametrize("cfg_scale", [1.5, 1.0])
def test_frame_step_is_capture_safe(lm: HeartMuLa, cfg_scale: float) -> None:
    step = _frame_step(lm, cfg_scale)
    with capture_guard():
        step()


@pytest.mark.parametrize("quant", ["int8", "nf4", "int4"])
def test_quantized_frame_step_is_capture_safe(quant: str) -> None:
    step = _frame_step(_meta_lm(quant), 1.5)
    with capture_guard():
        step()


def test_codec_estimator_is_capture_safe() -> None:
    config = CODEC_PRESETS["full"]
    with torch.device("meta"):
        codec = HeartCodec(config)
    estimator = codec.set_precision("mixed").flow_matching.estimator  # the GPU default
    # The window graphed.py captures: [uncond; cond] × 744 latent frames × [x | ic | mu].
    inp = torch.zeros(2, LATENTS_PER_CODE * WINDOW, config.in_channels, device="meta")
    t = torch.zeros(2, device="meta")
    with torch.no_grad():
        estimator(inp, t)
    with capture_guard():
        v = estimator(inp, t)
    assert v.shape == (2, LATENTS_PER_CODE * WINDOW, config.out_channels)


INJECTIONS = {
    "item": lambda t: t.item(),
    "int": lambda t: int(t),
    "bool": lambda t: bool(t),
    "cpu": lambda t: t.cpu(),
    "tolist": lambda t: t.tolist(),
    "torch.tensor": lambda t: torch.tensor([1, 2], device=t.device),
    "nonzero": lambda t: t.nonzero(),
    "boolean mask": lambda t: t[t > 0],
}


@pytest.mark.parametrize("name", INJECTIONS)
def test_the_guard_fires_on_what_a_capture_cannot_hold(
    lm: HeartMuLa, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = _frame_step(lm, 1.5)
    backbone_step = lm.backbone_step

    def with_injection(rows: Tensor, start: Tensor, *args, **kwargs):
        INJECTIONS[name](start[:1])  # start: the device-held positions
        return backbone_step(rows, start, *args, **kwargs)

    monkeypatch.setattr(lm, "backbone_step", with_injection)
    with pytest.raises(CaptureUnsafe), capture_guard():
        step()


class FakeStream:
    """A CUDA stream as the owners use one: made per device, waited on."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    def wait_stream(self, other: FakeStream) -> None:
        pass


@dataclass
class Capture:
    """One `torch.cuda.graph(...)` entered: its arguments, the device current then, and
    whether the process's capture lock was held."""

    pool: object
    stream: object
    mode: str
    device: torch.device | None
    locked: bool


class FakeGraph:
    replays = 0

    def replay(self) -> None:
        self.replays += 1


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[Capture]:
    """torch's CUDA graph and stream calls as recorders: a capture runs its body once, for real
    on the CPU, and is recorded; a replay only counts."""
    made: list[Capture] = []
    current: list[torch.device] = []

    @contextlib.contextmanager
    def device(d: torch.device) -> Iterator[None]:
        current.append(d)
        yield
        current.pop()

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global") -> Iterator[None]:
        locked = graphs.CAPTURE_LOCK.locked()
        made.append(
            Capture(pool, stream, capture_error_mode, current[-1] if current else None, locked)
        )
        yield

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "device", device)
    monkeypatch.setattr(cuda, "graph", graph)
    monkeypatch.setattr(cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "graph_pool_handle", lambda: (0, 1))
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: FakeStream(device))
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    return made


def safe_capture(owner, device: torch.device) -> Capture:
    """A capture as `owner` (the engine, the codec's estimator) must make it: into its own pool,
    on its side stream of `device`, with `device` current, thread-local, under the lock."""
    return Capture(
        pool=owner._pool,
        stream=owner._side_stream.get(device),
        mode="thread_local",
        device=device,
        locked=True,
    )


def test_the_engine_captures_on_its_device_and_side_stream_under_the_lock(
    tiny_lm: HeartMuLa, captures: list[Capture]
) -> None:
    engine = StaticEngine(tiny_lm, GenConfig())
    state = engine._reserve(2, 64)
    kv_len = engine._kv_len(0, state.capacity)
    for _ in range(3):  # warm frame, capture, replay
        engine._run_step(state, kv_len)
    (capture,) = captures
    assert capture == safe_capture(engine, tiny_lm.device)
    assert engine._graphs[(2, kv_len)].replays == 2
    assert not graphs.CAPTURE_LOCK.locked()


def _velocity(inp: Tensor, t: Tensor) -> Tensor:
    return inp * t[:, None, None]


def test_the_codec_captures_on_its_device_and_side_stream_under_the_lock(
    captures: list[Capture],
) -> None:
    fast = GraphedEstimator(_velocity)
    inp = torch.randn(2, 8, 3)
    t = torch.full((2,), 0.5)
    assert torch.equal(fast(inp, t), _velocity(inp, t))
    (capture,) = captures
    assert capture == safe_capture(fast, inp.device)


def test_the_codec_keeps_a_graph_per_batch_shape_least_recently_used_out(
    captures: list[Capture],
) -> None:
    fast = GraphedEstimator(_velocity)

    def call(batch: int) -> None:
        fast(torch.randn(2 * batch, 8, 3), torch.full((2 * batch,), 0.5))

    captured = []
    for batch in (1, 2, 1, 2, 1, 3, 4, 5, 1, 2):
        before = len(captures)
        call(batch)
        if len(captures) > before:
            captured.append(batch)
    # 1 and 2 alternate on their two graphs; 5 drops 2, the least recently used, so 1 replays
    # and 2 is captured again, dropping 3.
    assert MAX_GRAPHS == 4
    assert captured == [1, 2, 3, 4, 5, 2]
    assert [key[0][0] // 2 for key in fast._captured] == [4, 5, 1, 2]


def test_captures_of_two_threads_take_turns(captures: list[Capture]) -> None:
    """The LM's thread and the codec's thread each hold the lock for their whole capture."""
    inside, trying, release = threading.Event(), threading.Event(), threading.Event()
    order = []

    def first() -> None:
        with graphs.capture(FakeGraph(), torch.device("cpu"), FakeStream()):
            order.append("first in")
            inside.set()
            release.wait(10)
            order.append("first out")

    def second() -> None:
        inside.wait(10)
        trying.set()
        with graphs.capture(FakeGraph(), torch.device("cpu"), FakeStream()):
            order.append("second in")

    threads = [threading.Thread(target=f) for f in (first, second)]
    for thread in threads:
        thread.start()
    trying.wait(10)
    threads[1].join(0.2)  # time enough to get in, were the lock not held
    blocked = threads[1].is_alive()
    release.set()
    for thread in threads:
        thread.join(10)
    assert blocked and order == ["first in", "first out", "second in"]
    assert len(captures) == 2 and all(c.locked for c in captures)
