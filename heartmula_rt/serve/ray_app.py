"""`heartmula-rt serve --ray`: the same HTTP API as `serve`, over N model replicas in Ray Serve.

Two deployments (this module is the only one that imports ray: `pip install '.[ray]'`):

- `SongReplica`, N of them (one per GPU with `num_gpus=1`, or CPU replicas): each loads its own
  pipeline and runs its own `SongService` (its batching scheduler), over the ONE job store and
  the ONE output folder every replica and the ingress share. A song is one streaming call,
  `make`: its first item is the job (or an error, said as an HTTP status), then the job each
  time it changes, until it ends. So a replica's ongoing requests are its songs, queued and
  running: Serve's router sends a new song to the replica with the fewest (power of two
  choices), never to one at `max_ongoing_requests` (its rows and its queue), and the autoscaler
  adds replicas (up to `max_replicas`) while songs wait beyond the rows (target: a replica's
  rows' worth of songs), and takes them away when idle (down to `min_replicas`).
- `Ingress` (one, CPU only): `app.make_app` over `ReplicaRouter`, an object with the
  service's methods, so the API is defined once. New songs and edits go to a replica; every
  read (a job, the list, the finished file) is served from the store and the folder; a song's
  live audio is its growing `.pcm` file, read here as it grows (the replicas are on this
  machine); cancel cancels the song's call, which the replica turns into `SongService.cancel`.

Faults: when a replica dies, every one of its songs' calls fails here; each song it had
started is then written as `interrupted` (`live.write_final`: the audio so far made its
file; its sidecar, saved every window, has its frames), each it still had queued goes to
another replica (`SongService.adopt`), and the other replicas go on. Serve starts a new replica
in its place. Songs are refused with 429 when every replica's queue is full.

One machine: the store is `FOLDER/jobs.sqlite3` (SQLite, WAL: several processes may write it),
so every actor is placed on the machine that runs `serve --ray`, even in a cluster of several.
Using the others needs a `JobStore` over a database server (PostgreSQL: jobs.py) and the folder
on shared storage (NFS, or replicas streaming their audio through Ray).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from heartmula_rt.config import DEFAULT_SONGS_AT_ONCE
from heartmula_rt.errors import UserError
from heartmula_rt.serve.backend import Conflict, QueueFull, RateMeter
from heartmula_rt.serve.config import ScaleConfig, ServerConfig, ServiceConfig
from heartmula_rt.serve.jobs import FINAL, Job, SqliteJobStore
from heartmula_rt.serve.live import listen_pcm, write_final
from heartmula_rt.serve.server import DB_NAME, FolderLock, capped, check_server

if TYPE_CHECKING:
    from heartmula_rt.runtime.loader import PipelineConfig

APP_NAME = "heartmula-rt"
REPLICA = "SongReplica"
POLL_S = 0.2  # how often a replica looks at its songs' progress, and a listener at a .pcm
CANCEL_WAIT_S = 30.0
ADOPT_TRIES = 5  # a dead replica's queued song offered to the others this many times
# Calls beyond a replica's songs that it also answers (info) at once.
SPARE_CALLS = 2
HANDLE_QUEUE = 64
# Serve gives its HTTP proxy 5 s to start and 10 s to answer a health check, then kills it: too
# little on a busy machine (a model loading, kernels compiling, other replicas' first songs).
# The Ray instance `serve --ray` starts itself, and the processes it starts, get these instead.
PATIENT_SERVE = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}
REPLICA_HEALTH_CHECK_S = 120  # a replica busy with songs answers late, not never


class _ReplicaStore:
    """The shared store as one replica's `SongService` sees it: the jobs it adds are marked
    as its own, and its start recovers only its own (never another live replica's songs)."""

    def __init__(self, store: SqliteJobStore, replica: str) -> None:
        self._store, self.replica = store, replica

    def add(self, job: Job) -> None:
        job.replica = self.replica
        self._store.add(job)

    def in_states(self, *states: str) -> list[Job]:
        return [j for j in self._store.in_states(*states) if j.replica == self.replica]

    def __getattr__(self, name: str) -> Any:  # update, get, recent, counts, close
        return getattr(self._store, name)


def _error(status: int, detail: str, retry_after: int | None = None) -> dict[str, Any]:
    return {"status": status, "detail": detail, "retry_after": retry_after}


@serve.deployment(
    name=REPLICA, graceful_shutdown_timeout_s=5, health_check_timeout_s=REPLICA_HEALTH_CHECK_S
)
class SongReplica:
    """One pipeline and its `SongService`, making the songs the router sends it."""

    def __init__(self, pipeline: PipelineConfig | Callable[[], PipelineConfig], service: Any):
        from heartmula_rt.runtime.loader import load_pipeline
        from heartmula_rt.serve.service import SongService

        self.id = serve.get_replica_context().replica_id.to_full_id_str()
        config = pipeline() if callable(pipeline) else pipeline
        folder = Path(service.folder)
        self.pipe = load_pipeline(config)
        service = capped(service, self.pipe)  # as the local server caps it
        self.store = SqliteJobStore(folder / DB_NAME)
        self.service = SongService(self.pipe, _ReplicaStore(self.store, self.id), service)
        self.service.start()

    def info(self) -> dict[str, Any]:
        return {"replica": self.id, **self.service.info()}

    async def make(self, kind: str, body: Any, of: str | None = None) -> Any:
        """A song (`kind` submit), an edit of song `of`, or (`adopt`) song `of` that a dead
        replica left queued: its job, then its job whenever it changes, to its end; a refusal
        is one item, `_error`'s dict."""
        service = self.service
        try:
            if kind == "submit":
                job = await asyncio.to_thread(service.submit, body)
            elif kind == "adopt":
                job = await asyncio.to_thread(self._adopt, of)
            else:
                job = await asyncio.to_thread(service.edit, of, kind, body)
        except LookupError as e:
            yield _error(404, str(e.args[0]))
            return
        except Conflict as e:
            yield _error(409, str(e))
            return
        except UserError as e:
            yield _error(422, str(e))
            return
        except QueueFull as e:
            yield _error(429, str(e), e.retry_after)
            return
        last = None
        try:
            while True:
                now = service.job(job.id) or job
                key = (now.state, now.frames, now.audio_seconds, now.first_audio)
                if key != last:
                    yield dataclasses.replace(now)
                    last = key
                if now.state in FINAL:
                    return
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:  # the client cancelled it (DELETE)
            service.cancel(job.id)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while (service.job(job.id) or job).state not in FINAL:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            raise

    def _adopt(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None or job.state != "queued":
            raise Conflict(f"song {job_id} is not queued")
        job.replica = self.id
        self.store.update(job_id, replica=self.id)
        self.service.adopt(job)
        return job

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


class _Live:
    """A song in flight on a replica, as the ingress follows it."""

    def __init__(self, job: Job, call: Any) -> None:
        self.job, self.call = job, call
        self.cancelled = False


class _PcmTail:
    """A song's `.pcm` file as its replica writes it in the shared folder (`listen_pcm`)."""

    def __init__(self, path: Path, ended: Callable[[], bool]) -> None:
        self.path, self.ended = path, ended

    def listen(self) -> Iterator[np.ndarray]:
        return listen_pcm(self.path, self.ended, lambda _read: time.sleep(POLL_S))


class ReplicaRouter:
    """What `make_app` needs of a `SongService`, over the replicas: songs to them, reads from
    the shared store and folder."""

    def __init__(self, replicas: Any, service: ServiceConfig, info: dict[str, Any]) -> None:
        self.replicas = replicas
        self.config = service
        self.folder = Path(service.folder)
        self.store = SqliteJobStore(self.folder / DB_NAME)
        if info.get("max_seconds", service.max_seconds) < service.max_seconds:
            service = dataclasses.replace(service, max_seconds=info["max_seconds"])  # its cap
            self.config = service
        self._info = {
            **info,
            "device": f"{info['device']} (Ray Serve replicas)",
            "max_seconds": service.max_seconds,
        }
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self.rate = RateMeter()
        self.recover()

    # -- what app.py calls (backend.SongBackend) -------------------------------------------

    def info(self) -> dict[str, Any]:
        return self._info

    def recent(self, limit: int) -> list[Job]:
        return [self.job(j.id) or j for j in self.store.recent(limit)]

    def submit(self, body: object) -> Job:
        return self._make("submit", body)

    def edit(self, job_id: str, kind: str, body: object) -> Job:
        return self._make(kind, body, job_id)

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            live = self._live.get(job_id)
            if live is None or live.job.state in FINAL:
                return False
            live.cancelled = True
        live.call.cancel()
        return True

    def job(self, job_id: str) -> Job | None:
        live = self._live.get(job_id)
        return live.job if live is not None else self.store.get(job_id)

    def live_audio(self, job_id: str) -> _PcmTail | None:
        job = self.job(job_id)
        if job is None or job.state in FINAL:
            return None
        return _PcmTail(self.folder / f"{job_id}.pcm", lambda: self._ended(job_id))

    def _ended(self, job_id: str) -> bool:
        return (job := self.job(job_id)) is None or job.state in FINAL

    def audio_path(self, job: Job) -> Path | None:
        return None if job.audio is None else self.folder / job.audio

    def stats(self) -> dict[str, Any]:
        with self._lock:
            songs = [live.job for live in self._live.values()]
        return {
            "queued": sum(j.state == "queued" for j in songs),
            "running": sum(j.state == "running" for j in songs),
            "frames_per_s": self.rate.per_second(),
            "jobs": self.store.counts(),
            "rows": self._info["rows"] * max(1, len(_replica_names())),
        }

    def gpu_memory(self) -> None:
        return None  # each replica's own; not summed here

    # -- songs on replicas -------------------------------------------------------------------

    def _make(self, kind: str, body: object, of: str | None = None) -> Job:
        """Send a song to a replica; a full one (a race with the router's view) or one that
        dies before the song is queued: the next. QueueFull when every try was refused."""
        refused: QueueFull | None = None
        for _ in range(3):
            call = self.replicas.options(stream=True).make.remote(kind, body, of)
            try:
                first = next(call)
            except BackPressureError as e:
                raise QueueFull(max(1, int(e.retry_after_s or 1))) from None
            except RayActorError:
                continue
            if isinstance(first, dict):
                status, detail = first["status"], first["detail"]
                if status == 429:
                    refused = QueueFull(first["retry_after"] or 1)
                    continue
                raise {404: LookupError, 409: Conflict}.get(status, UserError)(detail)
            with self._lock:
                self._live[first.id] = live = _Live(first, call)
            threading.Thread(
                target=self._follow, args=(live,), name=f"song {first.id}", daemon=True
            ).start()
            return first
        raise refused or QueueFull(5)

    def _follow(self, live: _Live) -> None:
        """Keep a song's job as its replica reports it, to its end. If the replica dies first,
        a song it had started is written as interrupted with what it had; one still in its
        queue goes to another replica."""
        job_id = live.job.id
        try:
            while True:
                try:
                    for job in live.call:
                        self.rate.add(max(0, job.frames - live.job.frames))
                        live.job = job
                    return
                except (Exception, asyncio.CancelledError) as e:  # the replica is gone
                    if live.cancelled:
                        self._wait_final(job_id)
                        return
                    why = f"its replica stopped ({type(e).__name__})"
                if not self._adopt(live):
                    self.interrupt(job_id, why)
                    return
        finally:
            with self._lock:
                self._live.pop(job_id, None)

    def _adopt(self, live: _Live) -> bool:
        """A song that its dead replica had not started, queued on another; False if it had
        started (or no replica takes it)."""
        for attempt in range(ADOPT_TRIES):
            job = self.store.get(live.job.id)
            if job is None or job.state != "queued" or live.cancelled:
                return False
            call = self.replicas.options(stream=True).make.remote("adopt", None, job.id)
            try:
                first = next(call)
            except (Exception, asyncio.CancelledError):  # the dead one again, before Serve knows
                time.sleep(0.5 * (attempt + 1))
                continue
            if isinstance(first, dict):
                return False
            live.job, live.call = first, call
            return True
        return False

    def _wait_final(self, job_id: str) -> None:
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            job = self.store.get(job_id)
            if job is None or job.state in FINAL:
                return
            time.sleep(0.05)
        self.interrupt(job_id, "its replica did not end it when cancelled")

    def interrupt(self, job_id: str, why: str) -> None:
        """A song whose replica has gone, kept as `interrupted`: its audio so far made its file
        (its frames and sidecar are those of its last window)."""
        job = self.store.get(job_id)
        if job is not None and job.state not in FINAL:
            write_final(self.store, self.folder, job, "interrupted", self._info["sample_rate"], why)

    def recover(self) -> None:
        """Songs left by replicas that are gone (a cluster stopped or killed): those running
        interrupted, their audio so far kept; those queued queued again on a replica."""
        alive = set(_replica_names())
        for job in self.store.in_states("queued", "running"):
            if job.id in self._live or job.replica in alive:
                continue
            live = _Live(job, None)
            if job.state == "queued" and self._adopt(live):
                with self._lock:
                    self._live[job.id] = live
                threading.Thread(target=self._follow, args=(live,), daemon=True).start()
            else:
                self.interrupt(job.id, "its replica stopped")


def _replica_names() -> list[str]:
    """The actor names of the replicas now alive."""
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    except Exception:  # noqa: BLE001
        return []
    return [
        a["name"]
        for a in actors
        if a.get("namespace") == "serve" and f"#{REPLICA}#" in a.get("name", "")
    ]


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API (`app.make_app`) over `ReplicaRouter`."""

    def __init__(
        self,
        replicas: Any,
        service: ServiceConfig,
        api_key: str | None,
        allow_hosts: tuple[str, ...] = (),
    ) -> None:
        self._replicas, self._service, self._api_key = replicas, service, api_key
        self._allow_hosts = tuple(allow_hosts)

    async def __serve_build_asgi_app__(self) -> Any:
        from heartmula_rt.serve.app import make_app

        info = await self._replicas.info.remote()
        router = await asyncio.to_thread(ReplicaRouter, self._replicas, self._service, info)
        self.router = router
        return make_app(  # type: ignore[arg-type]
            router, api_key=self._api_key, allow_hosts=self._allow_hosts
        )

    def sample_rate(self) -> int:
        return self.router.info()["sample_rate"]


def interrupt_running(folder: Path, sample_rate: int) -> None:
    """Once every replica has stopped: the songs they were making kept as `interrupted`, with
    their audio so far (as `serve` keeps its own when stopped); queued ones stay queued, for
    the next start's replicas."""
    store = SqliteJobStore(Path(folder) / DB_NAME)
    try:
        for job in store.in_states("running"):
            write_final(store, Path(folder), job, "interrupted", sample_rate, "the server stopped")
    finally:
        store.close()


def build_app(
    pipeline: PipelineConfig | Callable[[], PipelineConfig],
    service: ServiceConfig,
    scale: ScaleConfig,
    api_key: str | None = None,
    allow_hosts: tuple[str, ...] = (),
) -> Any:
    """The Serve application: `scale`'s replicas of `pipeline`, behind the ingress, all on
    this machine (the one whose folder holds the store and the songs' files); `allow_hosts`
    as the local server's (`serve --allow-host`)."""
    scale.check()
    songs = service.songs_at_once or DEFAULT_SONGS_AT_ONCE
    # Every Ray node is labelled with its id: this one's keeps every actor here, whatever
    # other machines the cluster has.
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    replicas = SongReplica.options(
        autoscaling_config={
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "initial_replicas": scale.initial_replicas or scale.min_replicas,
            # a replica's ongoing calls are its songs: more than its rows means a queue
            "target_ongoing_requests": songs,
            "upscale_delay_s": scale.upscale_delay_s,
            "downscale_delay_s": scale.downscale_delay_s,
        },
        max_ongoing_requests=songs + service.max_queue + SPARE_CALLS,
        # Calls waiting in the ingress for a replica under max_ongoing_requests, then 429
        # (rare: a full replica answers 429 itself, at once). Not too few: Serve counts calls
        # being assigned as waiting, so a burst of clients would be refused with room left.
        max_queued_requests=HANDLE_QUEUE,
        ray_actor_options={
            "num_cpus": scale.num_cpus,
            "num_gpus": scale.num_gpus,
            "label_selector": here,
        },
    ).bind(pipeline, service)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, "label_selector": here})
    return ingress.bind(replicas, service, api_key, tuple(allow_hosts))


