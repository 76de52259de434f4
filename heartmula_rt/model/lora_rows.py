"""LoRA adapters per LM row (`serve --lora NAME=PATH`): base weights shared, each row applying its
song's adapter unmerged, a batched gather of the rows' A and B (punica/BGMV style) around every
adapted Linear (`RowLoraLinear`); which adapter a row runs is an index in device memory
(`LoraRows`), updated in place, so one CUDA graph serves any mix. Adapters come from lora.py."""


from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from heartmula_rt.config import LMConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.lm import MERGED_PARTS, merged_of, merged_part, part_sizes

# The wrappers training tools put before the model's own module names, stripped in any order:
# PEFT's `base_model.model.`, diffusers' `transformer.`, ComfyUI's `diffusion_model.`, torchtune
# and DDP checkpoints' `model.`/`module.`.
from heartmula_rt.model.lora import MERGE_ONLY, LoraAdapter, lora_targets


class LoraRows:
    """Which adapter each LM row runs: `index` [capacity] int64 on the device (-1: none),
    shared by every `RowLoraLinear` of a model and only ever updated in place, so a CUDA graph
    captured over it serves any mix of adapters. A call over rows first..first+B-1 (a song's
    prefill in its own rows) runs inside `at(first)`; calls over the whole batch start at 0."""

    def __init__(self, capacity: int, device: torch.device | str, names: Sequence[str]) -> None:
        self.index = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        # Each row's strength, multiplying its adapter's own scale (a song's `lora_scale`).
        self.scale = torch.ones(capacity, dtype=torch.float32, device=device)
        self.names = list(names)
        self.first = 0

    @property
    def capacity(self) -> int:
        return self.index.shape[0]

    def adapter_index(self, name: str | None) -> int:
        """The index of adapter `name` (None or "": -1, no adapter)."""
        if not name:
            return -1
        if name not in self.names:
            known = ", ".join(self.names) or "none"
            raise UserError(f"no LoRA named {name!r} is loaded (loaded: {known})")
        return self.names.index(name)

    @torch.inference_mode(False)
    def reserve(self, rows: int) -> None:
        """Room for `rows` rows. Growing reallocates `index`: call it before capturing graphs."""
        if rows > self.capacity:
            grown = torch.full((rows,), -1, dtype=torch.int64, device=self.index.device)
            grown[: self.capacity] = self.index
            scale = torch.ones(rows, dtype=torch.float32, device=self.scale.device)
            scale[: self.capacity] = self.scale
            self.index, self.scale = grown, scale

    @torch.inference_mode(False)
    def assign(self, first: int, count: int, adapter: int | str | None, scale: float = 1.0) -> None:
        """Rows first..first+count-1 (a song's) run `adapter` (an index, a name, None/-1) at
        `scale` times its own strength (in place: graph-safe)."""
        index = adapter if isinstance(adapter, int) else self.adapter_index(adapter)
        if not -1 <= index < len(self.names):
            raise ValueError(f"adapter index {index} of {len(self.names)} adapters")
        if first + count > self.capacity:
            raise ValueError(f"rows {first}..{first + count - 1} past capacity {self.capacity}")
        if not math.isfinite(scale):
            raise ValueError(f"a row's LoRA scale must be finite, not {scale}")
        self.index[first : first + count] = index
        self.scale[first : first + count] = scale

    @contextlib.contextmanager
    def at(self, first: int) -> Iterator[None]:
        """Calls inside run rows first.. (one song's rows of a batch)."""
        saved, self.first = self.first, first
        try:
            yield
        finally:
            self.first = saved

    def current(self, rows: int) -> Tensor:
        """The adapter indices of the `rows` rows of the current call (a view: graph-safe)."""
        return self.index[self.first : self.first + rows]

    def current_scale(self, rows: int) -> Tensor:
        """The strengths of the `rows` rows of the current call (a view: graph-safe)."""
        return self.scale[self.first : self.first + rows]


class RowLoraLinear(nn.Module):
    """A target module (nn.Linear or a quantized twin, any module mapping [..., in] to
    [..., out]) plus each row's own LoRA: `base(x) + s·(x @ A[i]ᵀ) @ B[i]ᵀ` for row adapter i at row
    strength s (`LoraRows.scale`, 1 unless a song asks for another).

    `a` [N+1, r, in] and `b` [N+1, out, r] stack the N adapters (ranks zero-padded to the
    largest; strength and alpha/r folded into b) and a last all-zero slot, which rows of index
    -1 gather: no branch, so the same kernels run whatever the mix. The LoRA math runs in the
    buffers' dtype, the LM's, whatever the base's storage."""

    def __init__(self, base: nn.Module, a: Tensor, b: Tensor, rows: LoraRows) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.rows = rows
        self.none = a.shape[0] - 1
        self.in_features, self.out_features = a.shape[2], b.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        index = self.rows.current(x.shape[0])
        index = torch.where(index < 0, self.none, index)
        rows = x.reshape(x.shape[0], -1, self.in_features).to(self.a.dtype)  # [B, T, in]
        h = torch.bmm(rows, self.a[index].transpose(1, 2))  # [B, T, r]
        h = h * self.rows.current_scale(x.shape[0]).to(h.dtype)[:, None, None]  # each row's
        delta = torch.bmm(h, self.b[index].transpose(1, 2))  # [B, T, out]
        return y + delta.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.none}, rank={self.a.shape[1]}"


