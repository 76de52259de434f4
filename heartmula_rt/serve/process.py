"""`heartmula-rt serve` as a child process on a free loopback port: started as a user starts it,
ready once `/health` answers, stopped with SIGTERM as a service manager stops it (or killed).
For programs that run a server of their own for a while: the tests, benchmarks/serve_bench.py.
Standard library only (no HTTP client needed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
MAIN = "import sys; from heartmula_rt.cli import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`heartmula-rt serve --model-path MODEL --folder FOLDER --port <free> ARGS…` (the
    environment's variables over `env`), its output in FOLDER/server.log. A context manager:
    started on entry, stopped on exit."""

    def __init__(
        self, model: Path, folder: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # `heartmula-rt` as its console script runs it: `main` of the cli package (which a
        # `python -m` would need a __main__ module for).
        self.command = [sys.executable, "-c", MAIN, "serve", "--model-path"]
        self.command += [str(Path(model).resolve()), "--folder", str(self.folder.resolve())]
        self.command += ["--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        """Start it and return once `/health` answers; RuntimeError with its log if it exits
        or does not answer within `timeout_s` (then it is killed). RuntimeError too if it is
        running already (one object, one server)."""
        if self.running():
            raise RuntimeError(f"the server on port {self.port} is running already")
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not answer in {timeout_s:g} s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        """The end of its output."""
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM (its running songs are kept as interrupted), SIGKILL if it has not exited
        after STOP_TIMEOUT_S; its exit code (None if it was killed or never started)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to save anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def running(self) -> bool:
        """Whether its process has been started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> ServerProcess:
        # `with process.start():` is the same as `with process:`: starting it again would make
        # a second server, fail on the port, and leave the first one running.
        return self if self.running() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
