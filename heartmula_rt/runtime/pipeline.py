"""The public pipeline: a song request → LM frames → HeartCodec → waveform (loaded by
loader.py's `load_pipeline`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from heartmula_rt.config import (
    DEFAULT_SONGS_AT_ONCE,
    CodecConfig,
    GenConfig,
    LMConfig,
)
from heartmula_rt.errors import UserError
from heartmula_rt.memory.placement import Placement
from heartmula_rt.memory.planner import (
    MemoryPlan,
)
from heartmula_rt.model import folder
from heartmula_rt.model.codec import HeartCodec, codec_noise
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.lora import LoraAdapter
from heartmula_rt.model.prompt import Prompt, build_prompt
from heartmula_rt.request import (
    DEFAULT_CODEC,
    CodecParams,
    SongRequest,
    check_seed,
    check_songs,
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
)
from heartmula_rt.runtime.scheduler import SongRun
from heartmula_rt.runtime.stream import SongStream

if TYPE_CHECKING:
    from heartmula_rt.runtime.loader import PipelineConfig



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


def check_streamable(plan: MemoryPlan | None) -> None:
    """Streaming decodes while the LM runs: a plan must keep both models on the GPU."""
    if plan is not None and not plan.codec_beside_lm:
        raise UserError(
            f"the --vram {plan.budget_bytes / 2**30:g}G plan takes turns between the LM and the "
            "codec on the GPU, so it cannot stream: use a budget whose plan keeps the codec on "
            "the GPU throughout (see `heartmula-rt plan`), or do not stream"
        )
