"""The public pipeline: a song request → LM frames → HeartCodec → waveform."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from heartmula_rt.config import (
    DEFAULT_SONGS_AT_ONCE,
    LM_DTYPES,
    LM_PRESETS,
    CodecConfig,
    GenConfig,
    LMConfig,
    default_codec_dtype,
    default_dtype,
)
from heartmula_rt.errors import UserError
from heartmula_rt.memory.placement import Placement
from heartmula_rt.memory.planner import (
    DEFAULT_OVERHEADS,
    MemoryPlan,
    checkpoint_configs,
    device_budgets,
    dtype_name,
    plan_memory,
    preset_configs,
)
from heartmula_rt.memory.sizing import measure_overheads
from heartmula_rt.model import checkpoint, folder
from heartmula_rt.model.codec import CODEC_DTYPES, HeartCodec, check_codec_dtype, codec_noise
from heartmula_rt.model.folder import CODEC_DIR, LM_DIR
from heartmula_rt.model.fused import use_fused_layers
from heartmula_rt.model.lm import HeartMuLa, merge_projections
from heartmula_rt.model.lora import (
    LoraAdapter,
    LoraSpec,
    apply_lora_rows,
    load_loras,
    lora_rows_bytes,
    merge_lora,
    parse_lora_spec,
)
from heartmula_rt.model.prompt import Prompt, build_prompt
from heartmula_rt.model.synthetic import Models, synthetic_models
from heartmula_rt.quant import check_mode, quantize_model
from heartmula_rt.quant.cache import load_quantized_lm
from heartmula_rt.quant.fast import check_fast_path, use_fast_kernels
from heartmula_rt.request import (
    DEFAULT_CODEC,
    DEFAULT_MAX_SECONDS,
    CodecParams,
    SongRequest,
    check_seed,
    check_songs,
    max_frames_for,
)
from heartmula_rt.runtime import edit, runner
from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.runtime.codes import LoraRecord, SongCodes
from heartmula_rt.runtime.decode import (
    BatchInterrupted,
    GenerationInterrupted,
    OnCodes,
    OnFrame,
    check_length,
    song_codes,
)
from heartmula_rt.runtime.engine import (
    Engine,
    check_engine,
    check_engine_over_streaming,
    default_engine,
    make_engine,
)
from heartmula_rt.runtime.scheduler import SongRun
from heartmula_rt.runtime.stream import SongStream

DTYPES = {name: getattr(torch, name) for name in LM_DTYPES}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UserError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    """`auto` (the default everywhere): the first CUDA GPU if torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def _same_gpu(a: torch.device, b: torch.device) -> bool:
    """Whether two CUDA devices are one GPU, "cuda" being torch's default, cuda:0."""
    return a.type == b.type == "cuda" and (a.index or 0) == (b.index or 0)


def resolve_threads(threads: int | None = None) -> int:
    """The CPU threads torch's ops get: `threads`, or by default one fewer than the cores this
    process may run on (its affinity mask, which containers and `taskset` narrow), at least 1
    and at most torch's own count in the calling thread (OMP_NUM_THREADS or
    `torch.set_num_threads` is kept). Every op of a team of threads ends at a barrier, and one
    core taken by another process makes every barrier wait for the scheduler (a one-window
    decode beside a busy process: 1.4 s on 1 thread, 3.6 s on 2 of 2 cores); a core left free
    avoids that."""
    if threads is None:
        return max(1, min(len(os.sched_getaffinity(0)) - 1, torch.get_num_threads()))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be a whole number of at least 1, not {threads!r}")
    return threads


