"""`serve --ray` for real: a local Ray cluster of two nodes on this machine's CPU (2 CPUs each),
the tiny checkpoint in two CPU replicas (one thread each) behind the same HTTP API, all on the
driver's node, driven over real HTTP by httpx: songs spread over both replicas (each job says
which), all busy → 429, cancel, and a replica killed mid-song (its song `interrupted` with its
audio so far, the other replica's songs done, new songs still made). Bounded in time (a few
minutes)."""

from __future__ import annotations

import concurrent.futures
import io
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray extra: pip install -e '.[ray]'")
pytest.importorskip("fastapi", reason="the server's extra: pip install -e '.[serve]'")

import httpx  # noqa: E402
import soundfile as sf  # noqa: E402
from serving import ServerProcess, free_port, wait_for  # noqa: E402

from heartmula_rt import cli  # noqa: E402
from heartmula_rt.runtime.loader import PipelineConfig  # noqa: E402
from heartmula_rt.serve.config import ServerConfig, ServiceConfig  # noqa: E402

# Ray's own pydantic models warn on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SAMPLES_PER_FRAME = 3840
WAIT_S = 120.0
RAY_START_S = 300.0
SONG = {"tags": "piano,happy", "lyrics": "[verse]\nla la la\n", "seconds": 0.8, "topk": 20}
LONG = {**SONG, "seconds": 20}
LONG_SEEDS = (0, 1, 3, 5, 8, 10, 13, 14)  # the tiny model's songs of these seeds run to 20 s


def test_the_command(tiny_ckpt: Path, tmp_path: Path) -> None:
    """`heartmula-rt serve --ray` as a user starts it (first: before this module's own Ray):
    a song made by a replica, and SIGTERM stops it all."""
    process = ServerProcess(
        tiny_ckpt, tmp_path, "--ray", "--replicas", "1", "--batch", "1", "--max-seconds", "4"
    )
    # A local Ray instance, Serve and a replica loading the model: minutes on a loaded machine.
    with process.start(RAY_START_S), httpx.Client(base_url=process.url, timeout=WAIT_S) as c:
        job = c.post("/v1/songs", json={**SONG, "seed": 2, "format": "wav"}).json()
        done = wait_for(c, job["id"], ("done", "failed"), WAIT_S)
        assert done["state"] == "done" and done["replica"].startswith("SERVE_REPLICA::")
        assert check_audio(c, done) == done["progress"]["frames"] * SAMPLES_PER_FRAME
        assert c.get("/v1/info").json()["max_seconds"] == 4
        assert process.stop() == 0, process.log()  # by itself, before STOP_TIMEOUT_S's kill


def test_scale_is_checked_before_anything_starts(tiny_ckpt: Path, capsys) -> None:
    args = ["serve", "--model-path", str(tiny_ckpt), "--ray", "--min-replicas", "3"]
    code = cli.main([*args, "--max-replicas", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-replicas (2) must be at least --min-replicas (3)" in err


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve
    from ray.cluster_utils import Cluster

    from heartmula_rt.serve import ray_app

    folder = tmp_path_factory.mktemp("ray-serve")
    port = free_port()
    # Two nodes: this one (the store's and the folder's) and another with room to spare, which
    # must get none of the application's actors.
    with pytest.MonkeyPatch.context() as env:  # the timeouts `serve --ray` starts Ray with
        for name, value in ray_app.PATIENT_SERVE.items():
            env.setenv(name, value)
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
        )
        cluster.add_node(num_cpus=2)
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}},
    )
    try:
        pipeline = PipelineConfig(model_path=tiny_ckpt, device="cpu", threads=1, max_seconds=60)
        service = ServiceConfig(folder, songs_at_once=2, max_queue=1, max_seconds=60)
        scale = ray_app.ScaleConfig(min_replicas=2, max_replicas=2, num_cpus=1)
        ray_app.start(pipeline, ServerConfig(service, port=port), scale)
        yield f"http://127.0.0.1:{port}", folder
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], timeout=WAIT_S) as c:
        yield c


