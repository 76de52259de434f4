"""The one song runner: every song heartmula-rt makes goes through here — `gen` (one song,
`--count`, `--batch-file`), the edits, `serve` (and each Ray replica) and `bench`.

As in vLLM's split, the `Scheduler` decides which LM rows run and the engine runs them
(`engine.run(scheduler)`). Around that loop the runner keeps every song's work:

- its codes go to its sidecar (codes.py) as they are made, every `SAVE_EVERY_S` (serve: every
  codec window), and as soon as its LM part ends, before the codec touches them;
- the codec works on a thread of its own (`CodecStage`). A whole song (`live=False`: gen, edits,
  bench) is decoded once its LM part ends, songs ended meanwhile together (up to
  `DECODE_SONGS`), under `Pipeline.codec_lock`: with the codec on another device that is while
  the LM makes the others, on the LM's device once the batch lets go of the lock. A live song
  (`live=True`: serve) is decoded window by window as its frames come (`LiveDecoder`, on the
  codec's side stream), its pieces handed out as they are decoded;
- a Ctrl-C keeps everything: songs that had ended are written, songs cut short are decoded to
  `<stem>.partial<ext>` with their sidecars, songs not started are left out (`SongsInterrupted`);
  a codec that fails or is interrupted leaves each unwritten song's sidecar (`CodecStopped`).

A front end hears of its songs through `SongEvents` and presents them; it runs no thread of its
own. Thread rules: the engine's thread (the caller of `run`, or the one `start` makes) holds
`Pipeline.lock` while a batch runs; the codec's thread holds `Pipeline.codec_lock` for a group
of whole songs; `submit` and `cancel` may come from any thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from heartmula_rt.model.codec import DECODE_SONGS, DecodeCancelled, codec_noise
from heartmula_rt.request import SongRequest
from heartmula_rt.runtime.audio import partial_path, write_audio
from heartmula_rt.runtime.codes import SongCodes, sidecar_path
from heartmula_rt.runtime.decode import check_length, song_codes
from heartmula_rt.runtime.events import SongEvents
from heartmula_rt.runtime.live import LiveDecoder
from heartmula_rt.runtime.scheduler import Scheduler, SongRun

if TYPE_CHECKING:
    from heartmula_rt.runtime.engine import Engine
    from heartmula_rt.runtime.pipeline import Pipeline

SAVE_EVERY_S = 10.0  # at most this much of the LM's work is lost if the process dies


@dataclass(frozen=True)
class Original:
    """An edited song's audio as it was decoded (read back from its lossless file) and the
    codec's window prefixes from its sidecar: the edit's audio then decodes only the windows
    from the first changed one (`Pipeline.redecode_frames`), the samples before it copied.
    `changed_from`: the first frame the edit changes."""

    path: Path
    wav: torch.Tensor
    prefixes: torch.Tensor
    changed_from: int


@dataclass(eq=False)
class Song:
    """One song the runner makes: its request and run (its prompt, settings and frames), where
    its audio and codes go, and what became of it.

    `output`: the audio file written once decoded (whole songs; None: the waveform is kept in
    `wav`); `sidecar`: where its codes are kept (default: beside `output`; None with no output:
    not kept). `codes` set instead of a run: a song whose LM part is done (an edit's), given to
    `SongRunner.finish`. `tail`: frames [8, k] that follow the song's own once it ends by EOS or
    length (a regenerated section's rest); `original`: an edit's audio, so that only the
    changed windows are decoded."""

    request: SongRequest
    run: SongRun | None = None
    output: Path | None = None
    sidecar: Path | None = None
    tail: torch.Tensor | None = None
    original: Original | None = None
    label: str = ""  # names it in messages
    model: str | None = None  # the checkpoint fingerprint its sidecar names (default: the pipe's)
    # The LoRA adapters its sidecar names (codes.LoraRecord; None: what the pipe ran for it).
    lora: tuple | None = None
    # What became of it.
    codes: torch.Tensor | None = None  # [8, T] once its LM part ended
    ended: str | None = None  # codes.ENDS
    wav: torch.Tensor | None = None  # kept only without an output
    seconds: float = 0.0  # of audio written
    clipped: int = 0  # samples outside [-1, 1], clipped in the file
    windows: tuple[int, int] = (0, 0)  # codec windows (decoded, of all): an edit decodes fewer
    written: bool = False
    error: str | None = None
    note: str | None = None  # its codes were kept elsewhere, or not at all (save_codes)
    # Set by `SongRunner.cancel` while its LM part runs: its live codec gives up the window
    # in hand within one ODE step and decodes no more (CodecStage).
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _saved_at: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.sidecar is None and self.output is not None:
            self.sidecar = sidecar_path(self.output)

    @property
    def made(self) -> int:
        """Frames made so far (an edit's given frames included)."""
        if self.codes is not None:
            return self.codes.shape[1]
        given = 0 if self.run is None or self.run.given is None else self.run.given.shape[0]
        return given + (0 if self.run is None else self.run.made)


class SongsInterrupted(KeyboardInterrupt):
    """Ctrl-C in the LM stage of `SongRunner.run`: `songs` as they were kept (ended ones written,
    cut ones written as `.partial` with `ended` "interrupted", unstarted ones with nothing);
    `codec` the codec's own stop (`CodecStopped`) while their audio was being decoded, if it
    was."""

    def __init__(self, songs: Sequence[Song], codec: CodecStopped | None = None) -> None:
        super().__init__("interrupted")
        self.songs, self.codec = list(songs), codec


class CodecStopped(Exception):
    """The codec stage stopped (`cause`: a Ctrl-C or an error) before `unwritten` songs were
    written; each one's codes are in its sidecar."""

    def __init__(self, cause: BaseException, unwritten: Sequence[Song]) -> None:
        super().__init__(str(cause))
        self.cause, self.unwritten = cause, list(unwritten)


def _lora(pipe: Pipeline, song: Song) -> tuple:
    """The adapters `song`'s sidecar names: its own, else what the pipeline ran for it."""
    return pipe.lora_records(song.request) if song.lora is None else tuple(song.lora)


def save_codes(pipe: Pipeline, song: Song, codes: torch.Tensor, ended: str) -> None:
    """The song's codes in its sidecar (if it keeps one), its LM part `ended` so far.

    A sidecar that cannot be written (a full disk) is written to the temporary folder instead
    (`song.sidecar` then names it, `song.note` says so), so that the LM's work is kept on
    another disk; if that fails too, the codes stay in memory (`song.codes`, for the codec)
    and `song.note` says what was lost and how to make the frames again: the same seed."""
    if song.sidecar is None:
        return
    model = song.model or pipe.fingerprint
    record = SongCodes(codes, song.request, ended, model, lora=_lora(pipe, song))
    try:
        record.save(song.sidecar)
        return
    except OSError as e:
        failed, why = song.sidecar, _why(e)
    elsewhere = Path(tempfile.gettempdir()) / f"heartmula-rt-{os.getpid()}-{failed.name}"
    try:
        record.save(elsewhere)
    except OSError as e:
        song.note = (
            f"could not keep the song's codes: {why} ({failed}), nor in {elsewhere} "
            f"({_why(e)}); its {codes.shape[1]} frames are not saved: make them again with "
            f"the same seed ({song.request.sampling.seed}) and settings"
        )
        song.sidecar = None  # kept nowhere: no message may name it
        return
    song.sidecar = elsewhere
    song.note = f"could not write {failed}: {why}; the song's codes are kept in {elsewhere}"


def _why(e: OSError) -> str:
    """An OSError in a few words ("no space left on device")."""
    return (e.strerror or str(e)).lower()


def _add_prefixes(pipe: Pipeline, song: Song, prefixes: torch.Tensor) -> None:
    """The sidecar written again with the codec's window prefixes of the audio just written, so
    that an edit of the song decodes only the windows it changes. A failure loses only them."""
    if song.sidecar is None:
        return
    try:
        model = song.model or pipe.fingerprint
        SongCodes(
            song.codes, song.request, song.ended, model, prefixes=prefixes, lora=_lora(pipe, song)
        ).save(song.sidecar)
    except OSError as e:
        song.error = (
            f"could not add the codec's window prefixes to {song.sidecar} ({e.strerror or e}); "
            "its codes are kept, but an edit of the song will decode every window"
        )


def decode_group(pipe: Pipeline, group: Sequence[Song], events: SongEvents) -> None:
    """Songs whose LM part is done, decoded (together, but an edit's alone, decoding only the
    windows it changed) and written, each with its window prefixes added to its sidecar."""
    plain = [s for s in group if s.original is None]
    if plain:
        decoded = pipe.decode_frames_batch(
            [s.codes for s in plain],
            [s.request.codec for s in plain],
            seeds=[s.request.noise_seed for s in plain],
            return_prefixes=True,
            on_window=lambda i, done, total: _window(plain[i], done, total, events),
        )
        for song, (wav, prefixes) in zip(plain, decoded, strict=True):
            _write(pipe, song, wav, prefixes, events)
    for song in (s for s in group if s.original is not None):
        wav, prefixes = pipe.redecode_frames(
            song.codes,
            song.request.codec,
            seed=song.request.noise_seed,
            changed_from=song.original.changed_from,
            prefixes=song.original.prefixes,
            original=song.original.wav,
            on_window=lambda done, total, song=song: _window(song, done, total, events),
        )
        _write(pipe, song, wav, prefixes, events)


def _window(song: Song, done: int, total: int, events: SongEvents) -> None:
    song.windows = (done, total)
    events.window(song, done, total)


def _write(
    pipe: Pipeline, song: Song, wav: torch.Tensor, prefixes: torch.Tensor, events: SongEvents
) -> None:
    if song.output is None:
        song.wav = wav
    else:
        song.clipped = write_audio(song.output, wav, pipe.sample_rate)
    song.seconds, song.written = wav.shape[-1] / pipe.sample_rate, True
    song.windows = (song.windows[0], prefixes.shape[0])
    _add_prefixes(pipe, song, prefixes)
    events.written(song)


class CodecStage:
    """The codec's thread. Whole songs (`put`) are decoded and written as they come, those put
    meanwhile together (up to `DECODE_SONGS`), under `Pipeline.codec_lock`; a live song's new
    frames (`push`) are decoded as they come, each song's windows in order. `stop()` takes no
    more (the group being decoded is finished), `finish()` waits for everything put; `error`
    holds what stopped a whole song's decoding (a live song's error fails that song alone)."""

    def __init__(
        self, pipe: Pipeline, events: SongEvents, on_failed: Callable[[Song], None]
    ) -> None:
        self.pipe, self.events, self.on_failed = pipe, events, on_failed
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._live: dict[int, LiveDecoder] = {}
        self._heard: dict[int, int] = {}  # a live song's samples handed out so far
        self._thread = threading.Thread(target=self._run, name="heartmula-rt codec", daemon=True)
        self._thread.start()

    def put(self, song: Song) -> None:
        """A whole song, its LM part done."""
        self._queue.put((song, None))

    def push(self, song: Song, new: torch.Tensor | None) -> None:
        """A live song's new frames [8, k]; None: it has ended, decode the rest."""
        self._queue.put((song, new if new is not None else _ENDED))

    def _run(self) -> None:
        torch.set_num_threads(self.pipe.threads)
        with torch.no_grad():
            while (item := self._queue.get()) is not None:
                if item[1] is not None:
                    self._live_step(*item)
                elif not self._whole(item[0]):
                    return

    def _whole(self, first: Song) -> bool:
        """Decode `first` and the whole songs put meanwhile; False: the stage stops."""
        with self.pipe.codec_lock:  # the codec's turn: take what has ended meanwhile too
            if self._stopped.is_set():
                return False
            group, end = [first], False
            while len(group) < DECODE_SONGS:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    end = True
                    break
                group.append(item[0])
            try:
                decode_group(self.pipe, group, self.events)
            except BaseException as e:  # noqa: BLE001 (said by the runner, with the sidecars)
                self.error = e
                return False
        return not end

    def _live_step(self, song: Song, new: torch.Tensor | object) -> None:
        """A live song's frames through its decoder. An error fails that song alone: its rows
        are freed (`on_failed`) and it is `written` with its `error` once it has ended.

        A cancelled song (`song.stop`) decodes no more frames, and the window in hand is given
        up within one ODE step (`DecodeCancelled`); once it has ended it keeps the audio it
        had, or, cancelled before its first audio, gets its frames decoded as a song of that
        length (as Ctrl-C's songs in the CLI)."""
        try:
            if new is not _ENDED:
                if song.error is None and not song.stop.is_set():
                    (self._live.get(id(song)) or self._start(song)).push(new)
                return
            decoder = self._live.pop(id(song), None)
            if song.error is None and song.ended in ("eos", "length"):
                if song.stop.is_set():  # a cancel that came as it ended: pushes were skipped
                    self._decode_again(song)
                else:
                    decoder = decoder or self._start(song)
                    if song.tail is not None:  # a regenerated section: the original's rest
                        decoder.push(song.tail)
                    decoder.finish()  # the audio to its proper end
                song.written = True
            elif song.error is None and song.stop.is_set():
                if decoder is not None:  # its pieces still on their way from the GPU
                    decoder.readback.flush(wait=True)
                made = 0 if song.codes is None else song.codes.shape[1]
                if made and not self._heard.get(id(song)):
                    self._decode_again(song)  # cancelled before its first audio
        except DecodeCancelled:  # the window in hand given up: the decoder is spent
            spent = self._live.pop(id(song), None)
            if spent is not None:
                spent.readback.flush(wait=True)  # the windows before it are the song's
            if new is not _ENDED:
                return
        except Exception as e:  # noqa: BLE001 (this song fails, the others go on)
            self._live.pop(id(song), None)
            song.error = f"{type(e).__name__}: {e}"
            if new is not _ENDED:
                self.on_failed(song)
                return
        self._heard.pop(id(song), None)
        self.events.written(song)

    def _decode_again(self, song: Song) -> None:
        """A live song's codes decoded from its start to their end by a fresh decoder (no
        stop), the samples it has handed out already skipped: the same audio, since a window's
        samples do not depend on the codes after it."""
        skip = self._heard.get(id(song), 0)

        def put(piece: object) -> None:
            nonlocal skip
            drop = min(skip, piece.shape[1])
            skip -= drop
            if piece.shape[1] > drop:
                self._put(song, piece[:, drop:])

        decoder = LiveDecoder(
            self.pipe.codec,
            song.request.codec,
            generator=codec_noise(song.request.noise_seed),
            put=put,
        )
        decoder.push(song.codes)  # an edit's given frames and a section's tail included
        decoder.finish()

    def _put(self, song: Song, piece: object) -> None:
        self._heard[id(song)] = self._heard.get(id(song), 0) + piece.shape[1]
        self.events.audio(song, piece)

    def _start(self, song: Song) -> LiveDecoder:
        decoder = self._live[id(song)] = self._decoder(song)
        return decoder

    def _decoder(self, song: Song) -> LiveDecoder:
        decoder = LiveDecoder(
            self.pipe.codec,
            song.request.codec,
            generator=codec_noise(song.request.noise_seed),
            put=lambda piece: self._put(song, piece),
            stop=song.stop.is_set,
        )
        if song.run is not None and song.run.given is not None:  # an edit: its kept frames
            decoder.push(song.run.given.T)
        return decoder

    def stop(self) -> None:
        """Take no more songs; return once the group being decoded is written."""
        self._stopped.set()
        self._queue.put(None)
        self._thread.join()

    def finish(self) -> None:
        """Return once everything put is done, or the thread has stopped on an error."""
        self._queue.put(None)
        try:
            self._thread.join()
        except BaseException:  # a Ctrl-C while waiting: no more songs after this group
            self._stopped.set()
            raise


_ENDED = object()  # a live song's last push: it has ended


class SongRunner:
    """Songs through one pipeline's LM rows (`rows`, each of `positions` cache positions) and
    its codec beside, as the module says. `live`: songs are decoded as their frames come (the
    server), else each whole once its LM part ends. `one_song`: a single song alone in rows of
    its own, as `Pipeline.generate_frames` runs it."""

    def __init__(
        self,
        pipe: Pipeline,
        *,
        rows: int,
        positions: int,
        events: SongEvents | None = None,
        live: bool = False,
        one_song: bool = False,
        engine: Engine | None = None,
    ) -> None:
        self.pipe, self.live = pipe, live
        self.engine = pipe.engine if engine is None else engine
        self.events = events or SongEvents()
        self.scheduler = Scheduler(rows, positions, one_song=one_song)
        self.songs: list[Song] = []
        self._songs_lock = threading.Lock()  # submit (any thread) beside the serving loop's prune
        self._codec: CodecStage | None = None
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def codec(self) -> CodecStage:
        if self._codec is None:
            self._codec = CodecStage(self.pipe, self.events, self.cancel)
        return self._codec

    # -- any thread --------------------------------------------------------------------------

    def submit(self, song: Song) -> Song:
        """Queue a song (refused in one line if it can never fit the rows). Callbacks its run
        already has (`on_codes`, `on_end`: a caller of `run_songs`) are called first."""
        run = song.run
        check_length(self.pipe.lm, run.prompt, run.sampling.max_frames)
        run.on_codes = _then(run.on_codes, lambda new: self._on_codes(song, new))
        run.on_end = _then(run.on_end, lambda why: self._on_end(song, why))
        with self._songs_lock:
            self.scheduler.submit(run)
            self.songs.append(song)
        self._wake.set()
        return song

    def cancel(self, song: Song) -> None:
        """End a song at the next frame boundary (its frames so far are kept); while its LM
        part runs, its live codec stops too (`Song.stop`, CodecStage._live_step)."""
        if song.ended is None:  # an ended song's codec finishes it whole
            song.stop.set()
        self.scheduler.cancel(song.run)
        self._wake.set()

    # -- batch: the caller's thread runs the LM --------------------------------------------------

    def run(self, *, decode: bool = True) -> list[Song]:
        """Every song submitted to its end, on this thread, then (with `decode`) every song's
        audio. Ctrl-C in the LM raises `SongsInterrupted` with everything kept; a codec that
        stops raises `CodecStopped`."""
        try:
            self._run_lm()
        except KeyboardInterrupt:
            if not decode:
                raise SongsInterrupted(self.songs) from None
            self._interrupted()
        self.events.lm_finished()
        if decode:
            self._finish_codec()
        return self.songs

    def _run_lm(self) -> None:
        with self.pipe.lock, torch.no_grad():
            torch.set_num_threads(self.pipe.threads)  # per thread: the caller's may differ
            self.engine.run(self.scheduler)

    def _finish_codec(self) -> None:
        if self._codec is None:
            return
        try:
            self._codec.finish()
        except KeyboardInterrupt as e:
            self._codec.error = e
        if self._codec.error is not None:
            unwritten = [s for s in self.songs if s.codes is not None and not s.written]
            raise CodecStopped(self._codec.error, unwritten)

    def _interrupted(self) -> None:
        """Ctrl-C in the LM: the codec's group in hand is finished, then every started song
        not yet written is decoded here (cut ones as `.partial`) and `SongsInterrupted` says
        what was kept."""
        if self._codec is not None:
            self._codec.stop()
        started = []
        for song in self.songs:
            if song.written or song.made == 0:
                continue
            if song.ended is None:  # cut short: to its .partial file, with its own sidecar
                if song.sidecar is not None and song.sidecar.exists():
                    song.sidecar.unlink()  # what the periodic saves kept goes with it
                song.output = None if song.output is None else partial_path(song.output)
                song.sidecar = None if song.output is None else sidecar_path(song.output)
                song.codes, song.ended = song_codes(song.run, self.pipe.lm), "interrupted"
                save_codes(self.pipe, song, song.codes, song.ended)
            started.append(song)
        stopped = None
        if started:
            self.events.interrupted(started)
            try:
                for first in range(0, len(started), DECODE_SONGS):
                    decode_group(self.pipe, started[first : first + DECODE_SONGS], self.events)
            except BaseException as e:  # noqa: BLE001 (said with the sidecars)
                stopped = CodecStopped(e, [s for s in started if not s.written])
        raise SongsInterrupted(self.songs, stopped) from None

    # -- the engine's thread ---------------------------------------------------------------------

    def _on_codes(self, song: Song, new: torch.Tensor) -> None:
        self.events.frames(song, new)
        if self.live:
            self.codec.push(song, new)
        if self._save_due(song):
            save_codes(self.pipe, song, song_codes(song.run, self.pipe.lm), "interrupted")
            song._saved_at = time.monotonic()

    def _save_due(self, song: Song) -> bool:
        return song.sidecar is not None and time.monotonic() - song._saved_at >= SAVE_EVERY_S

    def _on_end(self, song: Song, why: str) -> None:
        codes = song_codes(song.run, self.pipe.lm)
        if why in ("eos", "length") and song.tail is not None:
            codes = torch.cat([codes, song.tail], dim=1)
        song.codes, song.ended = codes, why
        if codes.shape[1]:
            save_codes(self.pipe, song, codes, why)
        self.events.lm_ended(song)
        if self.live:
            self.codec.push(song, None)
        elif codes.shape[1]:
            self.codec.put(song)

    # -- serving: a thread of its own runs the LM ------------------------------------------------

    def start(self) -> None:
        """Make songs as they are submitted, on a thread of the runner's own, until `close`."""
        self._thread = threading.Thread(target=self._serve, name="heartmula-rt LM", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            if not self.scheduler.busy():
                if self._closing:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._run_lm()
            except Exception as e:  # noqa: BLE001 (the songs in flight fail, the rest go on)
                with self._songs_lock:
                    songs = {id(s.run): s for s in self.songs}
                for run in list(self.scheduler.running):
                    songs[id(run)].error = f"{type(e).__name__}: {e}"
                    self.scheduler.finish(run, "failed")
            with self._songs_lock:  # ended songs go; one submitted meanwhile stays
                self.songs[:] = [s for s in self.songs if s.ended is None]

    def close(self) -> None:
        """Stop: songs running end where they are (`cancelled`: their callers say how), queued
        ones never start; returns once the LM's thread and the codec's are done."""
        self._closing = True
        with self._songs_lock:
            songs = list(self.songs)
        for song in songs:
            self.scheduler.cancel(song.run)
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        if self._codec is not None:
            with contextlib.suppress(KeyboardInterrupt):
                self._codec.finish()


def _then(first: Callable | None, then: Callable) -> Callable:
    """A callback that calls `first` (if any), then `then`."""
    if first is None:
        return then

    def both(arg: object) -> None:
        first(arg)
        then(arg)

    return both


def run_songs(
    pipe: Pipeline,
    runs: Sequence[SongRun],
    rows: int,
    *,
    one_song: bool = False,
    engine: Engine | None = None,
) -> list[torch.Tensor]:
    """Runs through the LM alone (no codec, no sidecar; `engine`: another than the pipeline's,
    as bench compares them): their codes, in order; Ctrl-C raises `SongsInterrupted` with each
    one's frames so far in its `codes`."""
    positions = max(r.positions for r in runs)
    runner = SongRunner(pipe, rows=rows, positions=positions, one_song=one_song, engine=engine)
    for run in runs:
        runner.submit(Song(None, run=run))
    try:
        runner.run(decode=False)
    finally:  # a Ctrl-C's songs keep their frames so far
        for song in runner.songs:
            song.codes = song_codes(song.run, pipe.lm)
    return [song.codes for song in runner.songs]


def finish_songs(
    pipe: Pipeline, songs: Sequence[Song], events: SongEvents | None = None
) -> list[Song]:
    """Songs whose LM part is done (`codes` and `ended` set: an edit's) through the runner's
    codec stage: each one's codes saved in its sidecar first, then its audio decoded and
    written. `CodecStopped` if the codec stops."""
    runner = SongRunner(pipe, rows=1, positions=1, events=events)
    for song in songs:
        save_codes(pipe, song, song.codes, song.ended)
        runner.songs.append(song)
        runner.codec.put(song)
    runner._finish_codec()
    return list(songs)
