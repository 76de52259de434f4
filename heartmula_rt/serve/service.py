"""The song service behind `heartmula-rt serve`: one pipeline, one background thread running its
batching scheduler for every client's songs, and each song's audio kept as it is made.

Data flows one way: an HTTP body → `SongRequest` → a job record (jobs.py) and a `SongRun` posted
to the scheduler → the engine's thread, where each song's new frames go through its own
`LiveDecoder` (the streaming codec: a window decoded as soon as its codes are certain, between
LM frames) → its `LiveAudio`, a file that any number of listeners read while it grows → the
finished file in the asked format. Nothing of a song lives only in memory: its codes are saved
beside its audio every window and at its end (its sidecar `<id>.codes.safetensors`, codes.py,
kept), its audio as float32 samples (`<id>.pcm`), so a killed server's songs are `interrupted`
on restart with their audio so far written out.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from heartmula_rt.config import DEFAULT_SONGS_AT_ONCE, PROMPT_TOKENS
from heartmula_rt.errors import UserError
from heartmula_rt.request import (
    DEFAULT_MAX_SECONDS,
    FRAME_MS,
    JSON_LORA,
    Reference,
    SongRequest,
    max_frames_for,
    prompt_too_long,
    request_from_json,
    seconds_value,
)
from heartmula_rt.runtime.codes import SongCodes, request_of_record, request_record, sidecar_path
from heartmula_rt.runtime.decode import song_codes
from heartmula_rt.runtime.edit import section
from heartmula_rt.runtime.events import SongEvents
from heartmula_rt.runtime.runner import Song, SongRunner, save_codes
from heartmula_rt.runtime.scheduler import SongRun
from heartmula_rt.serve.backend import AUDIO_FORMATS, DEFAULT_FORMAT, Conflict, QueueFull, RateMeter
from heartmula_rt.serve.config import ServiceConfig
from heartmula_rt.serve.jobs import FINAL, Job, JobStore
from heartmula_rt.serve.limits import check_limits
from heartmula_rt.serve.live import LiveAudio, write_final

if TYPE_CHECKING:
    from heartmula_rt.runtime.pipeline import Pipeline

# The fields of an edit's body (`SongService.edit`), beside tags, lyrics, seed and format.
EDIT_FIELDS = {"extend": ("seconds",), "regen": ("from", "to")}


@dataclass(eq=False)
class _Song(Song):
    """A job the service holds while it is queued or running: the runner's song (an edit's
    starts from given frames of its original and, a section, ends with its `tail`), its job
    record and its live audio."""

    job: Job | None = None
    audio: LiveAudio | None = None
    cancelled: bool = False  # by its client (not by the server closing)


class SongService(SongEvents):
    """Songs from any thread, made together by one background thread (`start()`/`close()`)."""

    def __init__(self, pipe: Pipeline, store: JobStore, config: ServiceConfig) -> None:
        self.pipe, self.store, self.config = pipe, store, config
        self.fingerprint = pipe.fingerprint  # every sidecar's `model`, read once here
        self.folder = Path(config.folder)
        self.max_frames = max_frames_for(config.max_seconds)
        plan = pipe.plan
        self.songs_at_once = config.songs_at_once or (
            DEFAULT_SONGS_AT_ONCE if plan is None else plan.max_songs
        )
        limit = pipe.lm_config.backbone.max_seq_len
        # Every song's rows as if guided, and room for a long lyric sheet's prompt. Songs are
        # decoded live, window by window, so that listeners hear them as they are made.
        self.runner = SongRunner(
            pipe,
            rows=2 * self.songs_at_once,
            positions=min(PROMPT_TOKENS + self.max_frames + 1, limit),
            events=self,
            live=True,
        )
        self._songs: dict[str, _Song] = {}  # queued and running, by job id
        self._lock = threading.Lock()
        self._closing = False
        self.rate = RateMeter()

    # -- the client side (any thread) --------------------------------------------------------

    def submit(self, body: object) -> Job:
        """Check an HTTP body's song and queue it; `UserError` says what is wrong with it,
        `QueueFull` that there is no room now."""
        longest = {"max_seconds": min(DEFAULT_MAX_SECONDS, self.config.max_seconds)}
        request, extra = request_from_json(body, longest, also=("format", "reference"))
        if extra.get("reference") is not None:  # {"embedding": [512], "strength": s}
            request = replace(request, reference=Reference.of_record(extra["reference"]))
        fmt = extra.get("format", DEFAULT_FORMAT)
        if request.sampling.max_frames > self.max_frames:
            raise UserError(
                f"seconds must be at most {self.config.max_seconds:g} on this server, not "
                f"{request.sampling.max_frames * FRAME_MS / 1000:g}"
            )
        if request.sampling.seed is None:  # chosen here, so that it is kept with the job
            request = request.with_settings(seed=secrets.randbits(31))
        return self._queue(request, fmt, None, (None, None), request.sampling.max_frames + 1)

    def _queue(
        self,
        request: SongRequest,
        fmt: str,
        edit: dict[str, Any] | None,
        parts: tuple[torch.Tensor | None, torch.Tensor | None],
        total: int,
    ) -> Job:
        """Check a song (and an edit's `parts`) fits, record its job and queue it."""
        if not isinstance(fmt, str) or fmt not in AUDIO_FORMATS:
            raise UserError(f"format must be one of {', '.join(AUDIO_FORMATS)}, not {fmt!r}")
        vocabulary = self.pipe.lm_config.audio_vocab_size
        topk = min(self.config.max_topk or vocabulary, vocabulary)
        check_limits(request, self.config, max_topk=topk)
        if total - 1 > self.max_frames:  # an edit of a song made under a larger cap, say
            raise UserError(
                f"the song would be {(total - 1) * FRAME_MS / 1000:g} s long; this server makes "
                f"songs of at most {self.config.max_seconds:g} s"
            )
        # Checked here rather than by `pipe.prompt`, whose sentence names the CLI's flags.
        prompt = self.pipe.prompt(request, fit=False)
        too_long = prompt_too_long(
            prompt.slot_index,
            len(prompt) - prompt.slot_index - 1,
            request.sampling.max_frames,
            self.pipe.lm_config.backbone.max_seq_len,
        )
        if too_long is not None:
            raise UserError(too_long)
        self.runner.scheduler.check(SongRun(prompt, request.sampling))
        job = Job(
            id=secrets.token_hex(8),
            request=_request_fields(request),
            format=fmt,
            max_frames=total,
            edit=edit,
        )
        with self._lock:
            if self._closing:
                raise QueueFull(5)
            if len(self._queued()) >= self.config.max_queue + self._free_rows():
                raise QueueFull(self._retry_after())
            self.store.add(job)
            self._post(job, request, prompt, parts)
        return job

    def edit(self, job_id: str, kind: str, body: object) -> Job:
        """Queue an edit of a finished song (edit.py): `extend` (`seconds` more) or `regen`
        (the section `from` [`to`] seconds made again), with the song's tags, lyrics and seed
        unless the body gives others. `Conflict` if the song has no codes to edit."""
        base = self.job(job_id)
        if base is None:
            raise LookupError(job_id)
        if base.state not in FINAL:
            raise Conflict(f"song {job_id} is {base.state}: edit it once it has ended")
        path = self._sidecar(base)
        if not path.is_file():
            raise Conflict(f"song {job_id} has no codes to edit ({base.state})")
        original = SongCodes.load(path, model=self.fingerprint)
        if not isinstance(body, dict):
            raise UserError(f"not a JSON object but {type(body).__name__}")
        allowed = ("tags", "lyrics", "seed", "format", *EDIT_FIELDS[kind])
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; use {', '.join(allowed)}")
        texts = {k: body.get(k, getattr(original.request, k)) for k in ("tags", "lyrics")}
        sampling = original.request.sampling
        if kind == "extend":
            if "seconds" not in body:
                raise UserError("give seconds: how much longer")
            more = max_frames_for(_seconds(body, "seconds", positive=True))
            room = self.max_frames - (original.frames - 1)  # the new song is capped, not the part
            if not 1 <= more <= room:
                most = f"{room * FRAME_MS / 1000:g} s" if room > 0 else "nothing"
                raise UserError(
                    f"this server makes songs of at most {self.config.max_seconds:g} s and this "
                    f"one is {(original.frames - 1) * FRAME_MS / 1000:g} s: seconds may add "
                    f"{most}, not {body['seconds']}"
                )
            sampling = replace(sampling, max_frames=original.frames - 1 + more)
            edit = {"of": base.id, "kind": kind, "start": original.frames, "end": None}
        else:
            if "from" not in body:
                raise UserError("give from: where the section starts, in seconds")
            end_s = None if body.get("to") is None else _seconds(body, "to")
            start, end = section(original.frames, _seconds(body, "from"), end_s)
            if end is not None:  # exactly the section: no EOS inside it
                sampling = replace(sampling, max_frames=end - 1, stop_at_eos=False)
            sampling = replace(sampling, seed=None)  # a new take: a new seed by default
            edit = {"of": base.id, "kind": kind, "start": start, "end": end}
        if "seed" in body:
            sampling = replace(sampling, seed=body["seed"])
        request = SongRequest.of(**texts).with_settings(
            **{k: v for k, v in asdict(sampling).items() if k != "seed"},
            num_steps=original.request.codec.num_steps,
            guidance_scale=original.request.codec.guidance_scale,
            noise_seed=original.request.noise_seed,  # unchanged windows sound the same
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(31),
        )
        if base.request.get("lora"):  # the song's own adapter makes its edit too
            request = replace(
                request, lora=base.request["lora"], lora_scale=base.request.get("lora_scale", 1.0)
            )
        request = replace(request, reference=original.request.reference)  # the song's own
        fmt = body.get("format", base.format)
        parts = self._edit_parts(edit, original)
        total = request.sampling.max_frames + 1 + (0 if parts[1] is None else parts[1].shape[1])
        return self._queue(request, fmt, edit, parts, total)

    def _sidecar(self, job: Job) -> Path:
        return sidecar_path(self.folder / f"{job.id}.{job.format}")

    def _edit_parts(
        self, edit: dict[str, Any] | None, original: SongCodes | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """An edit's (given frames, tail) from its original's sidecar."""
        if edit is None:
            return None, None
        if original is None:
            base = self.store.get(edit["of"])
            if base is None:
                raise UserError(f"the song {edit['of']} this one edits is gone")
            original = SongCodes.load(self._sidecar(base), model=self.fingerprint)
        codes, end = original.codes, edit["end"]
        return codes[:, : edit["start"]], None if end is None else codes[:, end:]

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running song (its rows are freed at the engine's next frame
        boundary); False if it is not queued or running."""
        with self._lock:
            song = self._songs.get(job_id)
            if song is None:
                return False
            song.cancelled = True
            self.runner.cancel(song)
        return True

    def adopt(self, job: Job) -> None:
        """Queue a recorded job that another service left queued (its replica has gone:
        ray_app.py), as `start` queues its own."""
        request = _job_request(job)
        prompt, parts = self.pipe.prompt(request), self._edit_parts(job.edit)
        with self._lock:
            self._post(job, request, prompt, parts)

    def job(self, job_id: str) -> Job | None:
        """The job as it stands now: its live progress if held here, else its record."""
        song = self._songs.get(job_id)
        return song.job if song is not None else self.store.get(job_id)

    def live_audio(self, job_id: str) -> LiveAudio | None:
        song = self._songs.get(job_id)
        return None if song is None else song.audio

    def audio_path(self, job: Job) -> Path | None:
        """The job's written audio file, if any."""
        return None if job.audio is None else self.folder / job.audio

    def _queued(self) -> list[_Song]:
        """The songs waiting for rows."""
        return [s for s in self._songs.values() if s.job.state == "queued"]

    def _free_rows(self) -> int:
        """Songs that may start now (called with the lock held). A song posted while a row is
        free waits for the runner's next step, not for a row: it is not in the queue, however
        slowly a loaded machine lets the runner take it."""
        running = sum(s.job.state == "running" for s in self._songs.values())
        return max(0, self.songs_at_once - running)

    def info(self) -> dict[str, Any]:
        """What the app shows of this service (`SongBackend.info`)."""
        config = self.pipe.config
        return {
            "sample_rate": self.pipe.sample_rate,
            "model": str(config.model_path or config.synthetic),
            "device": str(self.pipe.device),
            "engine": config.engine,
            "quant": config.quant,
            "max_seconds": self.config.max_seconds,
            "songs_at_once": self.songs_at_once,
            "rows": self.runner.scheduler.rows,
            # The adapters a song may choose ("lora": name), each at its own strength.
            "lora": [
                {"name": a.name, "scale": a.scale}
                for a in self.pipe.adapters
                if a.name in self.pipe.lora_names
            ],
        }

    def recent(self, limit: int) -> list[Job]:
        """The latest `limit` jobs, as they stand now."""
        return [self.job(j.id) or j for j in self.store.recent(limit)]

    def stats(self) -> dict[str, Any]:
        """Numbers for /metrics: queue length, songs running, frames/s, jobs per state."""
        with self._lock:
            songs = list(self._songs.values())
        return {
            "queued": sum(s.job.state == "queued" for s in songs),
            "running": sum(s.job.state == "running" for s in songs),
            "frames_per_s": self.rate.per_second(),
            "jobs": self.store.counts(),
            "rows": self.runner.scheduler.rows,
        }

    def gpu_memory(self) -> tuple[int, int] | None:
        """(allocated, reserved) bytes of the GPU the pipeline runs on; None on the CPU."""
        device = self.pipe.device
        if device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)

    # -- lifetime ----------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous server left (running songs → interrupted, their audio so far
        written; queued songs queued again), then start making songs."""
        for job in self.store.in_states("running"):
            self._frames_kept(job)
            self._write(job, "interrupted")
        for job in self.store.in_states("queued"):
            try:
                request = _job_request(job)
                prompt = self.pipe.prompt(request)
                parts = self._edit_parts(job.edit)
            except UserError as e:  # e.g. a server now started with a smaller model
                self.store.update(job.id, state="failed", error=str(e), finished=time.time())
                continue
            self._post(job, request, prompt, parts)
        self.runner.start()

    def _frames_kept(self, job: Job) -> None:
        """A killed server's song: its frames as its sidecar kept them (saved every window and
        as its LM part ended, before the codec), which its record may not have heard of yet
        (a song killed between its LM part and its first codec window had 0)."""
        path = self._sidecar(job)
        if path.is_file():
            with contextlib.suppress(UserError):
                job.frames = max(job.frames, SongCodes.load(path).frames)

    def close(self) -> None:
        """Stop: songs running are cut where they are and kept as `interrupted`, queued ones
        stay queued for the next start."""
        with self._lock:
            self._closing = True
        self.runner.close()

    # -- the runner's threads (runner.py): the LM's, then the codec's --------------------------

    def _post(
        self,
        job: Job,
        request: SongRequest,
        prompt: Any,
        parts: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> None:
        """Queue a job's song; an edit's `parts` are its given frames and its tail."""
        given, tail = parts
        run = SongRun(
            prompt,
            request.sampling,
            given=None if given is None else given.T,
            lora=request.lora,  # its own adapter, run on its rows alone (serve --lora)
            lora_scale=request.lora_scale,
        )
        audio = LiveAudio(self.folder / f"{job.id}.pcm")
        song = _Song(request, run, sidecar=self._sidecar(job), tail=tail, job=job, audio=audio)
        self._songs[job.id] = song
        self.runner.submit(song)

    def frames(self, song: _Song, new: torch.Tensor) -> None:
        """The LM's thread: a song's new frames, counted."""
        job = song.job
        if job.state == "queued":  # admitted: its first frame
            job.state, job.started = "running", time.time()
            self.store.update(job.id, state="running", started=job.started)
            if song.run.given is not None:  # an edit: the kept frames come first
                job.frames += song.run.given.shape[0]
        job.frames += new.shape[1]
        self.rate.add(new.shape[1])

    def lm_ended(self, song: _Song) -> None:
        """The LM's thread: its codes are in its sidecar (the runner saved them)."""
        if song.ended in ("eos", "length") and song.tail is not None:
            song.job.frames += song.tail.shape[1]  # a section: the original's frames after it

    def audio(self, song: _Song, piece: np.ndarray) -> None:
        """The codec's thread: a window's audio, kept with the codes that made it."""
        job = song.job
        if job.first_audio is None:
            job.first_audio = time.time()
            self.store.update(job.id, first_audio=job.first_audio)
        song.audio.append(piece)
        job.audio_seconds = song.audio.samples / self.pipe.sample_rate
        if song.ended is None:
            self._save(song, "interrupted")  # what they are if the server dies now

    def written(self, song: _Song) -> None:
        """The codec's thread: a song has ended and its audio is decoded: its final file and
        record (a song whose end cannot be written is marked failed)."""
        try:
            self._end(song)
        except Exception as e:  # noqa: BLE001 (this song fails, the others go on)
            song.error = song.error or f"{type(e).__name__}: {e}"
            self._fail(song)

    def _fail(self, song: _Song) -> None:
        """A song whose end could not be written: its record says so, whatever is on disk."""
        job = song.job
        job.state, job.error, job.finished = "failed", song.error, time.time()
        with contextlib.suppress(Exception):
            song.audio.close()
        self.store.update(job.id, state="failed", error=job.error, finished=job.finished)
        with self._lock:
            self._songs.pop(job.id, None)

    def _save(self, song: _Song, ended: str) -> None:
        """The song's sidecar, its LM part `ended` as codes.py says, and its progress."""
        job = song.job
        save_codes(self.pipe, song, song.codes if song.codes is not None else
                   song_codes(song.run, self.pipe.lm), ended)
        self.store.update(job.id, frames=job.frames, audio_seconds=job.audio_seconds)

    def _end(self, song: _Song) -> None:
        job, why = song.job, song.ended
        if song.error is not None:  # its codec (or the batch) failed
            why = "failed"
        song.audio.close()
        if why == "cancelled" and not song.cancelled and job.state == "queued":
            (self.folder / f"{job.id}.pcm").unlink()  # the server closing: queued for next time
        else:
            state = {"eos": "done", "length": "done", "failed": "failed"}.get(why, "cancelled")
            if why == "cancelled" and not song.cancelled:
                state = "interrupted"  # the server closing
            if job.frames:
                self._save(song, "interrupted" if state == "interrupted" else why)
            self._write(job, state, song.error)
            job.state = state
        with self._lock:
            self._songs.pop(job.id, None)

    def _write(self, job: Job, state: str, error: str | None = None) -> None:
        """Write a song's final file (if it has audio) from its audio file so far, which goes,
        and its record's final state."""
        write_final(self.store, self.folder, job, state, self.pipe.sample_rate, error)

    def _retry_after(self) -> int:
        """Seconds until the queue likely has room (called with the lock held): a queued song
        is admitted when a running one ends, so the time the nearest end takes at the pace of
        the last 10 s (5 s while that pace is not known yet)."""
        rate = self.rate.per_second()
        running = [s.job for s in self._songs.values() if s.job.state == "running"]
        if not rate or not running:
            return 5
        per_song = rate / len(running)  # frames/s of each running song
        nearest = min(max(job.max_frames - job.frames, 0) for job in running)
        return max(1, math.ceil(nearest / per_song))


def _seconds(body: dict[str, Any], name: str, *, positive: bool = False) -> float:
    """A time in a body: a finite number of seconds (no NaN, no 1e308), else one sentence."""
    return seconds_value(name, body[name], positive=positive)


def _job_request(job: Job) -> SongRequest:
    """The request a job record keeps: the sidecar's exact record (its frames exactly, whatever
    `seconds` rounds to)."""
    fields = {k: v for k, v in job.request.items() if k != "seconds"}
    lora = {k: fields.pop(k) for k in JSON_LORA if k in fields}  # the song's own adapter
    return replace(request_of_record(fields), **lora)


def _request_fields(request: SongRequest) -> dict[str, Any]:
    """A request as the job keeps it: the sidecar's record (codes.py), and `seconds` for the
    API's view of it (app.py shows the fields of a body that makes the same song)."""
    seconds = round(request.sampling.max_frames * FRAME_MS / 1000, 3)
    lora = {"lora": request.lora, "lora_scale": request.lora_scale} if request.lora else {}
    return {**request_record(request), "seconds": seconds, **lora}


__all__ = ["SongService"]