def check_audio(client: httpx.Client, job: dict) -> int:
    """The song's file: valid, 48 kHz stereo, frames × 3840 samples; its length."""
    answer = client.get(f"/v1/songs/{job['id']}/audio")
    assert answer.status_code == 200, answer.text
    audio, rate = sf.read(io.BytesIO(answer.content), dtype="float32")
    assert rate == 48000 and audio.ndim == 2 and audio.shape[1] == 2
    return audio.shape[0]


def test_songs_spread_over_both_replicas(client) -> None:
    jobs: list[dict] = []
    for seed in range(4):
        answer = client.post("/v1/songs", json={**SONG, "seed": seed, "format": "wav"})
        assert answer.status_code == 202, answer.text
        jobs.append(answer.json())
    done = [wait_for(client, j["id"], ("done", "failed"), WAIT_S) for j in jobs]
    assert [j["state"] for j in done] == ["done"] * 4, done
    replicas = {j["replica"] for j in done}
    assert len(replicas) == 2 and None not in replicas, replicas
    for job in done:
        assert check_audio(client, job) == job["progress"]["frames"] * SAMPLES_PER_FRAME
    listed = {j["id"]: j for j in client.get("/v1/songs").json()["songs"]}
    assert all(listed[j["id"]]["replica"] == j["replica"] for j in done)
    assert "heartmula_songs" in client.get("/metrics").text


def test_every_actor_stays_on_the_machine_of_the_store(client) -> None:
    from ray._private import state  # the actor table with each actor's node (no dashboard)

    here = ray.get_runtime_context().get_node_id()
    assert sum(node["Alive"] for node in ray.nodes()) == 2
    ours = [
        actor
        for actor in state.actors().values()
        if actor["State"] == "ALIVE"
        and actor["ActorClassName"].startswith("ServeReplica:heartmula")
    ]
    kinds = sorted(actor["ActorClassName"].rsplit(":", 1)[1] for actor in ours)
    assert kinds == ["Ingress", "SongReplica", "SongReplica"], kinds
    assert {actor["Address"]["NodeID"] for actor in ours} == {here}


def test_all_busy_429_then_cancel(client) -> None:
    # 2 replicas × (2 rows + a queue of 1): the 7th song at once has no room.
    answers = [client.post("/v1/songs", json={**LONG, "seed": s}) for s in LONG_SEEDS]
    codes = [a.status_code for a in answers]
    accepted = [a.json() for a in answers if a.status_code == 202]
    assert set(codes) == {202, 429}, codes
    assert len(accepted) == 6, codes
    assert all(a.headers.get("retry-after") for a in answers if a.status_code == 429)
    # All at once: one after another, the last songs could end (20 s of the tiny model take the
    # replicas a few seconds) before their DELETE comes.
    with concurrent.futures.ThreadPoolExecutor(len(accepted)) as pool:
        answers = list(pool.map(lambda job: client.delete(f"/v1/songs/{job['id']}"), accepted))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    for job in accepted:
        assert wait_for(client, job["id"], ("cancelled",), 30)["state"] == "cancelled"


