"""Layer-wise offload: a stack of identical layers kept in pinned host memory and streamed
through a small ring of device slots, the next layers' copies overlapping the current layer.

`OffloadedLayers(layers, device, slots=2, resident=k)` replaces an `nn.ModuleList` that a model
iterates (`for layer in self.layers`): the first `k` layers move to `device` and stay there, the
others are packed into one pinned host buffer each. Iterating yields, for a streamed layer, a slot
module whose tensors are views of one flat device buffer into which that layer's bytes were
copied: one copy per layer, on a side CUDA stream, ordered by events (the slot is used only
after its copy; a slot is overwritten only after the layer that last used it was queued on the
compute stream). The slots are allocated at the start of each pass and dropped at its end, so
between passes (the LM's frames, the codec's ODE steps) the caching allocator can lend their
memory to other work. On the CPU (tests) there are no streams: the same code path copies
synchronously.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

ALIGN = 256  # bytes: every tensor in a flat buffer starts where a CUDA kernel may vectorize


def _layout(layer: nn.Module) -> list[tuple[str, torch.Size, torch.dtype, int]]:
    """(state-dict key, shape, dtype, byte offset) of every tensor of `layer` in a flat buffer."""
    entries, offset = [], 0
    for key, t in layer.state_dict(keep_vars=True).items():
        entries.append((key, t.shape, t.dtype, offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return entries


def _buffer_size(layout: list[tuple[str, torch.Size, torch.dtype, int]]) -> int:
    key, shape, dtype, offset = layout[-1]
    return offset + shape.numel() * dtype.itemsize


def _views(flat: Tensor, layout: list[tuple[str, torch.Size, torch.dtype, int]]) -> dict:
    """State-dict views of a flat uint8 buffer laid out by `layout`."""
    return {
        key: flat[offset : offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        for key, shape, dtype, offset in layout
    }


class OffloadedLayers(nn.Module):
    """Iterable like the ModuleList it replaces; `len` is the number of layers.

    Apply it to layers still on the host, then move the owning model: the resident layers are a
    registered submodule and follow `.to()`, the streamed ones stay pinned on the host.
    """

    def __init__(
        self, layers: nn.ModuleList, device: torch.device, slots: int = 2, resident: int = 0
    ) -> None:
        super().__init__()
        if slots < 2:
            raise ValueError("a ring needs at least 2 slots: one in use, one being filled")
        if not 0 <= resident <= len(layers):
            raise ValueError(f"resident must be in [0, {len(layers)}], not {resident}")
        self.device, self.num_slots = torch.device(device), slots
        self.resident = nn.ModuleList(layers[:resident])
        streamed = list(layers[resident:])
        self.layout = _layout(streamed[0]) if streamed else []
        self.slot_bytes = _buffer_size(self.layout) if streamed else 0
        pin = self.device.type == "cuda"  # pinned memory: copies that do not block the host
        self.host: list[Tensor] = []
        for layer in streamed:
            if _layout(layer) != self.layout:
                raise ValueError("offloaded layers must have identical tensors (names, shapes)")
            flat = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=pin)
            views = _views(flat, self.layout)
            for key, t in layer.state_dict().items():
                views[key].copy_(t)
            layer.load_state_dict(views, assign=True)  # the layer now lives in `flat`
            self.host.append(flat)
        # One module per slot, its tensors pointed at the slot's buffer during a pass. Not
        # registered: `.to()` must leave them (and the pinned host buffers) alone.
        self._templates = [
            copy.deepcopy(streamed[0]).to_empty(device="meta")
            for _ in range(slots if streamed else 0)
        ]
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._ready = [torch.cuda.Event() for _ in range(slots)] if cuda else []

    def __len__(self) -> int:
        return len(self.resident) + len(self.host)

    def host_bytes(self) -> int:
        """Pinned host memory of the streamed layers."""
        return self.slot_bytes * len(self.host)

    def _fill(self, index: int, flats: list[Tensor]) -> None:
        """Queue the copy of streamed layer `index` into its slot (after all compute queued so
        far: the slot's previous layer is among it), and mark the slot ready when done."""
        slot = index % self.num_slots
        if self._copy_stream is None:
            flats[slot].copy_(self.host[index])
            return
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            flats[slot].copy_(self.host[index], non_blocking=True)
            self._ready[slot].record(self._copy_stream)

    def __iter__(self) -> Iterator[nn.Module]:
        yield from self.resident
        n = len(self.host)
        if n == 0:
            return
        flats = [
            torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            for _ in range(min(self.num_slots, n))
        ]
        for template, flat in zip(self._templates, flats, strict=False):
            template.load_state_dict(_views(flat, self.layout), assign=True)
        try:
            for i in range(min(self.num_slots - 1, n)):  # all slots but the one layer 0 frees
                self._fill(i, flats)
            for i in range(n):
                ahead = i + self.num_slots - 1  # its slot's last layer, i - 1, is queued
                if ahead < n:
                    self._fill(ahead, flats)
                slot = i % self.num_slots
                if self._copy_stream is not None:
                    torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
                yield self._templates[slot]
        finally:
            # The slot modules view `flats`: point them at nothing, so the buffers are freed.
            for template in self._templates:
                template.to_empty(device="meta")


class HostCopy:
    """A module's tensors mirrored once in host memory (pinned when `device` is a GPU), so that
    it can leave the device and come back between songs cheaply.

    Inference never changes a weight: `evict()` only points the module at the host mirror (no
    device-to-host copy; the device tensors are freed), and `restore()` copies the mirror to
    `device` (pinned, so asynchronous and at full bus speed). State-dict keys under `exclude`
    (e.g. text embeddings a plan keeps on the host) are left where they are.
    """

    def __init__(
        self, module: nn.Module, device: torch.device, exclude: tuple[str, ...] = ()
    ) -> None:
        self.module, self.device = module, torch.device(device)
        pin = self.device.type == "cuda"
        # Always a copy: even of host tensors (pinned, or for the CPU tests, separate).
        self.host = {
            key: t.detach().to("cpu", copy=True).pin_memory() if pin else t.to("cpu", copy=True)
            for key, t in module.state_dict().items()
            if not key.startswith(exclude)
        }

    def evict(self) -> None:
        self.module.load_state_dict(self.host, strict=False, assign=True)

    def restore(self) -> None:
        on_device = {k: t.to(self.device, non_blocking=True) for k, t in self.host.items()}
        self.module.load_state_dict(on_device, strict=False, assign=True)
