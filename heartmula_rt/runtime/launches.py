"""Kernel launches of one LM frame, counted on the meta device (no GPU, no weights).

One eager PyTorch op is one GPU kernel launch, also inside a CUDA graph (a replay launches
every recorded kernel). `count_frame_launches` runs the static engine's frame step
(`StaticEngine._step`: backbone, depth decoder, CFG, sampling, state updates) on a model built
on the meta device under a `TorchDispatchMode` and counts every aten op that reaches it, except
those that launch nothing (`launches_kernel`):

- views: ops whose schema says every output aliases an input and nothing is written (view,
  reshape of a contiguous tensor, transpose, t, expand, slice, select, unsqueeze, unbind,
  alias, detach, ...), and `_unsafe_view`, a view whose schema does not say so;
- allocations without initialisation (empty, empty_strided, new_empty, empty_like): the
  caching allocator hands out memory without a kernel.

Composite ops are counted as what they dispatch to (`linear` is an mm; `x.float()` on a
float32 tensor is nothing; `stack` is one cat). In-place ops and copies count. A custom op
(the fused sampler, the fused layers of `kernels.fused_layers`) counts as 1: each launches one
kernel and its fake implementation runs below the mode. Scaled dot-product attention is the
exception to counting what reaches the mode: on meta it takes the math path (matmuls, softmax),
which no GPU runs, so it is caught before dispatch and counted as the one fused attention
kernel a CUDA backend launches, plus, for a boolean mask, the 3 launches ATen's SDPA spends
turning it into an additive one first (two scalar_tensor fills and a where, as dispatching it
on the CPU shows). cuBLAS may split one mm into two kernels (split-K); that is not modelled.

`gpu=True` counts the attention of decode steps as a GPU runs it: the fused twin's
`rope_attention` (`kernels.decode_attention`: RoPE, the KV-cache write and the split-key
attention in one kernel, plus one that combines the chunks of a cache longer than one chunk)
instead of the cache write, an additive mask and SDPA; the plain path's split-key kernel
(`decode_attention`, not fused) counts 2 launches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from heartmula_rt.config import LM_PRESETS, GenConfig, LMConfig
from heartmula_rt.model import lm
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import StaticEngine

aten = torch.ops.aten
_NO_KERNEL = {
    aten._unsafe_view.default,
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}
SDPA = "scaled_dot_product_attention (one fused kernel)"
SDPA_BOOL_MASK = "scaled_dot_product_attention: boolean mask made additive"
BOOL_MASK_LAUNCHES = 3
DECODE_ATTENTION = "heartmula_rt.decode_attention.default"
DECODE_ATTENTION_LAUNCHES = 2  # its chunk kernel, then its combine kernel
ROPE_ATTENTION = "heartmula_rt.rope_attention.default"
PARTS = ("backbone layers", "decoder layers", "sampler", "rest")


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether an aten op launches a GPU kernel (see the module docstring for the rule)."""
    if func in _NO_KERNEL:
        return False
    returns = func._schema.returns
    view = bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )
    return not view


@dataclass
class FrameLaunches:
    """Launches per (part, op) of one frame; parts are `PARTS`."""

    ops: Counter[tuple[str, str]] = field(default_factory=Counter)
    backbone_layers: int = 0
    decoder_layer_steps: int = 0  # decoder layers × decoder steps per frame

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def part(self, name: str) -> int:
        return sum(n for (p, _), n in self.ops.items() if p == name)

    def part_ops(self, name: str) -> Counter[str]:
        return Counter({op: n for (p, op), n in self.ops.items() if p == name})


class LaunchCounter(TorchDispatchMode):
    """Counts the kernel launches of what runs under it into `launches`, by the current part."""

    def __init__(self, launches: FrameLaunches) -> None:
        super().__init__()
        self.launches = launches
        self.part = "rest"
        self.paused = False

    def add(self, op: str, n: int = 1) -> None:
        part = "sampler" if op == "heartmula_rt.fused_sample.default" else self.part
        self.launches.ops[part, op] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and launches_kernel(func):
            self.add(str(func), _custom_launches(str(func), args))
        return func(*args, **(kwargs or {}))


