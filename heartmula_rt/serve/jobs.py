"""The service's job records: one row per song asked for, kept in SQLite so that a restarted
server lists every past job.

`JobStore` is the interface the service uses; `SqliteJobStore` its one implementation, a file
in the server's output folder (the standard library's sqlite3, WAL journal, one connection
guarded by a lock: the service's threads and the HTTP threads share it). A store shared by
several machines would implement the same methods over a database server (PostgreSQL, say:
one `jobs` table of these columns; ray_app.py's replicas and ingress then share it instead of
the file).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

# A job's states; the first two are live, the rest final.
STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = frozenset(STATES[2:])


@dataclass
class Job:
    """One song asked of the service: what (`request`, the body's fields as checked, with the
    seed used), where it stands, and when each step happened (Unix seconds)."""

    id: str
    request: dict[str, Any]
    format: str
    max_frames: int
    state: str = "queued"
    frames: int = 0  # LM frames made, frame 0 included
    audio_seconds: float = 0.0  # audio decoded so far (of the final file, once final)
    created: float = field(default_factory=time.time)
    started: float | None = None  # its first frame, once admitted and prefilled
    first_audio: float | None = None
    finished: float | None = None
    error: str | None = None
    audio: str | None = None  # the audio file's name in the output folder, once written
    # An edit of another job's song (edit.py): {"of": its id, "kind": "extend" | "regen",
    # "start": the first frame made again (regen), "end": the section's end or None}.
    edit: dict[str, Any] | None = None
    # Which replica makes it, when several do (ray_app.py: its Ray Serve replica's id).
    replica: str | None = None

    @property
    def seed(self) -> int:
        return self.request["seed"]


class JobStore(Protocol):
    """Where job records live. Every method is safe to call from any thread."""

    def add(self, job: Job) -> None: ...

    def update(self, job_id: str, **changes: Any) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def recent(self, limit: int) -> list[Job]: ...

    def in_states(self, *states: str) -> list[Job]: ...

    def counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


_COLUMNS = tuple(f.name for f in fields(Job))
_JSON = {"request", "edit"}


class SqliteJobStore:
    """`JobStore` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=30, check_same_thread=False, isolation_level=None
        )  # timeout: other processes (ray_app.py's replicas) may be writing
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed job
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs ("
            "id TEXT PRIMARY KEY, request TEXT NOT NULL, format TEXT NOT NULL, "
            "max_frames INTEGER NOT NULL, state TEXT NOT NULL, frames INTEGER NOT NULL, "
            "audio_seconds REAL NOT NULL, created REAL NOT NULL, started REAL, "
            "first_audio REAL, finished REAL, error TEXT, audio TEXT, edit TEXT, replica TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "replica" not in columns:  # a database made before jobs had a replica
            with contextlib.suppress(sqlite3.OperationalError):  # another process just did
                self._db.execute("ALTER TABLE jobs ADD COLUMN replica TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created)")

    def add(self, job: Job) -> None:
        row = {k: json.dumps(v) if k in _JSON else v for k, v in asdict(job).items()}
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                [row[c] for c in _COLUMNS],
            )

    def update(self, job_id: str, **changes: Any) -> None:
        unknown = set(changes) - set(_COLUMNS) | ({"id"} & set(changes))
        if unknown:
            raise ValueError(f"not a job field to change: {sorted(unknown)}")
        values = [json.dumps(v) if k in _JSON else v for k, v in changes.items()]
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                [*values, job_id],
            )

    def _select(self, where: str, args: list[Any]) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where}", args)
            rows = rows.fetchall()
        return [
            Job(**{c: json.loads(v) if c in _JSON else v for c, v in zip(_COLUMNS, r, strict=True)})
            for r in rows
        ]

    def get(self, job_id: str) -> Job | None:
        found = self._select("WHERE id = ?", [job_id])
        return found[0] if found else None

    def recent(self, limit: int) -> list[Job]:
        """The newest `limit` jobs, newest first."""
        return self._select("ORDER BY created DESC, rowid DESC LIMIT ?", [limit])

    def in_states(self, *states: str) -> list[Job]:
        """Jobs in any of `states`, oldest first."""
        marks = ", ".join("?" * len(states))
        return self._select(f"WHERE state IN ({marks}) ORDER BY created, rowid", list(states))

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (every state named, 0 where none)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {**dict.fromkeys(STATES, 0), **dict(rows)}

    def close(self) -> None:
        with self._lock:
            self._db.close()
