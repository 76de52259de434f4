"""The codec's optional fast path: the DiT estimator at its one fixed window shape, captured as a
CUDA graph (optionally compiled with torch.compile first) and replayed for every ODE step.

A window of one song is always [2 (CFG), 744, in_channels] at the same dtype, so one graph
serves every step of every window and the ten steps of a window cost ten launches instead of
thousands. B songs' windows decoded together (`detokenize_many`) are [2B, 744, in_channels]:
the graph is keyed by the input's shape, so a batch of another size captures its own graph, in
place of the last one (every round of the same size reuses it).
`FlowMatching.sample` calls it where it would call the estimator; results equal the plain
estimator's up to the kernels' rounding. On the CPU, `graphs=False` runs the (compiled)
estimator directly: that is how the tests check this path without a GPU.
"""

from __future__ import annotations

import copy

import torch

from heartmula_rt.model.codec.dit import Estimator
from heartmula_rt.model.side_stream import SideStream

FAST_PATHS = ("graph", "compile")


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
        self._side_stream = SideStream()  # each capture's warm-up runs on it
        self._key: tuple | None = None  # (shape, dtype, device) the graph was captured for
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inp = self._t = self._out = None

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
        if key != self._key:
            self._capture(inp, t)
            self._key = key
        self._inp.copy_(inp)
        self._t.copy_(t)
        self._graph.replay()
        return self._out.clone()  # the static output is overwritten by the next replay

    def _capture(self, inp: torch.Tensor, t: torch.Tensor) -> None:
        self._graph = None  # drop an old graph (and its memory pool) first
        with torch.inference_mode(False):  # refilled in and out of inference mode
            self._inp, self._t = inp.clone(), t.clone()
        # Warm-up on a side stream: compilation, kernel choice and workspaces happen outside
        # the capture, where they are not allowed.
        side = self._side_stream.get(inp.device)
        side.wait_stream(torch.cuda.current_stream(inp.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(self._inp, self._t)
        torch.cuda.current_stream(inp.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the LM's thread goes on meanwhile (serve), as in engine.py.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._out = self.fn(self._inp, self._t)
        self._graph = graph
