"""CUDA graph capture for every owner of graphs: the LM's static engine and the codec's estimator.

`torch.cuda.graph` left to itself captures on one stream of its own, made on whichever device was
current at its first use, and on the caller's current device: a model on another GPU (the codec
on cuda:1) would be captured on the wrong device's stream. And the LM's thread and the codec's
thread may capture at once, which torch does not allow (each capture also synchronizes the device
and empties the allocator's cache as it begins). So every capture goes through `capture`: under
its model's device, on its owner's side stream, holding one lock for the whole process.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# One capture at a time in the process, whichever model and device.
CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def capture(
    graph: torch.cuda.CUDAGraph,
    device: torch.device,
    stream: torch.cuda.Stream,
    *,
    pool: tuple[int, int] | None = None,
) -> Iterator[None]:
    """Record what runs inside into `graph`, on `device`, on `stream` (the owner's side stream on
    that device), into memory `pool` if given (graphs replayed one at a time may share one)."""
    # thread_local: the other threads (the codec's beside the LM's, serve's) may allocate and
    # copy on their own streams meanwhile; the default, global, forbids that in the process.
    with (
        CAPTURE_LOCK,
        torch.cuda.device(device),
        torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"),
    ):
        yield
