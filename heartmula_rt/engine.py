"""Decode engines: the plain loop, and a static one-frame step replayed as a CUDA graph.

Every engine has one method, `generate_frames(prompt, sampling)`, with the plain loop's contract.

The static engine keeps all per-frame state in device tensors — the position, the last frame, the
output buffer, the first-EOS index, the sampler's settings and RNG — so one frame (backbone step,
the depth decoder's 7 steps, CFG, sampling, embedding of the sampled tokens, the EOS flag) is a
function of nothing the host must pass. Captured once as a CUDA graph it replays with one launch
and no host synchronisation; the host reads the EOS index every `sync_every` frames and trims
what was made after it, so the output equals the plain loop's. Attention reads the cache up to
the end of the current `bucket` of positions (the rest masked), so one graph serves a bucket and
graphs are kept per (rows, bucket end) and reused across songs. `compile` runs the same step
through torch.compile before capturing it.
"""

from __future__ import annotations

import importlib.util
import math
import secrets
from collections.abc import Callable

import torch
from torch import Tensor

from .config import CAPACITY_STEP, ENGINES, GenConfig
from .decode import (
    GenerationInterrupted,
    OnCodes,
    OnFrame,
    check_length,
    generate_frames,
    prefill,
    sample_frame,
)
from .errors import UserError
from .lm import HeartMuLa, LMCache
from .offload import OffloadedLayers
from .prompt import Prompt
from .request import SamplingParams
from .side_stream import SideStream

BUCKET = 256  # backbone positions per attention bucket: one graph per bucket
SYNC_EVERY = 8  # frames between the host's looks at the EOS flag


class PlainEngine:
    """The plain loop of `decode.py`: eager PyTorch, one host sync per frame, any device."""

    name = "plain"

    def __init__(self, model: HeartMuLa, gen_config: GenConfig) -> None:
        self.model, self.gen_config = model, gen_config

    def release(self) -> None:
        """Nothing to free: each song's caches go when it ends (StaticEngine's interface)."""

    def generate_frames(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        on_frame: OnFrame | None = None,
        on_codes: OnCodes | None = None,
    ) -> Tensor:
        """Codes [n_codebooks, T] int64 on the CPU, as `decode.generate_frames` returns them
        (every engine's contract). `on_frame(n)` gets the number of frames made so far, first
        n=1 right after the prompt, and `on_codes(new)` just before it the frames made since
        its last call ([n_codebooks, k] int64, CPU; together a prefix of the result, which may
        hold a few more); a seed repeats the same frames with the same engine on the same
        device."""
        return generate_frames(
            self.model, prompt, self.gen_config, sampling, on_frame=on_frame, on_codes=on_codes
        )


class DeviceSampler:
    """Sampling settings and Philox state in device memory, read by the fused Triton sampler.

    A captured graph reads them at every replay, so it serves any seed, top-k, temperature and
    CFG scale; the kernel advances the RNG counter on every call.
    """

    def __init__(self, device: torch.device) -> None:
        from .kernels import sampling  # needs triton: imported only when used

        self._sample, self._new_state = sampling.fused_sample, sampling.new_state
        with torch.inference_mode(False):  # kept across songs: see StaticState
            self.ints, self.floats = self._new_state(
                seed=0, topk=1, cfg_scale=1.0, temperature=1.0, device=device
            )
        self.cfg_rows = 1

    def configure(self, params: SamplingParams, seed: int) -> None:
        """One song's settings, and `seed` (the song's, or a random one if it has none)."""
        self.cfg_rows = params.cfg_rows
        ints, floats = self._new_state(
            seed=seed,
            topk=params.topk,
            cfg_scale=params.cfg_scale,
            temperature=params.temperature,
            device="cpu",
        )
        self.ints.copy_(ints)
        self.floats.copy_(floats)

    def __call__(self, logits: Tensor) -> Tensor:
        """Raw logits [rows, V] → the sampled token [1, 1]."""
        return self._sample(logits, self.ints, self.floats, self.cfg_rows == 2)