@dataclass(frozen=True)
class PipelineConfig:
    """How to load a pipeline: where the weights come from and how the models run.

    Checked when made, and every field then holds what will be used: `device` "auto" becomes
    "cuda" or "cpu", the dtypes, engine and threads left out become the device's defaults.
    These defaults are the only ones (`load_pipeline`, the CLI and `bench` all make one).
    """

    model_path: Path | None = None  # a checkpoint folder in the official layout (SPEC §1)
    synthetic: str | None = None  # or: random weights of this LM_PRESETS size, made on device
    device: str = "auto"  # auto: the first CUDA GPU if torch sees one, else the CPU
    codec_device: str | None = None  # the codec's, if not `device` (the LM's): frames cross once
    dtype: str | None = None  # LM weights: bfloat16 on a GPU, float32 on the CPU
    codec_dtype: str | None = None  # codec.CODEC_DTYPES: mixed on a GPU, float32 on the CPU
    engine: str | None = None  # engine.ENGINES: graph on a GPU, plain on the CPU
    quant: str = "none"  # quant.QUANT_MODES
    # A GPU memory budget ("12G"; with the codec on a GPU of its own, each one's, or "12G,8G":
    # the LM's, then the codec's): the planner chooses the rest.
    vram: str | None = None
    max_seconds: float = DEFAULT_MAX_SECONDS  # the longest song a `vram` plan makes room for
    stream: bool = False  # the pipeline will stream: a plan that cannot is refused at load
    songs: int = 1  # songs at once (`generate_frames_batch`) a `vram` plan makes room for
    threads: int | None = None  # torch's CPU threads (resolve_threads)
    # LoRA adapters, "[NAME=]PATH[:SCALE]" (`lora.parse_lora_spec`) or `LoraSpec`s: merged into
    # the LM's weights before quantization (docs/lora.md), or with `lora_per_song` run per LM
    # row, each song choosing one by NAME (`SongRequest.lora`; serve) or none.
    lora: tuple[str | Path | LoraSpec, ...] = ()
    lora_per_song: bool = False

    def __post_init__(self) -> None:
        if (self.model_path is None) == (self.synthetic is None):
            raise UserError(
                "give one of a checkpoint folder (model_path) and a synthetic model size"
            )
        if self.synthetic is not None and self.synthetic not in LM_PRESETS:
            raise UserError(
                f"unknown model preset {self.synthetic!r}; use one of {', '.join(LM_PRESETS)}"
            )
        device = parse_device(self.device)
        engine = default_engine(device) if self.engine is None else self.engine
        check_engine(engine, device)
        check_mode(self.quant)
        check_fast_path(self.quant, device)
        max_frames_for(self.max_seconds)
        check_songs(self.songs)
        codec_device = device if self.codec_device is None else parse_device(self.codec_device)
        if _same_gpu(codec_device, device):  # "cuda" and "cuda:0" are one device
            codec_device = device
        if self.vram is not None:
            if device.type != "cuda":
                raise UserError(f"--vram budgets GPU memory; the device {device} is not a CUDA GPU")
            if self.quant != "none":
                raise UserError("--vram chooses the quantization itself: leave out --quant")
            _vram_budgets(self.vram, device, codec_device)
        resolved = {
            "model_path": None if self.model_path is None else Path(self.model_path),
            "device": str(device),
            "codec_device": str(codec_device),
            "dtype": dtype_name(parse_dtype(self.dtype or default_dtype(device))),
            "codec_dtype": check_codec_dtype(self.codec_dtype or default_codec_dtype(codec_device)),
            "engine": engine,
            "threads": resolve_threads(self.threads),
            "lora": tuple(
                parse_lora_spec(s)
                for s in ((self.lora,) if isinstance(self.lora, str | Path) else self.lora or ())
            ),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_codec_device(self) -> torch.device:
        return torch.device(self.codec_device)

    @property
    def lm_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def codec_weights_dtype(self) -> torch.dtype:
        """What the codec's DiT blocks load as (the precision mode's first dtype)."""
        return CODEC_DTYPES[self.codec_dtype][0]


SongArg = SongRequest | str


def as_request(song: SongArg, lyrics: str | None, settings: dict[str, Any]) -> SongRequest:
    """A `SongRequest` as given, or made from tags, lyrics and settings (`SongRequest.of`)."""
    if isinstance(song, SongRequest):
        if lyrics is not None:
            raise UserError("give a SongRequest or tags and lyrics, not both")
        return song.with_settings(**settings) if settings else song
    return SongRequest.of(song, "" if lyrics is None else lyrics, **settings)


@dataclass
class Pipeline:
    """A loaded HeartMuLa LM and HeartCodec, ready to turn song requests into audio.

    Every method that makes a song takes a `SongRequest`, or as a convenience the tags, the
    lyrics and any of its settings by name (`pipe.generate("piano", "[verse] ...", seed=1)`).

    Safe to share between threads: each call that runs a model holds `lock` (a song's stream
    holds it from its first frame to its last piece, `generate` for the LM and the codec), so
    calls from several threads run one at a time, in turn, each as it would alone. A codec on
    another device than the LM's (`codec_device`; a plan's codec "apart") has a lock of its own,
    `codec_lock`: its calls (`decode_frames`, `decode_frames_batch`, `redecode_frames`) then run
    beside the LM's, one at a time among themselves.
    """

    lm: HeartMuLa
    lm_config: LMConfig
    codec: HeartCodec
    codec_config: CodecConfig
    tokenizer: Tokenizer
    gen_config: GenConfig
    config: PipelineConfig
    engine: Engine
    placement: Placement | None = None  # the `vram` plan applied, with the models' host mirrors
    # The LoRA adapters `config.lora` loaded: merged into `lm`, or run per row (`lora_rows`).
    adapters: tuple[LoraAdapter, ...] = ()
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # `lock` itself while the codec shares the LM's device (__post_init__).
    codec_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.config.codec_device == self.config.device:
            self.codec_lock = self.lock

    @property
    def device(self) -> torch.device:
        return self.config.torch_device

    @property
    def threads(self) -> int:
        """torch's CPU threads, set in every thread that runs this pipeline's work."""
        return self.config.threads

    @property
    def sample_rate(self) -> int:
        return self.codec_config.sample_rate

    @property
    def plan(self) -> MemoryPlan | None:
        """The `vram` memory plan this pipeline was loaded with."""
        return None if self.placement is None else self.placement.plan

    @cached_property
    def fingerprint(self) -> str:
        """The checkpoint's fingerprint (`folder.fingerprint`), kept with every song's codes
        (codes.py); `synthetic-<size>` for random weights."""
        if self.config.model_path is None:
            return f"synthetic-{self.config.synthetic}"
        return folder.fingerprint(self.config.model_path)

    @property
    def lora_names(self) -> list[str]:
        """The adapters a song may choose by name (`SongRequest.lora`): the per-row ones."""
        return [a.name for a in self.adapters] if self.config.lora_per_song else []

    def check_lora(self, request: SongRequest) -> None:
        """Refuse a request for an adapter this pipeline does not run per song."""
        if request.lora is None or request.lora in self.lora_names:
            return
        if not self.config.lora_per_song and self.adapters:
            raise UserError(
                f"lora {request.lora!r}: this model runs its LoRAs merged for every song; a "
                "song chooses one only where they are served per song (serve --lora NAME=PATH)"
            )
        known = ", ".join(self.lora_names) or "none"
        raise UserError(f"no LoRA named {request.lora!r} is loaded (loaded: {known})")

    def lora_records(self, request: SongRequest) -> tuple[LoraRecord, ...]:
        """The adapters a song of `request` runs, as its sidecar keeps them: every merged one,
        or its own per-row one at its strength times the song's `lora_scale`."""
        if self.config.lora_per_song:
            chosen = [a for a in self.adapters if a.name == request.lora]
            scale = request.lora_scale
        else:
            chosen, scale = list(self.adapters), 1.0
        return tuple(
            LoraRecord(a.name, str(a.path.resolve()), a.fingerprint, a.scale * scale)
            for a in chosen
        )

    def prompt(self, request: SongRequest, *, fit: bool = True) -> Prompt:
        """The request's prompt rows (SPEC §2), refused if they and (with `fit`) its frames do
        not fit the model: everything a song of this request would be refused for, before it
        starts. A song continued past the context (edit.py) fits its runs itself."""
        prompt = build_prompt(
            self.tokenizer, self.gen_config, request.tags, request.lyrics, request.reference
        )
        if int(prompt.ids.max()) >= self.lm_config.text_vocab_size:
            raise UserError(
                f"tokenizer.json produces id {int(prompt.ids.max())}, outside the LM's text "
                f"vocabulary of {self.lm_config.text_vocab_size}"
            )
        if fit:
            check_length(self.lm, prompt, request.sampling.max_frames)
        self.check_lora(request)
        return prompt

    def generate_frames(
        self,
        song: SongArg,
        lyrics: str | None = None,
        *,
        on_frame: OnFrame | None = None,
        on_codes: OnCodes | None = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Sample audio codes: int64 [8, T] on the CPU, frame 0 included, EOS frame dropped.
        `on_codes(new)` gets the frames made since its last call ([8, k]), `on_frame(n)` the
        count so far.

        With a seed, sampling repeats exactly with the same engine on the same device (engines
        draw their random numbers differently; greedy decoding, topk=1, agrees across them).
        """
        request = as_request(song, lyrics, settings)
        run = SongRun(
            self.prompt(request),
            request.sampling,
            on_frame,
            on_codes,
            lora=request.lora,
            lora_scale=request.lora_scale,
        )
        try:
            return self.run_songs([run], run.rows, one_song=True)[0]
        except BatchInterrupted as e:
            raise GenerationInterrupted(e.frames[0]) from None

    def generate_frames_batch(
        self,
        requests: Sequence[SongRequest],
        *,
        songs: int | None = None,
        rows: int | None = None,
        on_frame: Callable[[int, int], None] | None = None,
        on_end: Callable[[int, torch.Tensor, str], None] | None = None,
        on_codes: Callable[[int, torch.Tensor], None] | None = None,
    ) -> list[torch.Tensor]:
        """Sample several songs' codes in one batch: a list of int64 [8, T] CPU tensors, in
        order. `songs` run at once (default: all of them, at most `DEFAULT_SONGS_AT_ONCE`, and
        at most what a `vram` plan holds); the others wait for the rows of songs that end.
        `rows` instead sets the LM rows exactly (1 per song, 2 with guidance): a song's frames
        are those it makes alone in a batch of the same rows, whatever shares it (decode.py).
        `on_frame(i, made)` is called as song i makes frames, `on_end(i, codes, why)` when it
        ends (`why`: "eos" or "length"), `on_codes(i, new)` with its new frames, all from the
        calling thread. Ctrl-C raises
        `BatchInterrupted` with every song's frames so far."""
        if not requests:
            return []
        runs = [
            SongRun(self.prompt(r), r.sampling, lora=r.lora, lora_scale=r.lora_scale)
            for r in requests
        ]
        for i, run in enumerate(runs):
            if on_frame is not None:
                run.on_frame = lambda made, i=i: on_frame(i, made)
            if on_end is not None:
                run.on_end = lambda why, i=i, run=run: on_end(i, song_codes(run, self.lm), why)
            if on_codes is not None:
                run.on_codes = lambda new, i=i: on_codes(i, new)
        rows = self.batch_rows(requests, songs) if rows is None else rows
        return self.run_songs(runs, rows)

    def run_songs(
        self, runs: Sequence[SongRun], rows: int, *, one_song: bool = False
    ) -> list[torch.Tensor]:
        """Songs already made into `SongRun`s (continued ones too, edit.py), in one batch of
        `rows` LM rows (`one_song`: one song alone in its rows, as `generate_frames` runs it)
        through the song runner (runner.py) without its codec: their codes, in order. Ctrl-C
        raises `BatchInterrupted`."""
        try:
            return runner.run_songs(self, runs, rows, one_song=one_song)
        except runner.SongsInterrupted as e:
            raise BatchInterrupted([song.codes for song in e.songs]) from None

    def continue_frames(
        self,
        request: SongRequest,
        frames: torch.Tensor | SongCodes,
        *,
        context_frames: int | None = None,
        on_frame: OnFrame | None = None,
    ) -> torch.Tensor:
        """A song's frames [8, k] (or its `SongCodes`) continued with `request` (its tags and
        lyrics: the same or new) to `request.sampling.max_frames` + 1 frames in all or its EOS,
        past the model's context if need be, each run then keeping the song's last
        `context_frames` (default `DEFAULT_CONTEXT_FRAMES`, at most half a run): edit.py
        (resume, extend). Ctrl-C raises `GenerationInterrupted` with the whole song so far."""
        return edit.continue_song(self, request, frames, context_frames, on_frame)

    def regenerate_frames(
        self,
        request: SongRequest,
        frames: torch.Tensor | SongCodes,
        start: int,
        end: int | None = None,
        *,
        seeds: Sequence[int],
    ) -> list[torch.Tensor]:
        """Takes of a song [8, T] (or its `SongCodes`) with its frames from `start` made again,
        one per seed, in one batch; frames before `start` are kept as they are. With `end`,
        each take's new section is exactly `end - start` frames, followed by the song's own
        frames from `end`: edit.py."""
        return edit.regenerate(self, request, frames, start, end, seeds)

    def batch_rows(self, requests: Sequence[SongRequest], songs: int | None = None) -> int:
        """LM rows for `songs` of `requests` at once, whichever they are (the rows of the
        `songs` that need most); by default all of them, at most `DEFAULT_SONGS_AT_ONCE` and
        at most the `vram` plan's songs. A plan's memory is never exceeded: more songs than it
        holds are refused."""
        if songs is not None:
            check_songs(songs)
        plan = self.plan
        most = len(requests) if plan is None else min(len(requests), plan.max_songs)
        if songs is None:
            songs = min(most, DEFAULT_SONGS_AT_ONCE)
        elif plan is not None and songs > plan.max_songs:
            raise UserError(
                f"the --vram {plan.budget_bytes / 2**30:g}G plan holds {plan.max_songs} songs "
                f"at once, not {songs}; make fewer at once, or give a larger budget"
            )
        needs = sorted((r.sampling.cfg_rows for r in requests), reverse=True)
        return sum(needs[: max(1, min(songs, len(requests)))])

    def decode_frames(
        self,
        frames: torch.Tensor,
        params: CodecParams = DEFAULT_CODEC,
        *,
        seed: int | None = None,
        on_window: Callable[[int, int], None] | None = None,
        return_prefixes: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Codes [8, T] → float32 stereo waveform [2, N] at 48 kHz, on the CPU. A seed draws the
        same noise on any device (`codec_noise`). `on_window(done, total)` after each window.
        `return_prefixes=True` returns (waveform, the codec's window prefixes float32 [W, 104,
        256]), what `redecode_frames` needs to decode an edit of the song (the sidecar keeps
        them, codes.py)."""
        report = None if on_window is None else lambda _, done, total: on_window(done, total)
        wavs = self.decode_frames_batch(
            [frames],
            params,
            seeds=[seed],
            songs=1,
            on_window=report,
            return_prefixes=return_prefixes,
        )
        return wavs[0]

    def redecode_frames(
        self,
        frames: torch.Tensor,
        params: CodecParams = DEFAULT_CODEC,
        *,
        seed: int,
        changed_from: int,
        prefixes: torch.Tensor,
        original: torch.Tensor,
        on_window: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An edited song's (waveform, window prefixes), decoding only the codec windows the edit
        changed (`HeartCodec.redecode`): `frames` [8, T'] are the new song, equal to the
        original's in their first `changed_from` frames; `params` and `seed` (its `noise_seed`)
        are the original's codec settings, `prefixes` [W, 104, 256] and `original` [2, N]
        float32 what `decode_frames(..., return_prefixes=True)` gave for the original (its audio
        read back from a lossless file will do: the samples before the first changed window
        are copied from it). Equals `decode_frames(frames, params, seed=seed,
        return_prefixes=True)` sample for sample where decoding is deterministic (this CPU at
        one thread count). `on_window(done, total)` counts the windows decoded."""
        if seed is None:
            raise UserError(
                "redecode_frames needs the seed of the original's codec noise (its noise_seed)"
            )
        check_seed("seed", seed)
        with self.codec_lock, self._codec_turn():
            torch.set_num_threads(self.threads)
            return self.codec.redecode(
                frames,
                params,
                generator=codec_noise(seed),
                changed_from=changed_from,
                prefixes=prefixes,
                original=original,
                on_window=on_window,
                return_prefixes=True,
            )

    def _codec_turn(self) -> contextlib.AbstractContextManager:
        """The codec's turn on the GPU under a `vram` plan (the LM makes room), else nothing."""
        if self.placement is None:
            return contextlib.nullcontext()
        return self.placement.codec_turn(self.lm, self.codec, self.engine.release)

    def decode_frames_batch(
        self,
        frames_list: Sequence[torch.Tensor],
        params: CodecParams | Sequence[CodecParams] = DEFAULT_CODEC,
        *,
        seeds: Sequence[int | None] | None = None,
        songs: int | None = None,
        on_window: Callable[[int, int, int], None] | None = None,
        return_prefixes: bool = False,
    ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        """Several songs' codes [8, T] → their float32 stereo waveforms, each what
        `decode_frames` gives it with its seed (None, or a None seed: fresh random noise);
        `return_prefixes=True`: each song's (waveform, window prefixes), as there.

        `songs` songs' windows go through the codec together (`HeartCodec.detokenize_many`;
        default `codec.DECODE_SONGS`). With a `vram` plan that counts a GPU's memory for the
        codec, one window at a time, whatever `songs` says: the plan sizes it for one window.
        `on_window(song, done, total)` is called after each window.
        """
        if self.plan is not None and self.plan.codec_windows_planned:
            songs = 1
        seeds = [None] * len(frames_list) if seeds is None else seeds
        for seed in seeds:  # the rule of every seed (the CLI's --seed, a request's)
            check_seed("seed", seed)
        generators = [codec_noise(seed) for seed in seeds]
        with self.codec_lock, self._codec_turn():
            torch.set_num_threads(self.threads)
            return self.codec.detokenize_many(
                frames_list,
                params,
                generators=generators,
                songs=songs,
                on_window=on_window,
                return_prefixes=return_prefixes,
            )

    def generate(self, song: SongArg, lyrics: str | None = None, **settings: Any) -> torch.Tensor:
        """A song → float32 stereo waveform [2, N] at 48 kHz."""
        request = as_request(song, lyrics, settings)
        with self.lock:  # the song's LM and codec in one turn
            frames = self.generate_frames(request)
            return self.decode_frames(frames, request.codec, seed=request.noise_seed)

    def save(self, wav: torch.Tensor, path: str | Path) -> int:
        """Write a song's waveform (float [2, N] at 48 kHz, as `generate`, `decode_frames` or a
        stream's pieces concatenated give it; a numpy array will do) to `path`: .wav, .flac,
        .ogg or .mp3 by its extension, written atomically. Returns how many samples were
        outside [-1, 1] and were clipped. `UserError` for a path that cannot be written."""
        return write_audio(Path(path), torch.as_tensor(wav), self.sample_rate)

    def stream(
        self,
        song: SongArg,
        lyrics: str | None = None,
        *,
        on_frame: OnFrame | None = None,
        **settings: Any,
    ) -> SongStream:
        """As `generate`, but an iterator of float32 [2, n] CPU tensors that come while the
        LM runs (stream.py); concatenated (`torch.cat(pieces, 1)`) they equal `generate`'s
        waveform for the same seed, bit for bit."""
        check_streamable(self.plan)
        request = as_request(song, lyrics, settings)
        if request.lora is not None:
            raise UserError(
                "Pipeline.stream runs no per-song LoRA; the server streams such songs (its "
                "song runner), or load the adapter merged"
            )
        return SongStream(
            self,
            self.prompt(request),
            request.sampling,
            request.codec,
            generator=codec_noise(request.noise_seed),
            on_frame=on_frame,
        )


def load_pipeline(
    source: str | Path | PipelineConfig,
    *,
    adapters: Sequence[LoraAdapter] | None = None,
    **options: Any,
) -> Pipeline:
    """Load a checkpoint folder in the official layout (SPEC §1), or what a `PipelineConfig`
    says (random weights of a preset size, `synthetic`, for benchmarks and tests).

    `options` are `PipelineConfig`'s fields: `device` (or `lm_device`), the LM's and by default
    the codec's, is `auto` (a CUDA GPU if torch sees one, else the CPU; as `heartmula-rt gen`),
    `cpu`, `cuda` or `cuda:N`; `codec_device` puts the codec on another. `dtype` is the LM's weight
    dtype (bfloat16 on a GPU, float32 on the CPU); `codec_dtype` one of `codec.CODEC_DTYPES`
    (`mixed` on a GPU, `float32` on the CPU); both load tensor by tensor. On a GPU (without a
    `vram` plan, which moves the codec) the codec's estimator is replayed as a CUDA graph.
    `engine` is one of `engine.ENGINES` (graph on a GPU, plain on the CPU). `quant` is one of
    `quant.QUANT_MODES`: the LM is then quantized while it loads, tensor by tensor, so its
    unquantized weights never sit in memory whole, cached for the next load (`quant.cache`),
    and run by the fast kernels the device has (`quant.fast`). On a GPU the LM's norms, RoPE
    and SiLU·mul are the fused twins of `heartmula_rt.model.fused`.

    `vram` ("12G") is a GPU memory budget: the planner (`planner.plan_memory`, for songs of up
    to `max_seconds`) then chooses the quantization and what lives on the GPU, the models load
    on the host and move as planned (`Pipeline.placement`), and `Pipeline.plan` holds the
    plan. `stream=True` says the pipeline will stream (`Pipeline.stream`): a plan that cannot
    is refused before loading.

    `threads` is the number of CPU threads torch's ops use (default: `resolve_threads`, the
    cores the process may run on less one); the pipeline sets it in every thread it runs in, the
    stream's worker included, since torch's count is kept per thread.
    """
    if isinstance(source, PipelineConfig):
        if options:
            raise UserError("give a PipelineConfig or options, not both")
        config = source
    elif not isinstance(source, (str, os.PathLike)) or isinstance(source, bytes):
        raise UserError(
            "load_pipeline takes a checkpoint folder (a str or Path) or a PipelineConfig, not "
            f"{type(source).__name__}"
        )
    else:
        if "lm_device" in options:  # the LM's device by the name that pairs with codec_device
            if "device" in options:
                raise UserError("give device or lm_device (one name of the LM's device), not both")
            options["device"] = options.pop("lm_device")
        config = PipelineConfig(model_path=Path(source), **options)
    torch.set_num_threads(config.threads)  # loading converts tensors on the CPU too
    device = config.torch_device
    if config.model_path is not None:
        folder.check_model_path(config.model_path)
    # Every adapter read and checked against the checkpoint before any weight loads.
    adapters = load_adapters(config) if adapters is None else list(adapters)
    per_row = adapters if config.lora_per_song else []
    plan = None
    if config.vram is not None:
        rows_bytes = lora_rows_bytes(per_row, _lm_config_of(config), config.lm_dtype)
        plan = plan_for(config, rows_bytes) if per_row else plan_for(config)
        check_engine_over_streaming(config.engine, plan.offloaded_lm_layers)
        if config.stream:
            check_streamable(plan)
        if per_row and plan.offloaded_lm_layers:
            raise UserError(
                f"the --vram {plan.budget_bytes / 2**30:g}G plan streams backbone layers from "
                "host memory, which per-song LoRAs cannot run over; give a larger budget, or "
                "load the adapters merged"
            )
    quant = config.quant if plan is None else plan.quant
    load_device = device if plan is None else torch.device("cpu")
    merged = [] if config.lora_per_song else adapters
    if config.model_path is None:
        models = _synthetic(config, quant, load_device, merged)
    else:
        models = _from_checkpoint(config, quant, load_device, merged)
    lm, codec = models.lm, models.codec
    if plan is None:
        codec.to(config.torch_codec_device)  # a no-op where it was loaded
    # A plan moves the codec between host and GPU: no graph captured over its tensors.
    prepare_codec(codec, config.codec_dtype, config.torch_codec_device, graphs=plan is None)
    if plan is None and device.type == "cuda":
        use_fused_layers(lm)
    placement = None
    if plan is not None:
        placement = Placement(plan, device, config.torch_codec_device)
        placement.place_lm(lm)
        placement.place_codec(codec)
    if per_row:  # over the quantized base, its fast kernels and fused layers, where it runs
        apply_lora_rows(lm, per_row, rows=1)
    if models.lm_config.audio_vocab_size <= models.codec_config.codebook_size:
        raise UserError(
            f"LM audio vocabulary {models.lm_config.audio_vocab_size} does not fit codec "
            f"codebook {models.codec_config.codebook_size}: these checkpoints do not belong "
            "together"
        )
    return Pipeline(
        lm=lm,
        lm_config=models.lm_config,
        codec=codec,
        codec_config=models.codec_config,
        tokenizer=models.tokenizer,
        gen_config=models.gen_config,
        config=config,
        engine=make_engine(config.engine, lm, models.gen_config),
        placement=placement,
        adapters=tuple(adapters),
    )


def _lm_config_of(config: PipelineConfig) -> LMConfig:
    """The LM's config, from the checkpoint's config files alone (or the preset's)."""
    if config.model_path is None:
        return preset_configs(config.synthetic)[0]
    return checkpoint_configs(config.model_path)[0]


def load_adapters(config: PipelineConfig) -> list[LoraAdapter]:
    """The LoRA adapters of `config.lora`, each read and checked against the checkpoint's LM
    (its config files alone): all of them, or a one-line refusal and none."""
    if not config.lora:
        return []
    return load_loras(config.lora, _lm_config_of(config))


def prepare_codec(
    codec: HeartCodec, mode: str, device: torch.device, *, graphs: bool = True
) -> HeartCodec:
    """The codec at precision `mode` (`codec.CODEC_DTYPES`) with the fast path a pipeline uses
    on `device`: its estimator replayed as a CUDA graph on a GPU, if `graphs`."""
    codec.set_precision(mode)
    codec.use_fast_path("graph" if graphs and device.type == "cuda" else None)
    return codec


def _from_checkpoint(
    config: PipelineConfig,
    quant: str,
    device: torch.device,
    lora: Sequence[LoraAdapter] = (),
) -> Models:
    """A checkpoint folder's models on `device`, the LM quantized as `quant` says, `lora`'s
    adapters merged into its weights before quantizing."""
    root = config.model_path
    tokenizer_file = folder.tokenizer_path(root)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise UserError(f"{tokenizer_file} is not a valid tokenizer file ({e})") from None
    gen_config = folder.load_gen_config(root)
    if quant == "none":
        lm, lm_config = checkpoint.load_lm(root / LM_DIR, device=device, dtype=config.lm_dtype)
        merge_lora(lm, lora)
        merge_projections(lm)  # q/k/v and w1/w3 as one matmul each (the quantized load does too)
    else:
        lm = load_quantized_lm(
            root / LM_DIR, quant, device=device, dtype=config.lm_dtype, lora=lora
        )
        lm_config = lm.config
    codec_device = config.torch_codec_device if device == config.torch_device else device
    codec, codec_config = checkpoint.load_codec(
        root / CODEC_DIR, device=codec_device, dtype=config.codec_weights_dtype
    )
    return Models(lm, lm_config, codec, codec_config, gen_config, tokenizer)


def _synthetic(
    config: PipelineConfig,
    quant: str,
    device: torch.device,
    lora: Sequence[LoraAdapter] = (),
) -> Models:
    """Random models of the preset size on `device` (host memory for a plan to place), their
    numbers drawn on the pipeline's device either way (a full model never passes through host
    memory unless the plan puts it there), the LM quantized as `quant` says."""
    models = synthetic_models(
        config.synthetic,
        device,
        config.lm_dtype,
        codec_dtype=config.codec_weights_dtype,
        draw_on=config.torch_device,
    )
    merge_lora(models.lm, lora)  # before quantizing
    merge_projections(models.lm)  # as a checkpoint loads: quantized concatenated
    quantize_model(models.lm, quant)
    if device == config.torch_device:  # else the placement swaps them in where it puts them
        use_fast_kernels(models.lm, config.lm_dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the unquantized weights' blocks
    return models


def check_streamable(plan: MemoryPlan | None) -> None:
    """Streaming decodes while the LM runs: a plan must keep both models on the GPU."""
    if plan is not None and not plan.codec_beside_lm:
        raise UserError(
            f"the --vram {plan.budget_bytes / 2**30:g}G plan takes turns between the LM and the "
            "codec on the GPU, so it cannot stream: use a budget whose plan keeps the codec on "
            "the GPU throughout (see `heartmula-rt plan`), or do not stream"
        )


def _vram_budgets(vram: str, device: torch.device, codec_device: torch.device) -> tuple:
    """`vram`'s budgets (`planner.device_budgets`) for an LM on `device` and a codec on
    `codec_device`."""
    apart = codec_device != device
    return device_budgets(vram, codec_apart=apart, codec_on_gpu=codec_device.type == "cuda")


def plan_for(config: PipelineConfig, lora_bytes: int = 0) -> MemoryPlan:
    """The memory plan of `config.vram` for these models, from their configs alone (a
    checkpoint's config files and headers): one GPU's, or with the codec on a device of its
    own, the LM's GPU's with the codec's GPU's inside it (`MemoryPlan.codec_device_plan`)."""
    if config.model_path is None:
        lm_config, codec_config = preset_configs(config.synthetic)
    else:
        lm_config, codec_config = checkpoint_configs(config.model_path)
    device, codec_device = config.torch_device, config.torch_codec_device
    budget, codec_budget = _vram_budgets(config.vram, device, codec_device)
    return plan_memory(
        budget,
        lm_config,
        codec_config,
        max_frames=max_frames_for(config.max_seconds),
        songs=config.songs,
        lm_dtype=config.dtype,
        codec_dtype=config.codec_weights_dtype,
        overheads=measure_overheads(device),
        codec_apart=codec_device != device,
        codec_budget_bytes=codec_budget,
        codec_overheads=measure_overheads(codec_device) if codec_budget else DEFAULT_OVERHEADS,
        lora_bytes=lora_bytes,
    )
