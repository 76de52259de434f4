"""Decode engines: the plain loop, and a static one-frame step replayed as a CUDA graph.

Every engine runs a batch of songs, `run(scheduler)` (scheduler.py decides which songs hold
which rows; the engine only runs them), and one song, `generate_frames(prompt, sampling)`, as a
batch of its own with the plain loop's contract.

The static engine keeps all per-frame state of its rows in device tensors — each row's
position, last frame, frames made and first-EOS index, each song's sampling settings, seed and
frame index — so one frame of every row (backbone step, the depth decoder's 7 steps, CFG,
sampling, embedding of the sampled tokens, the EOS flags) is a function of nothing the host must
pass. Captured once as a CUDA graph it replays with one launch and no host synchronisation; the
host reads the EOS indices every `sync_every` frames (or sooner, when a song reaches its length),
trims what each song made after its EOS, and admits waiting songs into freed rows. Attention
reads the cache up to the end of the current `bucket` of positions (each row's past its own
masked), so one graph serves a bucket: graphs are kept per (rows, bucket end) and reused across
songs and batches. `compile` runs the same step through torch.compile before capturing it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
from torch import Tensor

from heartmula_rt.config import CAPACITY_STEP, ENGINES, GenConfig
from heartmula_rt.errors import UserError
from heartmula_rt.memory.offload import OffloadedLayers
from heartmula_rt.model.graphs import capture
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.model.side_stream import SideStream
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import (
    Draw,
    OnCodes,
    OnFrame,
    add_frames,
    feed_given,
    free_rows,
    generate_frames,
    prefill,
    reserve_rows,
    run_batch,
    run_one,
    sample_frame,
    song_rows,
)
from heartmula_rt.runtime.scheduler import Scheduler, SongRun

BUCKET = 256  # backbone positions per attention bucket: one graph per bucket
SYNC_EVERY = 8  # frames between the host's looks at the EOS flags


class PlainEngine:
    """The plain loop of `decode.py`: eager PyTorch, one host sync per frame, any device."""

    name = "plain"

    def __init__(self, model: HeartMuLa, gen_config: GenConfig) -> None:
        self.model, self.gen_config = model, gen_config

    def release(self) -> None:
        """Nothing to free: each batch's caches go when it ends (StaticEngine's interface)."""

    def run(self, scheduler: Scheduler) -> None:
        """Every song of `scheduler` to its end (`decode.run_batch`)."""
        run_batch(self.model, self.gen_config, scheduler)

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
        its last call ([n_codebooks, k] int64, CPU; together a prefix of the result); a seed
        repeats the same frames with the same engine on the same device."""
        return generate_frames(
            self.model, prompt, self.gen_config, sampling, on_frame=on_frame, on_codes=on_codes
        )

    def run_song(self, song: SongRun) -> Tensor:
        """One song already made into a `SongRun` (a continued one, edit.py), alone in its
        rows, as `generate_frames` runs it."""
        return run_one(self.run, self.model, song)


class StaticState:
    """The device tensors one batch frame step reads and writes, allocated once per (rows,
    capacity): each row's cache, position, last frame, frames made and first-EOS index, and
    the fused sampler's per-song state (`kernels.sampling`).

    They outlive the songs that made them, so they (and the cache views) are made as normal
    tensors even under a caller's torch.inference_mode(): inference tensors could not be
    updated in place by a later batch run without it.
    """

    @torch.inference_mode(False)
    def __init__(self, model: HeartMuLa, rows: int, capacity: int) -> None:
        device = model.device
        n = model.config.audio_num_codebooks
        from heartmula_rt.kernels import sampling  # needs triton: imported only when used

        self.kernels = sampling
        self.rows, self.capacity = rows, capacity
        self.cache = model.new_cache(rows, capacity)
        self.frame = torch.zeros(rows, n, dtype=torch.int64, device=device)  # fed at `pos`
        # Each row's position and next frame's row in `codes`, one tensor: a step moves both
        # by `live` in one launch.
        self.moving = torch.zeros(2, rows, dtype=torch.int64, device=device)
        self.pos, self.index = self.moving
        self.live = torch.zeros(rows, dtype=torch.int64, device=device)  # 1: a song runs there
        self.eos_at = torch.full((rows,), -1, dtype=torch.int64, device=device)  # -1: none yet
        self.codes = torch.zeros(rows, capacity, n, dtype=torch.int64, device=device)
        self.row_ids = torch.arange(rows, device=device)
        self.ints, self.floats = self.kernels.new_state(rows, device)
        self.first_ints, self.first_floats = self.kernels.new_state(2, device)  # prefill's

    def draw(self, ints: Tensor, floats: Tensor) -> Draw:
        return lambda logits, codebook: self.kernels.fused_sample(logits, ints, floats, codebook)

    def song_state(self, song: SongRun, first: int, frame: int) -> tuple[Tensor, Tensor]:
        p = song.sampling
        return self.kernels.song_state(
            first,
            song.rows,
            seed=song.seed,
            topk=p.topk,
            cfg_scale=p.cfg_scale,
            temperature=p.temperature,
            frame=frame,
        )

    def prefill_draw(self, song: SongRun) -> Draw:
        """The fused sampler of `song`'s frame 0, over its own rows."""
        ints, floats = self.song_state(song, 0, frame=song.first_frame)
        self.first_ints[: song.rows].copy_(ints)
        self.first_floats[: song.rows].copy_(floats)
        return self.draw(self.first_ints[: song.rows], self.first_floats[: song.rows])

    @torch.inference_mode(False)
    def start(self, song: SongRun, frame: Tensor, pos: int) -> None:
        """`song`'s rows from its last frame so far [n] (its frame 0, or a continued song's last
        given one), to be fed at position `pos`."""
        rows = slice(song.first_row, song.first_row + song.rows)
        made = song.made
        ints, floats = self.song_state(song, song.first_row, frame=song.first_frame + made)
        self.ints[rows] = ints.to(self.ints.device)
        self.floats[rows] = floats.to(self.floats.device)
        self.codes[rows, made - 1] = frame
        self.frame[rows] = frame
        self.pos[rows] = pos
        self.index[rows] = made
        self.eos_at[rows] = -1
        self.live[rows] = 1

    @torch.inference_mode(False)
    def stop(self, song: SongRun) -> None:
        """Idle `song`'s rows: they stay at position 0, drawing nothing."""
        rows = slice(song.first_row, song.first_row + song.rows)
        self.live[rows] = 0
        self.pos[rows] = 0
        self.index[rows] = 0
        self.ints[rows, 0] = -1