class StaticState:
    """The device tensors one frame step reads and writes, allocated once per capacity.

    They outlive the song that made them, so they (and the cache views) are made as normal
    tensors even under a caller's torch.inference_mode(): inference tensors could not be
    updated in place by a later song run without it.
    """

    @torch.inference_mode(False)
    def __init__(self, model: HeartMuLa, rows: int, capacity: int) -> None:
        device = model.device
        n = model.config.audio_num_codebooks
        self.rows, self.capacity = rows, capacity
        self.cache = model.new_cache(rows, capacity)
        self.frame = torch.zeros(n, dtype=torch.int64, device=device)  # fed at `pos`
        self.pos = torch.zeros((), dtype=torch.int64, device=device)
        self.index = torch.zeros((), dtype=torch.int64, device=device)  # next row of `codes`
        self.eos_at = torch.zeros((), dtype=torch.int64, device=device)  # -1: no EOS yet
        self.codes = torch.zeros(capacity, n, dtype=torch.int64, device=device)
        self._views = {rows: self.cache}

    def cache_for(self, rows: int) -> LMCache:
        """The caches' first `rows` rows, the same view objects every time (graphs and compiled
        code see the same inputs song after song)."""
        if rows not in self._views:
            with torch.inference_mode(False):
                self._views[rows] = self.cache.narrow(rows)
        return self._views[rows]

    def frames(self, count: int) -> Tensor:
        """The first `count` frames made, [n_codebooks, count] int64 on the CPU."""
        return self.codes[:count].cpu().T.contiguous()

    def start(self, frame: Tensor, pos: int) -> None:
        """Frame 0 from the prompt, to be fed at position `pos`."""
        self.codes[0] = frame
        self.frame.copy_(frame)
        self.pos.fill_(pos)
        self.index.fill_(1)
        self.eos_at.fill_(-1)


