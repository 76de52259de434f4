"""`heartmula-rt serve` for real: the server started as a user starts it, on a loopback port with
the tiny checkpoint, driven over real HTTP by httpx (bounded in count and time).

Concurrent clients (every job done or refused with 429, none lost, every song's audio valid and
as long as its frames, and the frames those a batch of the server's rows makes through the
Python API), the live stream (equal to the finished file, two listeners, one that leaves),
cancel, a killed server restarted (its song `interrupted` with its audio so far), bad bodies,
the API key, events, metrics."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

import heartmula_rt
from heartmula_rt import cli
from heartmula_rt.request import SongRequest
from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.runtime.codes import SongCodes

pytest.importorskip("fastapi", reason="the server's extra: pip install -e '.[serve]'")
from serving import WAIT_S, ServerProcess, wait_for  # noqa: E402

SAMPLES_PER_FRAME = 3840
SONGS_AT_ONCE = 2
SONG = {"tags": "piano,happy", "lyrics": "[verse]\nla la la\n", "seconds": 0.8, "topk": 20}


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("serve")
    process = ServerProcess(
        tiny_ckpt, folder, "--batch", str(SONGS_AT_ONCE), "--max-queue", "3", "--max-seconds", "4"
    )
    with process:
        yield process


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


def test_concurrent_clients_all_done_or_refused(server, client, pipe, tmp_path: Path) -> None:
    bodies = [{**SONG, "seed": seed, "format": "wav"} for seed in range(8)]
    answers: list[httpx.Response | None] = [None] * len(bodies)

    def post(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            answers[i] = own.post("/v1/songs", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert all(a is not None for a in answers)
    codes = {a.status_code for a in answers}
    assert codes <= {202, 429}, [a.text for a in answers]
    # 2 songs run and 3 wait: a burst of 8 fills the queue before the first song ends.
    assert 202 in codes and 429 in codes
    for a in answers:
        if a.status_code == 429:
            assert int(a.headers["Retry-After"]) >= 1 and "queue is full" in a.json()["detail"]
    accepted = [(b, a.json()) for b, a in zip(bodies, answers, strict=True) if a.status_code == 202]
    listed = {j["id"] for j in client.get("/v1/songs").json()["songs"]}
    rows = 2 * SONGS_AT_ONCE
    for body, job in accepted:
        assert job["id"] in listed  # none lost
        done = wait_for(client, job["id"], ("done", "failed"))
        assert done["state"] == "done", done
        assert done["seed"] == body["seed"]
        audio = client.get(job["urls"]["audio"])
        assert audio.headers["content-type"] == "audio/wav"
        assert int(audio.headers["content-length"]) == len(audio.content)
        wav, rate = sf.read(io.BytesIO(audio.content), dtype="float32")
        assert rate == 48000 and wav.shape == (done["progress"]["frames"] * SAMPLES_PER_FRAME, 2)
        # The song is what the Python API makes in a batch of the server's rows, to the bit.
        request = SongRequest.of(body["tags"], body["lyrics"], max_seconds=0.8, topk=20,
                                 seed=body["seed"])  # fmt: skip
        frames = pipe.generate_frames_batch([request], rows=rows)[0]
        sidecar = server.folder / f"{job['id']}.codes.safetensors"
        kept = SongCodes.load(sidecar, model=pipe.fingerprint)  # the server's checkpoint
        assert kept.request == request and kept.ended in ("eos", "length")
        seed = kept.seed
        assert seed == body["seed"] and torch.equal(kept.codes, frames)
        expected = tmp_path / f"{job['id']}.wav"
        write_audio(expected, pipe.decode_frames(frames, seed=seed), pipe.sample_rate)
        assert audio.content == expected.read_bytes()


def _read_stream(url: str, limit: int | None = None) -> bytes:
    """The live audio of a song, whole, or its first `limit` bytes (then the client leaves)."""
    got = b""
    with httpx.stream("GET", url, timeout=WAIT_S) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
        for chunk in response.iter_bytes():
            got += chunk
            if limit is not None and len(got) >= limit:
                break
    return got


def test_live_stream_equals_the_finished_file(server, client) -> None:
    job = client.post("/v1/songs", json={**SONG, "seconds": 3, "seed": 9, "format": "wav"}).json()
    url = f"{server.url}{job['urls']['audio']}"
    listeners: dict[str, bytes] = {}
    threads = [
        threading.Thread(target=lambda: listeners.__setitem__("first", _read_stream(url))),
        threading.Thread(target=lambda: listeners.__setitem__("second", _read_stream(url))),
        # One that leaves mid-song: the song goes on for the others.
        threading.Thread(target=lambda: listeners.__setitem__("gone", _read_stream(url, 50))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT_S)
    done = wait_for(client, job["id"], ("done", "failed"))
    assert done["state"] == "done", done
    finished = client.get(job["urls"]["audio"]).content
    for name in ("first", "second"):
        live = listeners[name]
        assert live[:4] == b"RIFF" and struct.unpack("<I", live[40:44])[0] == 0xFFFFFFFF - 36
        assert live[44:] == finished[44:]  # the same samples, as they were made
    assert len(listeners["gone"]) >= 50


def test_events_report_progress_to_the_end(server, client) -> None:
    job = client.post("/v1/songs", json={**SONG, "seed": 4}).json()
    kinds, views = [], []
    with httpx.stream("GET", f"{server.url}{job['urls']['events']}", timeout=WAIT_S) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                kinds.append(kind)
                views.append(json.loads(line[6:]))
    assert kinds[-1] == "end" and set(kinds[:-1]) <= {"progress"}
    assert views[-1]["state"] == "done" and views[-1]["progress"]["fraction"] == 1.0
    frames = [v["progress"]["frames"] for v in views]
    assert frames == sorted(frames) and frames[-1] > 0
    finished = client.get(job["urls"]["audio"])  # mp3, the default
    assert finished.headers["content-type"] == "audio/mpeg"
    assert sf.info(io.BytesIO(finished.content)).format == "MP3"


def test_cancel_frees_the_rows(server, client) -> None:
    long = client.post("/v1/songs", json={**SONG, "seconds": 4, "seed": 1}).json()
    wait_for(client, long["id"], ("running",))
    cancelled = client.delete(f"/v1/songs/{long['id']}")
    assert cancelled.status_code == 200, cancelled.text
    job = cancelled.json()
    assert job["state"] == "cancelled" and job["progress"]["frames"] < job["progress"]["max_frames"]
    assert client.delete(f"/v1/songs/{long['id']}").status_code == 409
    metrics = client.get("/metrics").text
    assert "heartmula_active_songs 0" in metrics
    assert 'heartmula_songs{state="cancelled"}' in metrics
    queued = client.post("/v1/songs", json={**SONG, "seed": 2}).json()
    assert wait_for(client, queued["id"], ("done",))["state"] == "done"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 422, "the body is not JSON"),
        (b"[1, 2]", 422, "not a JSON object but list"),
        (json.dumps({**SONG, "top_k": 3}).encode(), 422, "unknown field 'top_k'"),
        (json.dumps({**SONG, "topk": 0}).encode(), 422, "topk must be a whole number"),
        (json.dumps({"tags": " ", "lyrics": ""}).encode(), 422, "tags and lyrics are both empty"),
        (json.dumps({**SONG, "seconds": 60}).encode(), 422, "at most 4 on this server"),
        (json.dumps({**SONG, "format": "mid"}).encode(), 422, "format must be one of"),
        (json.dumps({**SONG, "lyrics": "x" * 70000}).encode(), 413, "the body is over"),
    ],
)
def test_bad_bodies_get_one_sentence(client, body: bytes, status: int, message: str) -> None:
    answer = client.post("/v1/songs", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status and message in answer.json()["detail"], answer.text


def test_unknown_song_and_the_docs(client) -> None:
    assert client.get("/v1/songs/nope").status_code == 404
    assert client.get("/v1/songs/nope/audio").json()["detail"] == "no song nope"
    schema = client.get("/openapi.json").json()
    assert "/v1/songs" in schema["paths"] and "/v1/songs/{job_id}/audio" in schema["paths"]
    assert client.get("/docs").status_code == 200
    info = client.get("/v1/info").json()
    assert info["max_seconds"] == 4 and info["songs_at_once"] == SONGS_AT_ONCE


def test_api_key(tiny_ckpt: Path, tmp_path: Path) -> None:
    key = "s3cret"
    server = ServerProcess(tiny_ckpt, tmp_path, env={"HEARTMULA_RT_API_KEY": key})
    with server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        refused = c.post("/v1/songs", json=SONG)
        assert refused.status_code == 401 and "API key" in refused.json()["detail"]
        assert c.get("/v1/songs", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/songs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/v1/songs", headers={"X-API-Key": key}).status_code == 200
        page = c.get(f"/?key={key}")  # the page's cookie then carries the key
        assert page.status_code == 200 and c.get("/v1/info").status_code == 200


def test_an_open_address_needs_a_key(tmp_path: Path, capsys) -> None:
    code = cli.main(["serve", "--model-path", str(tmp_path / "none"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and "give an API key" in err and len(err.strip().splitlines()) == 1


def test_a_killed_server_keeps_its_songs(tiny_ckpt: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_ckpt, tmp_path, "--max-seconds", "30", "--batch", "1").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            done = c.post("/v1/songs", json={**SONG, "seed": 3, "format": "flac"}).json()
            wait_for(c, done["id"], ("done",))
            long = c.post("/v1/songs", json={**SONG, "seconds": 30, "seed": 5}).json()
            deadline = time.monotonic() + WAIT_S
            while c.get(f"/v1/songs/{long['id']}").json()["progress"]["audio_seconds"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            queued = [c.post("/v1/songs", json={**SONG, "seed": 6}).json()]
    finally:
        server.kill()
    server = ServerProcess(tiny_ckpt, tmp_path, "--max-seconds", "30", "--batch", "1").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            listed = {j["id"]: j for j in c.get("/v1/songs").json()["songs"]}
            assert listed[done["id"]]["state"] == "done"
            finished = c.get(done["urls"]["audio"])
            assert finished.headers["content-type"] == "audio/flac"
            assert sf.info(io.BytesIO(finished.content)).frames > 0
            cut = listed[long["id"]]
            assert cut["state"] == "interrupted"
            assert 0 < cut["progress"]["frames"] < cut["progress"]["max_frames"]
            partial = c.get(long["urls"]["audio"])
            assert partial.status_code == 200, partial.text
            wav, _ = sf.read(io.BytesIO(partial.content))
            assert len(wav) >= SAMPLES_PER_FRAME  # at least the audio it had made
            kept = SongCodes.load(tmp_path / f"{long['id']}.codes.safetensors")
            assert kept.seed == 5 and kept.frames > 0  # its frames, kept as it went
            # The song that was still queued is made after the restart.
            assert wait_for(c, queued[0]["id"], ("done",))["state"] == "done"
            assert np.isfinite(wav).all()
    finally:
        server.stop()


def test_a_stopped_server_keeps_its_song_as_interrupted(tiny_ckpt: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_ckpt, tmp_path, "--max-seconds", "30").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            long = c.post("/v1/songs", json={**SONG, "seconds": 30, "seed": 8}).json()
            wait_for(c, long["id"], ("running",))
    finally:
        assert server.stop() == 0, server.log()  # SIGTERM: a clean stop
    server = ServerProcess(tiny_ckpt, tmp_path, "--max-seconds", "30").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            job = c.get(f"/v1/songs/{long['id']}").json()
            assert job["state"] == "interrupted", job
            assert job["progress"]["frames"] < job["progress"]["max_frames"]
            kept = SongCodes.load(tmp_path / f"{long['id']}.codes.safetensors")
            assert kept.ended == "interrupted"
    finally:
        server.stop()


def test_edits_of_a_finished_song(server, client) -> None:
    original = client.post("/v1/songs", json={**SONG, "seconds": 2, "seed": 12, "format": "wav"})
    first = wait_for(client, original.json()["id"], ("done",))
    base = SongCodes.load(server.folder / f"{first['id']}.codes.safetensors").codes

    extended = client.post(f"/v1/songs/{first['id']}/extend", json={"seconds": 1})
    assert extended.status_code == 202, extended.text
    job = wait_for(client, extended.json()["id"], ("done", "failed"))
    assert job["state"] == "done" and job["edit"]["of"] == first["id"]
    assert job["seed"] == 12  # the song's own seed by default
    longer = SongCodes.load(server.folder / f"{job['id']}.codes.safetensors").codes
    assert torch.equal(longer[:, : base.shape[1]], base)
    wav, _ = sf.read(io.BytesIO(client.get(job["urls"]["audio"]).content))
    assert len(wav) == longer.shape[1] * SAMPLES_PER_FRAME

    regen = client.post(f"/v1/songs/{first['id']}/regen", json={"from": 0.8, "to": 1.6, "seed": 5})
    assert regen.status_code == 202, regen.text
    job = wait_for(client, regen.json()["id"], ("done", "failed"))
    assert job["state"] == "done" and job["progress"]["frames"] == base.shape[1]
    take = SongCodes.load(server.folder / f"{job['id']}.codes.safetensors").codes
    assert take.shape == base.shape
    assert torch.equal(take[:, :10], base[:, :10]) and torch.equal(take[:, 20:], base[:, 20:])
    assert not torch.equal(take[:, 10:20], base[:, 10:20])

    assert client.post("/v1/songs/nope/regen", json={"from": 1}).status_code == 404
    outside = client.post(f"/v1/songs/{first['id']}/regen", json={"from": 9})
    assert outside.status_code == 422 and "outside the song" in outside.json()["detail"]
    unknown = client.post(f"/v1/songs/{first['id']}/extend", json={"seconds": 1, "x": 1})
    assert unknown.status_code == 422 and "unknown field 'x'" in unknown.json()["detail"]
    running = client.post("/v1/songs", json={**SONG, "seconds": 4, "seed": 13}).json()
    busy = client.post(f"/v1/songs/{running['id']}/extend", json={"seconds": 1})
    assert busy.status_code == 409 and "edit it once it has ended" in busy.json()["detail"]
    wait_for(client, running["id"], ("done",))


def test_defaults_and_a_request_sent_back(client) -> None:
    job = client.post("/v1/songs", json={"tags": "piano", "seconds": None, "seed": 2})
    assert job.status_code == 202, job.text  # no length: the server's longest
    assert job.json()["request"]["seconds"] == 4
    again = client.post("/v1/songs", json=job.json()["request"])  # the same song, asked again
    assert again.status_code == 202, again.text
    assert again.json()["request"] == job.json()["request"]
    for view in (job.json(), again.json()):
        client.delete(view["urls"]["self"])


def test_a_full_queue_counts_only_songs_beyond_free_rows(pipe, tmp_path: Path) -> None:
    """Songs posted to free rows are not in the queue, however long the runner takes to take
    them (here: never, it is not started): rows + max_queue songs are accepted, then 429."""
    from heartmula_rt.serve.backend import QueueFull
    from heartmula_rt.serve.config import ServiceConfig
    from heartmula_rt.serve.jobs import SqliteJobStore
    from heartmula_rt.serve.service import SongService

    config = ServiceConfig(tmp_path, songs_at_once=2, max_queue=1, max_seconds=4)
    service = SongService(pipe, SqliteJobStore(tmp_path / "jobs.sqlite3"), config)
    try:
        jobs = [service.submit({**SONG, "seed": seed}) for seed in range(3)]
        assert [j.state for j in jobs] == ["queued"] * 3
        with pytest.raises(QueueFull, match="queue is full"):
            service.submit({**SONG, "seed": 3})
    finally:
        service.close()
