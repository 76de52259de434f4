"""`heartmula-rt serve`: load one pipeline, start its `SongService`, and serve the API with
uvicorn until Ctrl-C or SIGTERM (songs then running are kept as `interrupted`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from heartmula_rt.config import API_KEY_ENV
from heartmula_rt.errors import UserError
from heartmula_rt.request import FRAME_MS, SongRequest, check_songs, max_frames_for
from heartmula_rt.serve.config import ServerConfig, ServiceConfig
from heartmula_rt.serve.hosts import is_loopback

if TYPE_CHECKING:
    from heartmula_rt.runtime.loader import PipelineConfig
    from heartmula_rt.runtime.pipeline import Pipeline

DB_NAME = "jobs.sqlite3"
LOCK_NAME = "server.lock"  # held (flock) by the one server that uses the folder


def check_server(config: ServerConfig) -> str | None:
    """The API key in force (None for none); refuse a server others could reach without one."""
    key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise UserError("the API key is empty")
    if key is None and not is_loopback(config.host):
        raise UserError(
            f"--host {config.host} is reachable from other machines: give an API key "
            f"(--api-key or ${API_KEY_ENV}), or bind to 127.0.0.1"
        )
    if not 0 < config.port < 65536:
        raise UserError(f"--port must be in 1–65535, not {config.port}")
    service = config.service
    if service.max_queue < 1:
        raise UserError(f"--max-queue must be at least 1, not {service.max_queue}")
    if service.songs_at_once is not None:
        check_songs(service.songs_at_once)
    if not 0 < service.max_seconds < math.inf:
        raise UserError(f"--max-seconds must be a positive number, not {service.max_seconds}")
    max_frames_for(service.max_seconds)  # at most a day, in the same sentence as a request's
    for name in ("max_num_steps", "max_tags_chars", "max_lyrics_chars", "max_topk"):
        value = getattr(service, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{name} must be a whole number, not {value!r}")
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, not {value}")
    for name in ("max_guidance_scale", "max_cfg_scale", "max_temperature"):
        if not 0 < getattr(service, name) < math.inf:
            raise UserError(f"{name} must be a positive number, not {getattr(service, name)}")
    for name in config.allow_hosts:
        if not name or name != name.strip() or any(c in name for c in "/:@ \t"):
            raise UserError(f"--allow-host takes a host name such as studio.lan, not {name!r}")
    return key


def model_max_seconds(pipe: Pipeline) -> float:
    """The longest song the model's context fits after the shortest prompt (a one-letter tag):
    a server's `max_seconds` is capped to it, so that its page never offers a length every
    request would be refused for. Exactly that many frames (`max_frames_for` gives them back)."""
    shortest = len(pipe.prompt(SongRequest("a"), fit=False))
    frames = pipe.lm_config.backbone.max_seq_len - shortest - 1
    if frames < 1:
        raise UserError(
            f"the model's context of {pipe.lm_config.backbone.max_seq_len} positions holds no "
            "song after a prompt"
        )
    seconds = round(frames * FRAME_MS / 1000, 3)
    if max_frames_for(seconds) < frames:  # 0.08 s steps are not exact in binary
        seconds = (frames * FRAME_MS + 1) / 1000
    return seconds


def capped(service: ServiceConfig, pipe: Pipeline) -> ServiceConfig:
    """`service` with its `max_seconds` at most what the model's context fits
    (`model_max_seconds`), said on stderr when it is cut: the local server's and each Ray
    replica's."""
    fits = model_max_seconds(pipe)
    if service.max_seconds <= fits:
        return service
    print(
        f"--max-seconds {service.max_seconds:g} is more than the model's context "
        f"of {pipe.lm_config.backbone.max_seq_len} fits: songs of at most {fits:g} s",
        file=sys.stderr,
    )
    return replace(service, max_seconds=fits)


class FolderLock:
    """One server per output folder: an advisory lock (flock) on FOLDER/server.lock, held for
    the server's life and released by the kernel when its process ends however it ends, the
    file holding the holder's pid and port. A second server on the folder would mark the
    first's running songs interrupted at its start and then make them again."""

    def __init__(self, folder: Path, port: int) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.port = port
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot open the lock file {self.path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"the folder {self.path.parent} is in use by another heartmula-rt serve "
                f"({holder}); stop it, or give another --folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "port": self.port}).encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlocked (the file stays: removing it would let a third server lock a new file
        while a second still waits on the old one)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    """Who holds a lock file, as its holder wrote it."""
    try:
        held = json.loads(os.pread(fd, 200, 0))
        return f"pid {int(held['pid'])}, port {int(held['port'])}"
    except (OSError, ValueError, TypeError, KeyError):
        return "its pid and port not written yet"


def run_server(pipeline: PipelineConfig, config: ServerConfig) -> int:
    """Serve until stopped; everything a user could get wrong is refused before loading."""
    key = check_server(config)
    try:
        import uvicorn  # noqa: F401 (here: a missing package is said before anything else)

        from heartmula_rt.serve import app  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"serve needs the server's packages ({e.name} is missing): "
            "pip install 'heartmula-rt[serve]'"
        ) from None
    folder = Path(config.service.folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the output folder {folder} ({e.strerror})") from None
    lock = FolderLock(folder, config.port).acquire()  # before the store or a song is touched
    try:
        return _serve(pipeline, config, key, folder)
    finally:
        lock.release()


def _serve(pipeline: PipelineConfig, config: ServerConfig, key: str | None, folder: Path) -> int:
    """`run_server` with the folder locked."""
    import uvicorn

    from heartmula_rt.runtime.loader import load_pipeline
    from heartmula_rt.serve.app import make_app
    from heartmula_rt.serve.jobs import SqliteJobStore
    from heartmula_rt.serve.service import SongService

    _check_port(config.host, config.port)
    pipe = load_pipeline(pipeline)
    service_config = capped(config.service, pipe)
    store = SqliteJobStore(folder / DB_NAME)
    service = SongService(pipe, store, service_config)
    service.start()
    print(
        f"serving {pipeline.model_path or pipeline.synthetic} on {pipe.device}: "
        f"http://{config.host}:{config.port}/ ({service.songs_at_once} songs at once, "
        f"jobs in {folder})",
        file=sys.stderr,
    )
    uvicorn_config = uvicorn.Config(
        make_app(service, api_key=key, allow_hosts=config.allow_hosts),
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    try:
        _server_class()(uvicorn_config).run()
    finally:
        service.close()
        store.close()
    print(
        "stopped: songs in flight kept as interrupted, queued ones for the next start",
        file=sys.stderr,
    )
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but Ctrl-C and SIGTERM only end serving: uvicorn would raise the
        signal again once it has stopped, killing the process before the service can keep
        its songs."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in signals}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def _check_port(host: str, port: int) -> None:
    """Refuse an address that cannot be listened on before the model loads (uvicorn would
    only say so after)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