class StaticEngine:
    """One frame per call of a static step: a CUDA graph replay (`graph`), the step compiled
    first (`compile`), or, for tests on the CPU, the step run without graphs (`graphs=False`;
    there `compile_backend="aot_eager"` traces it as inductor would, without code generation)."""

    def __init__(
        self,
        model: HeartMuLa,
        gen_config: GenConfig,
        *,
        compile: bool = False,
        compile_backend: str | Callable = "inductor",
        graphs: bool = True,
        bucket: int = BUCKET,
        sync_every: int = SYNC_EVERY,
        capacity_step: int = CAPACITY_STEP,
    ) -> None:
        self.name = "compile" if compile else "graph"
        layers = model.backbone.layers
        check_engine_over_streaming(
            self.name, len(layers.host) if isinstance(layers, OffloadedLayers) else 0
        )
        self.model, self.gen_config = model, gen_config
        self.device = model.device
        self.bucket, self.sync_every, self.capacity_step = bucket, sync_every, capacity_step
        self.sampler = DeviceSampler(self.device)
        self._use_graphs = graphs
        self._step_fn = self._step
        if compile:
            self._step_fn = torch.compile(self._step, fullgraph=True, backend=compile_backend)
        self._state: StaticState | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._warm: set[tuple[int, int]] = set()  # keys run once outside capture
        self._pool = None
        self._side_stream = SideStream()  # every shape's first frame runs on it

    # -- the step -------------------------------------------------------------------------

    def _step(self, state: StaticState, cache: LMCache, kv_len: int) -> None:
        model = self.model
        rows = model.embed_frame(state.frame.expand(cache.rows, -1))
        last, logits = model.backbone_step(rows, state.pos, cache, kv_len)
        frame = sample_frame(model, last, logits, cache, self.sampler)
        state.codes.index_copy_(0, state.index.view(1), frame[None])
        first_eos = (frame >= self.gen_config.audio_eos_id).any() & (state.eos_at < 0)
        state.eos_at.copy_(torch.where(first_eos, state.index, state.eos_at))
        state.frame.copy_(frame)
        state.pos.add_(1)
        state.index.add_(1)

    def _run_step(self, state: StaticState, cache: LMCache, kv_len: int) -> None:
        if not self._use_graphs:
            self._step_fn(state, cache, kv_len)
            return
        key = (cache.rows, kv_len)
        graph = self._graphs.get(key)
        if graph is None and key not in self._warm:
            # First frame of this shape runs for real on a side stream (compiling, choosing
            # kernels, allocating workspaces: nothing of that may happen inside a capture).
            self._warm.add(key)
            side = self._side_stream.get(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step_fn(state, cache, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        if graph is None:
            # Capturing records without running, so the state is as it was: replay below.
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step_fn(state, cache, kv_len)
            self._graphs[key] = graph
        graph.replay()

    def release(self) -> None:
        """Free the caches and the graphs' memory (the memory planner does it before the
        codec runs); the next song allocates and captures them again."""
        self._graphs.clear()
        self._warm.clear()
        self._state = self._pool = None

    # -- the host loop --------------------------------------------------------------------

    def _reserve(self, rows: int, positions: int) -> StaticState:
        """State for `rows` rows and `positions` cache positions, reused when it fits; a larger
        request reallocates it and drops the graphs captured over the old tensors."""
        state = self._state
        if state is None or state.rows < rows or state.capacity < positions:
            self._graphs.clear()
            self._warm.clear()
            self._state = state = None  # free the old caches before allocating the new ones
            limit = self.model.config.backbone.max_seq_len
            step = self.capacity_step
            capacity = min(math.ceil(positions / step) * step, limit)
            state = self._state = StaticState(self.model, rows, capacity)
        return state

    def _kv_len(self, pos: int, capacity: int) -> int:
        """Cache positions read by the step that writes position `pos`: its bucket's end."""
        return min(math.ceil((pos + 1) / self.bucket) * self.bucket, capacity)

    @torch.no_grad()
    def generate_frames(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        on_frame: OnFrame | None = None,
        on_codes: OnCodes | None = None,
    ) -> Tensor:
        check_length(self.model, prompt, sampling.max_frames)
        seed = secrets.randbits(63) if sampling.seed is None else sampling.seed
        self.sampler.configure(sampling, seed)
        max_frames, stop_at_eos = sampling.max_frames, sampling.stop_at_eos
        rows = self.sampler.cfg_rows
        state = self._reserve(rows, len(prompt) + max_frames)
        cache = state.cache_for(rows)
        made = 0  # frames known to be final (read back from the device)
        try:
            frame, _ = prefill(self.model, prompt, cache, self.sampler)
            state.start(frame, len(prompt))
            made = 1
            if on_codes is not None:
                on_codes(state.frames(made))
            if on_frame is not None:
                on_frame(made)
            done = 0
            while done < max_frames:
                for _ in range(min(self.sync_every, max_frames - done)):
                    self._run_step(state, cache, self._kv_len(len(prompt) + done, state.capacity))
                    done += 1
                eos_at = int(state.eos_at)  # the one host sync per `sync_every` frames
                if stop_at_eos and eos_at >= 0:
                    made = eos_at
                    break
                if on_codes is not None:
                    on_codes(state.codes[made : 1 + done].cpu().T.contiguous())
                made = 1 + done
                if on_frame is not None:
                    on_frame(made)
        except KeyboardInterrupt:
            if made:  # what was queued before Ctrl-C completes: keep it
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                eos_at = int(state.eos_at)
                made = eos_at if stop_at_eos and eos_at >= 0 else int(state.index)
            raise GenerationInterrupted(state.frames(made)) from None
        return state.frames(made)


# Every engine has PlainEngine's `name` and `generate_frames`.
Engine = PlainEngine | StaticEngine


def check_engine(name: str, device: torch.device) -> None:
    """Refuse an engine name that does not exist or cannot run on `device`."""
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    if name != "plain" and device.type != "cuda":
        raise UserError(f"the {name} engine needs a CUDA GPU; use the plain engine on the CPU")
    if name != "plain" and importlib.util.find_spec("triton") is None:
        raise UserError(f"the {name} engine needs triton (pip install triton)")


def check_engine_over_streaming(name: str, streamed_layers: int) -> None:
    """Refuse the compile engine over backbone layers streamed from host memory: Dynamo cannot
    trace the stream (`offload.OffloadedLayers`, a generator with side-stream copies and
    `load_state_dict(assign=True)`), while the graph engine's CUDA graphs replay its copies."""
    if name == "compile" and streamed_layers:
        raise UserError(
            f"the compile engine cannot run over the {streamed_layers} backbone layers this "
            "--vram plan streams from host memory; use --engine graph, whose CUDA graphs "
            "replay the streamed copies"
        )


def default_engine(device: torch.device) -> str:
    """CUDA graphs on a GPU (the plain loop there waits on a launch per kernel), else plain."""
    return "graph" if device.type == "cuda" else "plain"


def make_engine(name: str, model: HeartMuLa, gen_config: GenConfig) -> Engine:
    """The engine called `name` (one of ENGINES) for a loaded model."""
    check_engine(name, model.device)
    if name == "plain":
        return PlainEngine(model, gen_config)
    return StaticEngine(model, gen_config, compile=name == "compile")
