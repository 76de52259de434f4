"""The HTTP API of `heartmula-rt serve` (FastAPI), over a `SongBackend` (backend.py): one
pipeline's `SongService`, or the Ray router over replicas.

Routes: `POST /v1/songs`, `GET /v1/songs`, `GET|DELETE /v1/songs/{id}`, `GET
/v1/songs/{id}/audio` (a live WAV while the song is made, the finished file after),
`GET /v1/songs/{id}/events` (server-sent progress), `GET /v1/info`, `GET /health`,
`GET /metrics` (Prometheus text), and the web page at `/` (static/). README says what each
returns. Errors are JSON `{"detail": "one sentence"}`.

No other site drives it (docs/serving-security.md): a keyless server answers only requests
that name it by a loopback host (or one it was told to allow), so a page of another site
whose name has been rebound to 127.0.0.1 gets nothing; a request that changes anything (POST,
DELETE) from a page of another origin is refused; and a body must be declared JSON, which a
cross-site form cannot do without the browser asking first.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from heartmula_rt import __version__
from heartmula_rt.errors import UserError
from heartmula_rt.request import (
    JSON_LORA,
    JSON_SETTINGS,
    JSON_TEXTS,
    CodecParams,
    SamplingParams,
)
from heartmula_rt.runtime.audio import WavStream
from heartmula_rt.serve.backend import (
    AUDIO_FORMATS,
    DEFAULT_FORMAT,
    Conflict,
    QueueFull,
    SongBackend,
)
from heartmula_rt.serve.hosts import host_refusal
from heartmula_rt.serve.jobs import FINAL, Job
from heartmula_rt.serve.references import (
    CLIP_TYPES,
    MAX_CLIP_BYTES,
    ReferenceEmbedder,
    check_range,
)

# A job's request as the API shows it: the fields of a body that makes the same song (an edit's:
# its LM run's, the section or extension; its `edit` says of what).
BODY_FIELDS = (*JSON_TEXTS, *JSON_SETTINGS, *JSON_LORA)
# What /v1/info shows of the backend's own `info()`.
SHOWN = ("model", "device", "engine", "quant", "max_seconds", "songs_at_once")
BODY_FIELDS = (*BODY_FIELDS, "reference")  # a reference clip's embedding and strength
MAX_BODY_BYTES = 64 * 1024  # tags and a long lyric sheet are a few KiB
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}
KEY_COOKIE = "heartmula_rt_key"
STATIC = Path(__file__).with_name("static")
CANCEL_WAIT_S = 30.0  # a cancelled song ends at the engine's next frame boundary
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})  # methods that change the server's state


class SongBody(BaseModel):
    """The body of `POST /v1/songs` (documentation: the service checks it as the CLI does)."""

    tags: str = Field("", description="comma-separated tags, e.g. piano,happy,wedding")
    lyrics: str = Field("", description="the lyrics as text, with [verse], [chorus], … markers")
    seconds: float | None = Field(None, description="the longest the song may be (server's cap)")
    seed: int | None = Field(None, description="random if not given; returned with the job")
    topk: int = SamplingParams.topk
    temperature: float = SamplingParams.temperature
    cfg_scale: float = SamplingParams.cfg_scale
    num_steps: int = CodecParams.num_steps
    guidance_scale: float = CodecParams.guidance_scale
    format: str = Field(DEFAULT_FORMAT, description=f"one of {', '.join(AUDIO_FORMATS)}")
    lora: str | None = Field(None, description="a LoRA adapter the server serves, by name")
    lora_scale: float = Field(1.0, description="its strength: 0 to 2 times its own")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def job_view(job: Job, now: float | None = None) -> dict[str, Any]:
    """A job as the API shows it."""
    now = time.time() if now is None else now
    done = job.state == "done"
    end = job.finished or now
    base = f"/v1/songs/{job.id}"
    return {
        "id": job.id,
        "state": job.state,
        "created_at": job.created,
        "request": {
            **{k: v for k, v in job.request.items() if k in BODY_FIELDS},
            "format": job.format,
        },
        "seed": job.seed,
        "progress": {
            "frames": job.frames,
            "max_frames": job.max_frames,
            "fraction": 1.0 if done else min(1.0, job.frames / job.max_frames),
            "audio_seconds": job.audio_seconds,
        },
        "timings": {
            "queue_wait_s": None if job.started is None else job.started - job.created,
            "time_to_first_audio_s": None
            if job.first_audio is None
            else job.first_audio - job.created,
            "elapsed_s": end - job.created,
            "rtf": None
            if job.started is None or not job.audio_seconds
            else (end - job.started) / job.audio_seconds,
        },
        "error": job.error,
        "edit": job.edit,
        "replica": job.replica,  # the replica that makes it (serve --ray), else None
        "audio": job.audio is not None or job.state in ("queued", "running"),
        "urls": {"self": base, "audio": f"{base}/audio", "events": f"{base}/events"},
    }


def origin_refusal(request: Request) -> str | None:
    """Why a request that changes something is refused as coming from another site's page: its
    Origin (else its Referer's) is given and is not this server's own (the scheme and the Host
    the request names); None if it is the server's own or says none (curl, scripts)."""
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if not referer:
            return None
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    if origin.strip().lower() == own:
        return None
    return f"this server takes changes only from its own page, not from {origin!r}"


def _wav_stream(pieces: Iterator[np.ndarray], sample_rate: int) -> Iterator[bytes]:
    """A 16-bit WAV of unknown length: its header at once, then each piece as it comes."""
    sink = _Chunks()
    wav = WavStream(sink, sample_rate)
    yield sink.take()
    for piece in pieces:
        if piece.shape[1]:
            wav.write(piece)
        # An empty piece too: each step hands control back, so a listener who has gone is
        # noticed within a second, not only when the next audio comes.
        yield sink.take()


class _Chunks:
    """A byte sink that is not seekable (so `WavStream` writes "length unknown")."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def make_app(
    service: SongBackend,
    *,
    api_key: str | None = None,
    allow_hosts: tuple[str, ...] = (),
    references: ReferenceEmbedder | None = None,
) -> FastAPI:
    """The API over `service`; with `api_key`, every route but /health needs it (header
    `Authorization: Bearer KEY` or `X-API-Key: KEY`, query `?key=KEY`, or the cookie the page
    gets when opened with `?key=`). Without one, only requests naming a loopback host or one of
    `allow_hosts` are answered (421). With or without, a POST or DELETE from another origin's
    page is refused (403)."""
    allow_hosts = tuple(name.lower() for name in allow_hosts)
    about = service.info()  # fixed for the app's life: the model, device and limits
    app = FastAPI(
        title="heartmula-rt",
        version=__version__,
        description="Songs from HeartMuLa, heard while they are made.",
    )

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key is None or request.url.path == "/health":
            return await call_next(request)
        auth = request.headers.get("authorization", "")
        given = (
            request.headers.get("x-api-key")
            or (auth[7:] if auth.lower().startswith("bearer ") else None)
            or request.query_params.get("key")
            or request.cookies.get(KEY_COOKIE)
            or ""
        )
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return _error(
                401, "this server needs an API key: give it as 'Authorization: Bearer KEY'"
            )
        response = await call_next(request)
        if request.url.path == "/" and request.query_params.get("key"):
            response.set_cookie(KEY_COOKIE, api_key, httponly=True, samesite="strict")
        return response

    # Added after check_key, so it runs before it: a foreign Host or Origin learns nothing,
    # not even whether a key is needed.
    @app.middleware("http")
    async def check_site(request: Request, call_next: Any) -> Any:
        if api_key is None:
            refused = host_refusal(request.headers.get("host"), allow_hosts)
            if refused is not None:
                return _error(421, refused)
        if request.method in CHANGES:
            refused = origin_refusal(request)
            if refused is not None:
                return _error(403, refused)
        return await call_next(request)

    @app.post(
        "/v1/songs",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SongBody.model_json_schema()}},
            }
        },
        responses={422: {"description": "a bad field, said in one sentence"}, 429: {}},
    )
    async def create_song(request: Request) -> JSONResponse:
        """Queue a song; 202 with the job, its seed and its URLs."""
        return await _queued(request, service.submit)

    async def _queued(request: Request, queue: Any) -> JSONResponse:
        """The JSON body (at most MAX_BODY_BYTES) given to `queue`, its job as a 202."""
        # Declared JSON: a page of another site can send text/plain or a form without asking
        # the browser first, but not application/json.
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            given = repr(media) if media else "none"
            return _error(
                415, f"the body must be JSON with Content-Type application/json, not {given}"
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            fields = json.loads(body)
        except ValueError as e:
            return _error(422, f"the body is not JSON ({e})")
        try:
            job = await run_in_threadpool(queue, fields)
        except LookupError as e:
            return _error(404, f"no song {e.args[0]}")
        except Conflict as e:
            return _error(409, str(e))
        except UserError as e:
            return _error(422, str(e))
        except QueueFull as e:
            return _error(429, str(e), {"Retry-After": str(e.retry_after)})
        view = job_view(job)
        return JSONResponse(view, status_code=202, headers={"Location": view["urls"]["self"]})

    @app.post("/v1/songs/{job_id}/extend", status_code=202)
    async def extend_song(job_id: str, request: Request) -> JSONResponse:
        """A finished song made longer: `{"seconds": S}` and any of tags, lyrics (new ones
        from here on), seed (default: the song's), format; 202 with the new song's job."""
        return await _queued(request, lambda body: service.edit(job_id, "extend", body))

    @app.post("/v1/songs/{job_id}/regen", status_code=202)
    async def regen_song(job_id: str, request: Request) -> JSONResponse:
        """A section of a finished song made again: `{"from": S}` or `{"from": S, "to": E}`
        (seconds; with `to` the section keeps its length and the rest follows) and any of tags,
        lyrics, seed (default: random), format; 202 with the new song's job."""
        return await _queued(request, lambda body: service.edit(job_id, "regen", body))

    clips = references or ReferenceEmbedder()

    @app.post("/v1/references")
    async def create_reference(request: Request, start: float = 0.0, end: float = 30.0) -> Any:
        """A reference clip's bytes (WAV, FLAC, Ogg or MP3, Content-Type audio/… or
        application/octet-stream, at most MAX_CLIP_BYTES) → its MuQ-MuLan embedding for a
        song's `"reference": {"embedding": […], "strength": s}`, of the part `start`-`end`
        seconds (default 0-30, at most MAX_RANGE_SECONDS); cached by the clip's hash."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media not in CLIP_TYPES:
            return _error(415, f"a clip is sent as audio/wav, audio/flac, audio/ogg or "
                               f"audio/mpeg, not {media or 'no Content-Type'}")  # fmt: skip
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_CLIP_BYTES:
            return _error(413, f"the clip is over {MAX_CLIP_BYTES} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_CLIP_BYTES:
                return _error(413, f"the clip is over {MAX_CLIP_BYTES} bytes")
        try:
            seconds = check_range(start, end)
            return await run_in_threadpool(clips.embed, bytes(data), CLIP_TYPES[media], seconds)
        except UserError as e:
            return _error(501 if "pip install" in str(e) else 422, str(e))

    @app.get("/v1/songs")
    def list_songs(limit: int = 50) -> dict[str, Any]:
        """The newest songs first, every state."""
        now = time.time()
        jobs = service.recent(max(1, min(limit, 500)))
        return {"songs": [job_view(j, now) for j in jobs]}

    def _job_or_404(job_id: str) -> Job | JSONResponse:
        job = service.job(job_id)
        return job if job is not None else _error(404, f"no song {job_id}")

    @app.get("/v1/songs/{job_id}")
    def get_song(job_id: str) -> Any:
        job = _job_or_404(job_id)
        return job if isinstance(job, JSONResponse) else job_view(job)

    @app.delete("/v1/songs/{job_id}")
    def cancel_song(job_id: str) -> Any:
        """Cancel a queued or running song; returns once it has ended (its rows are free)."""
        job = _job_or_404(job_id)
        if isinstance(job, JSONResponse):
            return job
        if not service.cancel(job_id):
            return _error(409, f"song {job_id} is already {job.state}")
        deadline = time.monotonic() + CANCEL_WAIT_S
        while (job := service.job(job_id)).state not in FINAL and time.monotonic() < deadline:
            time.sleep(0.02)
        return job_view(job)

    @app.get("/v1/songs/{job_id}/audio", response_model=None)
    def song_audio(job_id: str) -> Any:
        """While queued or running: a WAV of unknown length, the audio so far and then each
        piece as it is made. Once ended: the file in the song's format."""
        job = _job_or_404(job_id)
        if isinstance(job, JSONResponse):
            return job
        live = service.live_audio(job_id)
        if live is not None:
            try:
                pieces = live.listen()
            except FileNotFoundError:  # it ended just now: its file is written
                job = service.job(job_id)
            else:
                return StreamingResponse(
                    _wav_stream(pieces, about["sample_rate"]),
                    media_type=MEDIA_TYPES["wav"],
                    headers={"Cache-Control": "no-store"},
                )
        path = service.audio_path(job)
        if path is None or not path.is_file():
            why = f": {job.error}" if job.error else ""
            return _error(404, f"song {job_id} has no audio ({job.state}{why})")
        return FileResponse(
            path,
            media_type=MEDIA_TYPES[job.format],
            headers={"Content-Disposition": f'inline; filename="song-{job_id}.{job.format}"'},
        )

    @app.get("/v1/songs/{job_id}/events")
    async def song_events(job_id: str, request: Request) -> Any:
        """Server-sent events: `progress` with the job whenever it changes (at least every
        second), then `end` with its final state."""
        job = _job_or_404(job_id)
        if isinstance(job, JSONResponse):
            return job

        async def events() -> Any:
            last, sent = None, 0.0
            while not await request.is_disconnected():
                job = service.job(job_id)
                view = job_view(job)
                key = (job.state, job.frames, job.audio_seconds)
                if key != last or time.monotonic() - sent >= 1.0:
                    kind = "end" if job.state in FINAL else "progress"
                    yield f"event: {kind}\ndata: {json.dumps(view)}\n\n"
                    last, sent = key, time.monotonic()
                    if kind == "end":
                        return
                await asyncio.sleep(0.2)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        """What this server takes: limits, formats and the settings' defaults."""
        return {
            "version": __version__,
            **{k: about[k] for k in SHOWN},
            "formats": list(AUDIO_FORMATS),
            "defaults": SongBody().model_dump(),
            # LoRA adapters served per song (serve --lora NAME=PATH): [{name, scale}].
            "lora": about.get("lora", []),
        }

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return prometheus_text(service)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def prometheus_text(service: SongBackend) -> str:
    """/metrics in Prometheus's text format."""
    stats = service.stats()
    lines = [
        "# HELP heartmula_queue_length Songs waiting for LM rows.",
        "# TYPE heartmula_queue_length gauge",
        f"heartmula_queue_length {stats['queued']}",
        "# HELP heartmula_active_songs Songs being made.",
        "# TYPE heartmula_active_songs gauge",
        f"heartmula_active_songs {stats['running']}",
        "# HELP heartmula_lm_rows LM rows of the batch.",
        "# TYPE heartmula_lm_rows gauge",
        f"heartmula_lm_rows {stats['rows']}",
        "# HELP heartmula_frames_per_second LM frames made per second over the last 10 s.",
        "# TYPE heartmula_frames_per_second gauge",
        f"heartmula_frames_per_second {stats['frames_per_s']:.3f}",
        "# HELP heartmula_songs Songs by state, since the database was made.",
        "# TYPE heartmula_songs gauge",
        *(f'heartmula_songs{{state="{s}"}} {n}' for s, n in stats["jobs"].items()),
    ]
    memory = service.gpu_memory()
    if memory is not None:
        lines += [
            "# HELP heartmula_gpu_memory_bytes GPU memory torch has allocated and reserved.",
            "# TYPE heartmula_gpu_memory_bytes gauge",
            f'heartmula_gpu_memory_bytes{{kind="allocated"}} {memory[0]}',
            f'heartmula_gpu_memory_bytes{{kind="reserved"}} {memory[1]}',
        ]
    return "\n".join(lines) + "\n"
