"""Which songs' rows run (vLLM's split: the scheduler decides, an engine only runs them).

A `Scheduler` owns a fixed block of LM rows, `rows` wide and `positions` long (the KV cache an
engine allocates for it), and a queue. A song is admitted at a frame boundary into the first
free run of adjacent rows it needs (1 without guidance, 2 with: its conditional row, then its
unconditional one), first come first served; when it ends (EOS, its length, cancelled, or failed
with the whole batch) its rows are free at once for the next song in the queue. Songs may be
submitted and cancelled from any thread while an engine runs the batch: a lock guards the queue
and the rows, and an engine applies cancellations at its next frame boundary (`cancelled`).
Nothing here imports torch.

A batch made for `one_song` holds exactly that song's rows and nothing else; the engines read
its cache only as far as the song has filled it. Any other batch reads every position of its
cache in every step, so that a song's frames do not depend on how far its neighbours are: the
attention kernels round differently for different lengths, even over masked positions.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from heartmula_rt.errors import UserError
from heartmula_rt.request import SamplingParams

ENDS = ("eos", "length", "cancelled", "failed")


@dataclass(eq=False)
class SongRun:
    """One song in flight: what it asks for, where it runs and what it has made.

    `frames` holds its frames so far (each an [n_codebooks] int64 CPU tensor, frame 0 first),
    kept whatever happens to the batch: a Ctrl-C or another song's error leaves them there.
    `on_codes(new)` ([n_codebooks, k] int64, CPU) and then `on_frame(made)` are called as
    frames come, and `on_end(why)` once it has ended and its rows are free, from the thread
    running the engine.
    """

    prompt: Any  # prompt.Prompt
    sampling: SamplingParams
    on_frame: Callable[[int], None] | None = None
    on_codes: Callable[[Any], None] | None = None
    on_end: Callable[[str], None] | None = None
    seed: int = field(default=-1)  # the sampling seed, or one drawn at random
    first_row: int | None = None  # set while admitted
    frames: list = field(default_factory=list)
    ended: str | None = None  # one of ENDS
    cancel: bool = False  # asked to end at the next frame boundary (`Scheduler.cancel`)
    # A continued song (edit.py): frames [k, n] int64 (CPU) it starts from, fed after its
    # prompt instead of drawn (they count in `max_frames`; callbacks report only new frames),
    # and the song's index of its first frame: draws are seeded by (seed, first_frame + f, k).
    given: Any = None
    first_frame: int = 0
    # The served LoRA adapter its rows run (`SongRequest.lora`; None: none) at `lora_scale`
    # times its own strength: the engine assigns its rows when it is admitted.
    lora: str | None = None
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            given = self.sampling.seed
            self.seed = secrets.randbits(63) if given is None else given

    @property
    def rows(self) -> int:
        return self.sampling.cfg_rows

    @property
    def positions(self) -> int:
        """Cache positions the song needs: its prompt and every frame it may feed back."""
        return len(self.prompt) + self.sampling.max_frames

    @property
    def made(self) -> int:
        return len(self.frames)

    @property
    def frames_left(self) -> int:
        """Frames it may still make before its length ends it."""
        return self.sampling.max_frames + 1 - self.made


class Scheduler:
    """Songs queued and running over `rows` LM rows of `positions` cache positions each."""

    def __init__(self, rows: int, positions: int, *, one_song: bool = False) -> None:
        if rows < 1 or positions < 1:
            raise UserError(f"a batch needs at least 1 row and 1 position, not {rows}, {positions}")
        self.rows, self.positions, self.one_song = rows, positions, one_song
        self._submitted = 0
        self._owner: list[SongRun | None] = [None] * rows
        self.waiting: deque[SongRun] = deque()
        self.running: list[SongRun] = []
        self._lock = threading.RLock()

    def submit(self, song: SongRun) -> SongRun:
        """Queue `song` (from any thread); refuse one that could never run here."""
        self.check(song)
        with self._lock:
            self.waiting.append(song)
            self._submitted += 1
        return song

    def check(self, song: SongRun) -> None:
        """Refuse a song that could never run here."""
        if self.one_song and (self._submitted or song.rows != self.rows):
            raise ValueError("a one-song batch takes one song of exactly its rows")
        if song.rows > self.rows:
            raise UserError(
                f"a song with guidance needs 2 LM rows; this batch has {self.rows} "
                "(give it 2 rows, or a cfg scale of at most 1)"
            )
        if song.positions > self.positions:
            raise UserError(
                f"the song needs {song.positions} cache positions (prompt and frames); this "
                f"batch holds {self.positions}"
            )

    def cancel(self, song: SongRun) -> None:
        """Ask `song` to end (from any thread): a waiting one leaves the queue at the next
        admission, a running one frees its rows at the engine's next frame boundary; either
        ends as "cancelled", its frames so far kept."""
        with self._lock:
            song.cancel = True

    def cancelled(self) -> list[SongRun]:
        """The running songs asked to end: the engine ends each (`finish(song, "cancelled")`)
        once it holds every frame the song made."""
        with self._lock:
            return [song for song in self.running if song.cancel]

    def _free_run(self, count: int) -> int | None:
        """The first row of the first `count` adjacent free rows, if any."""
        run = 0
        for row, owner in enumerate(self._owner):
            run = run + 1 if owner is None else 0
            if run == count:
                return row - count + 1
        return None

    def admit(self) -> list[SongRun]:
        """Move waiting songs into free rows, in order, until the next one does not fit; the
        cancelled ones end instead."""
        with self._lock:
            dropped = [song for song in self.waiting if song.cancel]
        for song in dropped:
            self.finish(song, "cancelled")
        admitted = []
        with self._lock:
            while self.waiting:
                first = self._free_run(self.waiting[0].rows)
                if first is None:
                    break
                song = self.waiting.popleft()
                song.first_row = first
                for row in range(first, first + song.rows):
                    self._owner[row] = song
                self.running.append(song)
                admitted.append(song)
        return admitted

    def finish(self, song: SongRun, why: str) -> None:
        """End `song` (`why`: one of ENDS); its rows are free for the next admission."""
        with self._lock:
            song.ended = why
            if song in self.waiting:
                self.waiting.remove(song)
            else:
                for row in range(song.first_row, song.first_row + song.rows):
                    self._owner[row] = None
                self.running.remove(song)
        if song.on_end is not None:
            song.on_end(why)

    def busy(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running)

    def owners(self) -> Iterator[tuple[int, SongRun | None]]:
        """(row, the song running there or None) for every row."""
        return enumerate(self._owner)