class StaticEngine:
    """One frame of every row per call of a static step: a CUDA graph replay (`graph`), the step
    compiled first (`compile`), or, for tests on the CPU, the step run without graphs
    (`graphs=False`; there `compile_backend="aot_eager"` traces it as inductor would, without
    code generation)."""

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
        self._use_graphs = graphs
        self._step_fn = self._step
        if compile:
            self._step_fn = torch.compile(self._step, fullgraph=True, backend=compile_backend)
        self._state: StaticState | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._warm: set[tuple[int, int]] = set()  # keys run once outside capture
        self._pool = None
        self._side_stream = SideStream()  # every first frame of a shape, and captures

    # -- the step -------------------------------------------------------------------------

    def _step(self, state: StaticState, kv_len: int) -> None:
        model = self.model
        rows = model.embed_frame(state.frame)
        last, logits = model.backbone_step(rows, state.pos, state.cache, kv_len)
        frame = sample_frame(model, last, logits, state.cache, state.draw(state.ints, state.floats))
        state.codes[state.row_ids, state.index] = frame
        eos = (frame >= self.gen_config.audio_eos_id).any(dim=1)
        first_eos = eos & (state.eos_at < 0) & (state.live > 0)
        torch.where(first_eos, state.index, state.eos_at, out=state.eos_at)
        state.frame.copy_(frame)
        state.moving.add_(state.live)  # pos and index
        state.ints[:, 4].add_(1)  # every song's frame (read at its first row only)

    def _run_step(self, state: StaticState, kv_len: int) -> None:
        if not self._use_graphs:
            self._step_fn(state, kv_len)
            return
        key = (state.rows, kv_len)
        graph = self._graphs.get(key)
        if graph is None and key not in self._warm:
            # First frame of this shape runs for real on a side stream (compiling, choosing
            # kernels, allocating workspaces: nothing of that may happen inside a capture).
            self._warm.add(key)
            side = self._side_stream.get(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step_fn(state, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        if graph is None:
            # Capturing records without running, so the state is as it was: replay below.
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = self._side_stream.get(self.device)
            with capture(graph, self.device, side, pool=self._pool):
                self._step_fn(state, kv_len)
            self._graphs[key] = graph
        graph.replay()

    def release(self) -> None:
        """Free the caches and the graphs' memory (the memory planner does it before the
        codec runs); the next batch allocates and captures them again."""
        self._graphs.clear()
        self._warm.clear()
        self._state = self._pool = None

    def one_song_step(
        self, sampling: SamplingParams, positions: int, songs: int = 1
    ) -> Callable[[], None]:
        """The frame step of one song's rows started at position 0, to run as it is (launch
        counting and the capture guard run it on the meta device); `songs` > 1: that many such
        songs side by side, reading the whole cache as a batch does (`run`)."""
        runs = [
            SongRun(Prompt(torch.zeros(1, dtype=torch.long), 0), sampling, seed=0)
            for _ in range(songs)
        ]
        state = self._reserve(sum(song.rows for song in runs), positions)
        first = 0
        for song in runs:
            song.first_row, first = first, first + song.rows
            frame = torch.zeros(self.model.config.audio_num_codebooks, dtype=torch.long)
            state.start(song, frame, 0)
        kv_len = self._kv_len(0 if songs == 1 else state.capacity - 1, state.capacity)
        return lambda: self._step(state, kv_len)

    # -- the host loop --------------------------------------------------------------------

    def _reserve(self, rows: int, positions: int) -> StaticState:
        """State for `rows` rows of `positions` cache positions, reused when it has exactly
        `rows` rows (a song's draws may round differently at another row count) and enough
        positions; otherwise reallocated, dropping the graphs captured over the old tensors."""
        state = self._state
        if state is None or state.rows != rows or state.capacity < positions:
            self._graphs.clear()
            self._warm.clear()
            self._state = state = None  # free the old caches before allocating the new ones
            reserve_rows(self.model, rows)  # a per-row LoRA index grown before any capture
            state = self._state = StaticState(self.model, rows, self.capacity_for(positions))
        state.live.zero_()  # rows left by an interrupted batch
        state.pos.zero_()
        state.ints[:, 0] = -1
        return state

    def capacity_for(self, positions: int) -> int:
        """The cache positions kept for songs needing `positions`: rounded up to
        `capacity_step`, so songs of similar length share one state, at most the context."""
        step, limit = self.capacity_step, self.model.config.backbone.max_seq_len
        return min(math.ceil(positions / step) * step, limit)

    def _kv_len(self, pos: int, capacity: int) -> int:
        """Cache positions read by the step whose furthest row writes position `pos`: that
        position's bucket's end."""
        return min(math.ceil((pos + 1) / self.bucket) * self.bucket, capacity)

    def _admit(self, state: StaticState, song: SongRun) -> None:
        """Prefill `song` into its rows (eager, between frames) and start them."""
        view = state.cache.rows_view(song.first_row, song.rows)
        with song_rows(self.model, song):  # its own rows: its LoRA, where songs choose one
            frame, _ = prefill(self.model, song.prompt, view, state.prefill_draw(song))
            if song.given is None:
                add_frames(song, frame[:1].cpu())
            else:
                frame = feed_given(self.model, song, view)
        state.start(song, frame[0], len(song.prompt) + song.made - 1)

    def _stop(self, state: StaticState, song: SongRun) -> None:
        """Idle `song`'s rows (and their per-row LoRA, if any)."""
        state.stop(song)
        free_rows(self.model, song)

    def _collect(self, state: StaticState, scheduler: Scheduler) -> None:
        """Read what every running song made since the last look (one host sync), and end the
        songs that reached their EOS or their length."""
        index, eos_at = torch.stack([state.index, state.eos_at]).cpu()
        for song in list(scheduler.running):
            row = song.first_row
            made, eos = int(index[row]), int(eos_at[row])
            ended = song.sampling.stop_at_eos and eos >= 0
            upto = eos if ended else made
            if upto > song.made:
                add_frames(song, state.codes[row, song.made : upto].cpu())
            if ended or song.frames_left == 0:
                self._stop(state, song)
                scheduler.finish(song, "eos" if ended else "length")

    @torch.no_grad()
    def run(self, scheduler: Scheduler) -> None:
        """Every song of `scheduler` to its end; a Ctrl-C propagates once every song holds the
        frames the device finished."""
        state = self._reserve(scheduler.rows, scheduler.positions)
        try:
            while scheduler.busy():
                for song in scheduler.cancelled():  # every frame it made is collected
                    self._stop(state, song)
                    scheduler.finish(song, "cancelled")
                for song in scheduler.admit():
                    self._admit(state, song)
                    if song.frames_left == 0:
                        self._stop(state, song)
                        scheduler.finish(song, "length")
                if not scheduler.running:
                    continue
                steps = min(self.sync_every, *(s.frames_left for s in scheduler.running))
                for i in range(steps):
                    # The furthest position written: any batch but a one-song one reads its
                    # whole cache (scheduler.py says why); that song feeds frame f at P + f - 1.
                    furthest = state.capacity - 1
                    if scheduler.one_song:
                        song = scheduler.running[0]
                        furthest = len(song.prompt) + song.made - 1 + i
                    self._run_step(state, self._kv_len(furthest, state.capacity))
                self._collect(state, scheduler)
        except KeyboardInterrupt:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # what was queued before Ctrl-C completes
            self._collect(state, scheduler)
            raise

    def generate_frames(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        on_frame: OnFrame | None = None,
        on_codes: OnCodes | None = None,
    ) -> Tensor:
        """One song, PlainEngine's contract (its own draws: the fused sampler's)."""
        return self.run_song(SongRun(prompt, sampling, on_frame, on_codes))

    def run_song(self, song: SongRun) -> Tensor:
        """As `PlainEngine.run_song`."""
        return run_one(self.run, self.model, song)


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