def test_killed_replica_interrupts_its_song_others_go_on(client, server) -> None:
    # 60 s: audio comes a codec window (~30 s) at a time; this seed's song runs past the first
    long = client.post("/v1/songs", json={**LONG, "seconds": 60, "seed": 0, "format": "wav"})
    # The next songs go to the other replica, mostly (the long song's has one more ongoing).
    others = [client.post("/v1/songs", json={**SONG, "seed": s, "format": "wav"}) for s in (1, 2)]
    assert [o.status_code for o in (long, *others)] == [202] * 3, [o.text for o in others]
    long = long.json()
    deadline = time.monotonic() + WAIT_S
    while (job := client.get(f"/v1/songs/{long['id']}").json())["progress"]["audio_seconds"] == 0:
        assert time.monotonic() < deadline and job["state"] in ("queued", "running"), job
        time.sleep(0.05)
    victim = job["replica"]
    live: list[bytes] = []

    def listen() -> None:
        with httpx.stream("GET", f"{server[0]}/v1/songs/{long['id']}/audio", timeout=60) as r:
            live.extend(r.iter_bytes())

    listener = threading.Thread(target=listen)
    listener.start()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    ended = wait_for(client, long["id"], ("interrupted", "done", "failed", "cancelled"), 60)
    assert ended["state"] == "interrupted", ended
    assert 0 < ended["progress"]["frames"] < ended["progress"]["max_frames"]
    assert "replica" in ended["error"]
    samples = check_audio(client, ended)  # the audio it had made
    assert samples == round(ended["progress"]["audio_seconds"] * 48000) and samples > 0
    listener.join(30)
    assert not listener.is_alive() and b"".join(live)[:4] == b"RIFF"  # the live stream ended
    assert any(o.json()["replica"] != victim for o in others)
    for other in others:
        final = wait_for(client, other.json()["id"], ("done", "failed", "interrupted"), WAIT_S)
        if final["replica"] == victim:  # ended with the victim, or before it
            assert final["state"] in ("interrupted", "done"), final
            continue
        assert final["state"] == "done", final
        assert check_audio(client, final) == final["progress"]["frames"] * SAMPLES_PER_FRAME
    # The survivor (or the replica Serve starts in the victim's place) still makes songs.
    after = client.post("/v1/songs", json={**SONG, "seed": 11, "format": "wav"})
    assert after.status_code == 202, after.text
    assert wait_for(client, after.json()["id"], ("done",), WAIT_S)["replica"] != victim


def test_killed_replica_queue_goes_to_another(client) -> None:
    """A replica killed with a song in its queue: that song is queued on another replica (the
    same job), the songs it had started are interrupted."""
    from ray import serve

    from heartmula_rt.serve import ray_app

    deadline = time.monotonic() + WAIT_S  # Serve's replica in the last test's victim's place
    app = ray_app.APP_NAME
    while (serve.status().applications[app].deployments[ray_app.REPLICA].replica_states).get(
        "RUNNING", 0
    ) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    jobs: list[dict] = []
    for seed in LONG_SEEDS[:6]:  # 2 replicas × (2 rows + a queue of 1)
        answer = client.post("/v1/songs", json={**LONG, "seed": seed})
        if answer.status_code == 202:
            jobs.append(answer.json())
    by_replica: dict[str, list[dict]] = {}
    for job in jobs:
        by_replica.setdefault(job["replica"], []).append(job)
    victim, held = max(by_replica.items(), key=lambda kv: len(kv[1]))
    assert len(held) == 3, {r: len(j) for r, j in by_replica.items()}
    # its third waits for a row (its first two are running, or about to be)
    queued = held[2]
    assert client.get(f"/v1/songs/{queued['id']}").json()["state"] == "queued"
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    moved = wait_for(client, queued["id"], ("queued", "running", "done"), 60)
    deadline = time.monotonic() + 60
    while (moved := client.get(f"/v1/songs/{queued['id']}").json())["replica"] == victim:
        assert time.monotonic() < deadline and moved["state"] in ("queued", "running"), moved
        time.sleep(0.1)
    assert moved["state"] in ("queued", "running", "done") and moved["error"] is None, moved
    for job in held[:2]:
        assert wait_for(client, job["id"], ("interrupted", "done"), 60)["state"] == "interrupted"
    for job in jobs:  # the rest cancelled, to end the test
        if client.get(f"/v1/songs/{job['id']}").json()["state"] in ("queued", "running"):
            client.delete(f"/v1/songs/{job['id']}")
    for job in jobs:
        assert wait_for(client, job["id"], ("done", "cancelled", "interrupted"), 60)
