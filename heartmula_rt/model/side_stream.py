"""A side CUDA stream per owner (a decode engine, a codec), made at its first use and kept.

torch keeps a cuBLAS workspace (about 32 MiB on Hopper) for every stream that ever ran a
matmul, for the rest of the process: a new stream per song or per graph shape leaks one each
time, so each owner makes its stream once and reuses it.
"""

from __future__ import annotations

import torch


class SideStream:
    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def get(self, device: torch.device) -> torch.cuda.Stream:
        """The owner's stream on the CUDA `device`, made at the first call."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def __deepcopy__(self, memo: dict) -> SideStream:
        """A copied owner (bench's codec variants) makes its own: streams cannot be copied."""
        return SideStream()
