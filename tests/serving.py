"""A real `heartmula-rt serve` process for the server's tests (and the Ray tests'): started as a
user starts it, on one thread, stopped (or killed) for real; and waiting for a song's state."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from heartmula_rt.serve import process
from heartmula_rt.serve.process import free_port

WAIT_S = 180.0  # the longest a test waits for a song to reach a state

__all__ = ["WAIT_S", "ServerProcess", "free_port", "wait_for"]


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...], wait_s=WAIT_S) -> dict:
    """The song's job once it is in one of `states` (polled over the API)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/songs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"song {job_id} never reached {states}: {job}")


class ServerProcess(process.ServerProcess):
    """`heartmula-rt serve --model-path CKPT --folder FOLDER --threads 1 ARGS…` (one OpenMP
    thread too: the tests share two cores)."""

    def __init__(self, ckpt: Path, folder: Path, *args: str, env: dict | None = None) -> None:
        env = {"OMP_NUM_THREADS": "1", **(env or {})}
        super().__init__(ckpt, folder, "--threads", "1", *args, env=env)