def start(
    pipeline: PipelineConfig | Callable[[], PipelineConfig],
    server: ServerConfig,
    scale: ScaleConfig,
    *,
    api_key: str | None = None,
) -> Any:
    """Serve on the Ray instance this process is connected to (`ray.init` first); returns the
    ingress's handle once the application is running."""
    Path(server.service.folder).mkdir(parents=True, exist_ok=True)
    serve.start(http_options={"host": server.host, "port": server.port})
    app = build_app(pipeline, server.service, scale, api_key, server.allow_hosts)
    return serve.run(app, name=APP_NAME, route_prefix="/")


def patient_serve() -> None:
    """`PATIENT_SERVE` in this process's environment (unless set), for the Ray it starts."""
    for name, value in PATIENT_SERVE.items():
        os.environ.setdefault(name, value)


def run_ray_server(
    pipeline: PipelineConfig | Callable[[], PipelineConfig],
    config: ServerConfig,
    scale: ScaleConfig,
    address: str | None = None,
) -> int:
    """`heartmula-rt serve --ray`: a local Ray (or the cluster at `address`), the application
    on it, until Ctrl-C or SIGTERM."""
    key = check_server(config)
    scale.check()
    folder = Path(config.service.folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the output folder {folder} ({e.strerror})") from None
    # One server per folder, as the local server: held until every replica has stopped.
    lock = FolderLock(folder, config.port).acquire()
    try:
        return _run_ray_server(pipeline, config, scale, address, key)
    finally:
        lock.release()


def _run_ray_server(
    pipeline: PipelineConfig | Callable[[], PipelineConfig],
    config: ServerConfig,
    scale: ScaleConfig,
    address: str | None,
    key: str | None,
) -> int:
    """`run_ray_server` with the folder locked."""
    if address is None:
        patient_serve()
    # "local": a new Ray instance of this machine, never one that happens to be running
    ray.init(address=address or "local", namespace=APP_NAME, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rate = None
    try:
        ingress = start(pipeline, config, scale, api_key=key)
        rate = ingress.sample_rate.remote().result()
        print(
            f"serving on Ray: http://{config.host}:{config.port}/ ({scale.min_replicas}–"
            f"{scale.max_replicas} replicas, jobs in {config.service.folder})",
            file=sys.stderr,
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        if rate is not None:
            interrupt_running(config.service.folder, rate)
    print(
        "stopped: songs in flight kept as interrupted, queued ones for the next start",
        file=sys.stderr,
    )
    return 0