def _custom_launches(op: str, args: tuple) -> int:
    """Launches of one call of `op`: 1, but for the split-key attentions' combination."""
    if op == DECODE_ATTENTION:
        return DECODE_ATTENTION_LAUNCHES
    if op == ROPE_ATTENTION:  # its combination only past one chunk of the `kv_len` it spans
        from heartmula_rt.kernels.decode_attention import CHUNK

        return 1 + (args[-1] > CHUNK)
    return 1


class _AttentionAsOneKernel(TorchFunctionMode):
    """Counts SDPA as the GPU runs it (see the module docstring), not its meta math path."""

    def __init__(self, counter: LaunchCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None and mask.dtype == torch.bool:
            self.counter.add(SDPA_BOOL_MASK, BOOL_MASK_LAUNCHES)
        self.counter.add(SDPA)
        self.counter.paused = True
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.paused = False


def meta_lm(preset: str = "3B", dtype: torch.dtype = torch.bfloat16) -> HeartMuLa:
    """A `config.LM_PRESETS` LM on the meta device: its full size, no memory."""
    with torch.device("meta"):
        return HeartMuLa(LMConfig.from_dict(LM_PRESETS[preset])).to(dtype)


def count_frame_launches(
    model: HeartMuLa,
    gen_config: GenConfig | None = None,
    *,
    cfg: bool = True,
    gpu: bool = False,
    songs: int = 1,
    positions: int | None = None,
) -> FrameLaunches:
    """The kernel launches of one static-engine frame of `model` (on the meta device; 2 rows
    with `cfg`, per song; `songs` songs side by side, `positions` cache positions, by default
    the engine's first capacity step). With `gpu`, the backbone's attention is the split-key
    decode kernel a GPU runs (module docstring). The step runs once first: the RoPE tables are
    built once per device, not per frame."""
    engine = StaticEngine(model, gen_config or GenConfig(), graphs=False)
    sampling = SamplingParams() if cfg else SamplingParams(cfg_scale=1.0)
    step = engine.one_song_step(sampling, positions or engine.capacity_step, songs=songs)
    launches = FrameLaunches(
        backbone_layers=len(model.backbone.layers),
        decoder_layer_steps=len(model.decoder.layers) * (model.config.audio_num_codebooks - 1),
    )
    counter = LaunchCounter(launches)

    def enter(part: str):
        def hook(*_) -> None:
            counter.part = part

        return hook

    def leave(*_) -> None:
        counter.part = "rest"

    hooks = []
    for part, layers in (
        ("backbone layers", model.backbone.layers),
        ("decoder layers", model.decoder.layers),
    ):
        for layer in layers:
            hooks += [
                layer.register_forward_pre_hook(enter(part)),
                layer.register_forward_hook(leave),
            ]
    devices = lm.SPLIT_DECODE_DEVICES
    if gpu:
        lm.SPLIT_DECODE_DEVICES = devices | {"meta"}
    with torch.no_grad():
        try:
            step()
            with counter, _AttentionAsOneKernel(counter):
                step()
        finally:
            lm.SPLIT_DECODE_DEVICES = devices
            for h in hooks:
                h.remove()
    return launches


def report(launches: FrameLaunches, top: int = 0) -> str:
    """Total and per-part lines; with `top`, each part's `top` most launched ops."""
    per = {
        "backbone layers": launches.backbone_layers,
        "decoder layers": launches.decoder_layer_steps,
    }
    lines = [f"{launches.total} launches per frame"]
    for name in PARTS:
        n = launches.part(name)
        line = f"  {name}: {n}"
        if name in per:
            unit = "layer" if name == "backbone layers" else "layer step"
            line += f" ({n / per[name]:g} per {unit} × {per[name]})"
        lines.append(line)
        for op, k in launches.part_ops(name).most_common(top):
            lines.append(f"      {k:5d}  {op}")
    return "\n".join(lines)
