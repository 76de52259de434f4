"""`heartmula-rt serve`: load one pipeline, start its `SongService`, and serve the API with
uvicorn until Ctrl-C or SIGTERM (songs then running are kept as `interrupted`)."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from heartmula_rt.config import API_KEY_ENV
from heartmula_rt.errors import UserError
from heartmula_rt.request import check_songs

if TYPE_CHECKING:
    from heartmula_rt.runtime.pipeline import PipelineConfig
    from heartmula_rt.serve.service import ServiceConfig

DB_NAME = "jobs.sqlite3"


@dataclass(frozen=True)
class ServerConfig:
    """Where the API listens and who may use it, and the service behind it."""

    service: ServiceConfig
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: $HEARTMULA_RT_API_KEY, if set


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    return key


def run_server(pipeline: PipelineConfig, config: ServerConfig) -> int:
    """Serve until stopped; everything a user could get wrong is refused before loading."""
    key = check_server(config)
    try:
        import uvicorn

        from heartmula_rt.serve.app import make_app
    except ImportError as e:
        raise UserError(
            f"serve needs the server's packages ({e.name} is missing): "
            "pip install 'heartmula-rt[serve]'"
        ) from None
    from heartmula_rt.runtime.pipeline import load_pipeline
    from heartmula_rt.serve.jobs import SqliteJobStore
    from heartmula_rt.serve.service import SongService

    folder = Path(config.service.folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the output folder {folder} ({e.strerror})") from None
    _check_port(config.host, config.port)
    pipe = load_pipeline(pipeline)
    store = SqliteJobStore(folder / DB_NAME)
    service = SongService(pipe, store, config.service)
    service.start()
    print(
        f"serving {pipeline.model_path or pipeline.synthetic} on {pipe.device}: "
        f"http://{config.host}:{config.port}/ ({service.songs_at_once} songs at once, "
        f"jobs in {folder})",
        file=sys.stderr,
    )
    uvicorn_config = uvicorn.Config(
        make_app(service, api_key=key),
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
