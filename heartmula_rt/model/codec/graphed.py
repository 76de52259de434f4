"""The codec's optional fast path: the DiT estimator at its one fixed window shape, captured as a
CUDA graph (optionally compiled with torch.compile first) and replayed for every ODE step.

A window of one song is always [2 (CFG), 744, in_channels] at the same dtype, so one graph
serves every step of every window and the ten steps of a window cost ten launches instead of
thousands. B songs' windows decoded together (`detokenize_many`) are [2B, 744, in_channels]:
graphs are kept per input shape, the last `MAX_GRAPHS` used, so batches whose sizes alternate
(one song, then the songs that ended together) replay their graphs instead of capturing anew.
`FlowMatching.sample` calls it where it would call the estimator; results equal the plain
estimator's up to the kernels' rounding. On the CPU, `graphs=False` runs the (compiled)
estimator directly: that is how the tests check this path without a GPU.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch

from heartmula_rt.model.codec.dit import Estimator
from heartmula_rt.model.graphs import capture
from heartmula_rt.model.side_stream import SideStream

FAST_PATHS = ("graph", "compile")
MAX_GRAPHS = 4  # input shapes kept captured (batch sizes), least recently used dropped first

GraphKey = tuple[tuple[int, ...], torch.dtype, torch.device]


@dataclass
class _Captured:
    """One input shape's graph and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    inp: torch.Tensor
    t: torch.Tensor
    out: torch.Tensor


class GraphedEstimator:
    """Calls like the estimator, `(inp [B, T, C], t [B]) → float32 velocity [B, T, out]`."""

    def __init__(
        self,
        estimator: Estimator,
        *,
        compile: bool = False,
        compile_backend: str = "inductor",
        graphs: bool = True,
    ) -> None:
        self.estimator = estimator
        self.compile, self.compile_backend = compile, compile_backend
        self.fn = estimator
        if compile:
            self.fn = torch.compile(
                estimator, fullgraph=True, dynamic=False, backend=compile_backend
            )
        self.graphs = graphs
        self._side_stream = SideStream()  # each capture and its warm-up run on it
        self._captured: OrderedDict[GraphKey, _Captured] = OrderedDict()  # oldest use first
        # Replayed one at a time on the codec's thread, so the graphs share one memory pool.
        self._pool: tuple[int, int] | None = None

    def __deepcopy__(self, memo: dict) -> GraphedEstimator:
        """A copied codec's fast path: bound to the copied estimator and captured anew at its
        first call (a CUDA graph cannot be copied, and the original's computes with the
        original's weights)."""
        return GraphedEstimator(
            copy.deepcopy(self.estimator, memo),
            compile=self.compile,
            compile_backend=self.compile_backend,
            graphs=self.graphs,
        )

    def __call__(self, inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.graphs:
            return self.fn(inp, t)
        key = (tuple(inp.shape), inp.dtype, inp.device)
        captured = self._captured.get(key)
        if captured is None:
            if len(self._captured) == MAX_GRAPHS:
                self._captured.popitem(last=False)  # its graph's memory returns to the pool
            captured = self._captured[key] = self._capture(inp, t)
        else:
            self._captured.move_to_end(key)
        captured.inp.copy_(inp)
        captured.t.copy_(t)
        captured.graph.replay()
        return captured.out.clone()  # the static output is overwritten by the next replay

    def _capture(self, inp: torch.Tensor, t: torch.Tensor) -> _Captured:
        with torch.inference_mode(False):  # refilled in and out of inference mode
            static_inp, static_t = inp.clone(), t.clone()
        # Warm-up on a side stream: compilation, kernel choice and workspaces happen outside
        # the capture, where they are not allowed.
        side = self._side_stream.get(inp.device)
        side.wait_stream(torch.cuda.current_stream(inp.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_inp, static_t)
        torch.cuda.current_stream(inp.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with capture(graph, inp.device, side, pool=self._pool):
            out = self.fn(static_inp, static_t)
        return _Captured(graph, static_inp, static_t, out)