def _stacked(
    adapters: Sequence[LoraAdapter], name: str, shape: tuple[int, int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Module `name`'s A [N+1, r, in] and B [N+1, out, r] (CPU), zeros where an adapter leaves
    it alone and in the last slot."""
    out, inn = shape
    rank = max(a.modules[name].rank for a in adapters if name in a.modules)
    a_all = torch.zeros(len(adapters) + 1, rank, inn)
    b_all = torch.zeros(len(adapters) + 1, out, rank)
    for i, adapter in enumerate(adapters):
        m = adapter.modules.get(name)
        if m is not None:
            a_all[i, : m.rank] = m.a
            b_all[i, :, : m.rank] = m.b * (adapter.scale * m.scaling)
    return a_all.to(dtype), b_all.to(dtype)


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    raise ValueError("a module without tensors")


@torch.no_grad()
def apply_lora_rows(
    model: nn.Module,
    adapters: Sequence[LoraAdapter],
    *,
    rows: int = 1,
    dtype: torch.dtype | None = None,
) -> LoraRows:
    """Wrap every module an adapter adapts in a `RowLoraLinear` (after quantization and the
    fast kernels: the base module stays as it is) and return the `LoraRows` every wrapper reads,
    also kept as `model.lora_rows`; rows start with no adapter. `dtype`: the LoRA math's, by
    default the LM's (its audio embeddings')."""
    if getattr(model, "lora_rows", None) is not None:
        raise ValueError("the model already runs LoRAs per row")
    for adapter in adapters:
        merge_only = [n for n in MERGE_ONLY if n in adapter.modules]
        if merge_only:
            raise UserError(
                f"LoRA {adapter.name!r} adapts {merge_only[0]}, the reference-audio projection, "
                "which runs once per prompt, not per row: load it merged instead"
            )
    if dtype is None:
        dtype = model.get_submodule("audio_embeddings").weight.dtype
    device = model.get_submodule("audio_embeddings").weight.device
    state = LoraRows(rows, device, [a.name for a in adapters])
    names = sorted({n for a in adapters for n in a.modules})
    targets = lora_targets(model.config)
    # Parts of one merged matmul (lm.merge_projections) share one wrapper: their A stacked
    # along the rank, their B block-diagonal (each part's rows read only its own rank), so the
    # merged output's rows get each part's own delta.
    groups: dict[str, list[tuple[str, slice]]] = {}
    for name in names:
        target, rows = merged_part(model, name) or (name, slice(None))
        groups.setdefault(target, []).append((name, rows))
    for target, parts in groups.items():
        base = model.get_submodule(target)
        if target == parts[0][0]:  # a module of its own
            a, b = _stacked(adapters, target, targets[target], dtype)
        else:
            owner_name, _, merged = target.rpartition(".")
            out = sum(part_sizes(model.get_submodule(owner_name), merged))
            a, b = _stacked_parts(adapters, parts, out, targets, dtype)
        on = _module_device(base)
        model.set_submodule(target, RowLoraLinear(base, a.to(on), b.to(on), state))
    model.lora_rows = state
    return state


def _stacked_parts(
    adapters: Sequence[LoraAdapter],
    parts: Sequence[tuple[str, slice]],
    out: int,
    targets: Mapping[str, tuple[int, int]],
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """A [N+1, Σr, in] and B [N+1, out, Σr] of the `parts` (name, rows of the merged output)
    of one merged matmul: each part's stacked A and B (`_stacked`), A side by side along the
    rank, B block-diagonal (zeros elsewhere)."""
    stacked = [(_stacked(adapters, name, targets[name], dtype), rows) for name, rows in parts]
    a_all = torch.cat([a for (a, _), _ in stacked], dim=1)
    b_all = torch.zeros(len(adapters) + 1, out, a_all.shape[1], dtype=dtype)
    first = 0
    for (a, b), rows in stacked:
        b_all[:, rows, first : first + a.shape[1]] = b
        first += a.shape[1]
    return a_all, b_all


def lora_rows_bytes(
    adapters: Sequence[LoraAdapter], config: LMConfig, dtype: torch.dtype, *, merged: bool = True
) -> int:
    """Device bytes `apply_lora_rows` adds for `adapters` at `dtype` (the planner's figure): per
    adapted module, (N+1) stacked A and B at the largest rank; with `merged` (every pipeline
    merges q/k/v and w1/w3, `lm.merge_projections`), per merged matmul whose parts are adapted,
    their A side by side along the rank and their B block-diagonal over the whole merged output
    (`_stacked_parts`). A call's gathered A and B (B rows × rank × (in + out)) are transient
    activations on top."""
    if not adapters:
        return 0
    targets = lora_targets(config)
    groups: dict[str, list[str]] = {}  # the module apply wraps → the adapted names it holds
    for name in sorted({n for a in adapters for n in a.modules}):
        group = (merged_of(name) if merged else None) or name
        groups.setdefault(group, []).append(name)
    total = 0
    for group, names in groups.items():
        rank = sum(max(a.modules[n].rank for a in adapters if n in a.modules) for n in names)
        if group in targets:
            out, inn = targets[group]
        else:  # a merged matmul: its B spans every part's rows, adapted or not
            owner, _, leaf = group.rpartition(".")
            out = sum(targets[f"{owner}.{part}"][0] for part in MERGED_PARTS[leaf])
            inn = targets[names[0]][1]
        total += (len(adapters) + 1) * rank * (inn + out)
    return total * torch.empty((), dtype=dtype).element_size()
