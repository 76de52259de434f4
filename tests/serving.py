"""A real `heartmula-rt serve` process on a free loopback port, for the server's tests (and
the web page's): started as a user starts it, stopped (or killed) for real."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 120.0
WAIT_S = 180.0  # the longest a test waits for a song to reach a state


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...], wait_s=WAIT_S) -> dict:
    """The song's job once it is in one of `states` (polled over the API)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/songs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"song {job_id} never reached {states}: {job}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`heartmula-rt serve --model-path CKPT --folder FOLDER --port <free> ARGS…`, its output
    in FOLDER/server.log. `start()` returns once /health answers."""

    def __init__(self, ckpt: Path, folder: Path, *args: str, env: dict | None = None) -> None:
        self.ckpt, self.folder, self.args = ckpt, folder, args
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (the child's)
        command = [sys.executable, "-m", "heartmula_rt.cli", "serve", "--model-path"]
        command += [str(self.ckpt), "--folder", str(self.folder), "--port", str(self.port)]
        command += ["--threads", "1", *self.args]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=self.env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not answer in {START_TIMEOUT_S:g} s:\n{self.log()}")

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM, as a service manager stops it; its exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to save anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
