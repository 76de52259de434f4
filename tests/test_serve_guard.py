"""`heartmula-rt serve` trusts no client (issue #31): every field a request sets is bounded by the
server's limits, a time is a finite number, text is Unicode, an edit obeys the server's caps,
no other site (a foreign Origin, a rebound Host name, a body not declared JSON) drives it, the
length it offers is what the model fits, and one folder has one server. Real HTTP against a
real server process on the tiny checkpoint (a 1024-position context: about 80 s of song)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server's extra: pip install -e '.[serve]'")
from serving import WAIT_S, ServerProcess, wait_for  # noqa: E402

from heartmula_rt.serve.hosts import host_refusal  # noqa: E402

SONG = {"tags": "piano,happy", "lyrics": "[verse]\nla la la\n", "seconds": 0.8, "topk": 20}
JSON = {"content-type": "application/json"}
# The tiny checkpoint's context (1024) less its shortest prompt (12 tokens) and frame 0.
FITS_FRAMES = 1024 - 12 - 1


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """A keyless server with the default --max-seconds (240), which the model cannot fit."""
    process = ServerProcess(tiny_ckpt, tmp_path_factory.mktemp("guard"), "--batch", "1")
    with process.start():  # the pattern that once started a second server (item 20)
        yield process


@pytest.fixture(scope="module")
def finished(server: ServerProcess) -> dict:
    """A song of 1 s, done: the original the edits below are refused for."""
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
        job = c.post("/v1/songs", json={**SONG, "seconds": 1, "seed": 3}).json()
        return wait_for(c, job["id"], ("done",))


def _post(client: httpx.Client, path: str, body: dict | bytes, **headers: str) -> httpx.Response:
    """A JSON body as bytes: \\ud800 escaped as JSON allows, NaN and Infinity as Python writes
    them (httpx's own encoder refuses both)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={**JSON, **headers})


def _refused(answer: httpx.Response, status: int, message: str) -> None:
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert message in detail and "\n" not in detail and "--" not in detail, detail


def test_start_is_not_run_twice(server: ServerProcess) -> None:
    # `with process.start():` ran start() again; the second server failed on the port and the
    # first was never stopped.
    pid = server.process.pid
    with pytest.raises(RuntimeError, match="is running already"):
        server.start()
    assert server.running() and server.process.pid == pid


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_steps", 100_000_000, "num_steps must be at most 64 on this server, not 1e+08"),
        ("guidance_scale", 1e6, "guidance_scale must be at most 20 on this server"),
        ("cfg_scale", 1e6, "cfg_scale must be at most 20 on this server"),
        ("temperature", 1e6, "temperature must be at most 10 on this server"),
        ("topk", 100_000, "topk must be at most 1029 on this server"),  # the audio vocabulary
        ("tags", "piano," * 200, "tags must be at most 1000 characters on this server, not 1200"),
        ("lyrics", "la " * 6000, "lyrics must be at most 16000 characters on this server"),
        ("seed", 2**63, "seed must be an integer in [0, 2**63)"),
    ],
)
def test_every_field_is_bounded(client, field: str, value: object, message: str) -> None:
    # {"num_steps": 100000000} was queued and stalled every song.
    _refused(_post(client, "/v1/songs", {**SONG, field: value}), 422, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"tags": "piano", "seconds": 1e308}', "seconds must be a number of seconds above 0"),
        (b'{"tags": "piano", "seconds": NaN}', "seconds must be a number of seconds above 0"),
        (b'{"tags": "piano", "seconds": -Infinity}', "seconds must be a number of seconds"),
        (json.dumps({"tags": "\ud800"}).encode(), "tags is not valid Unicode text"),
        (json.dumps({"tags": "a", "lyrics": "la \udcff"}).encode(), "lyrics is not valid Unicode"),
    ],
)
def test_times_and_texts(client, body: bytes, message: str) -> None:
    _refused(_post(client, "/v1/songs", body), 422, message)


def test_long_tags_are_named(client) -> None:
    # Tags too long for the context were blamed on the lyrics.
    answer = _post(client, "/v1/songs", {"tags": "日" * 600, "lyrics": "la", "seconds": 1})
    _refused(answer, 422, "the tags are too long: ")
    assert "shorten the tags by at least" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        ("regen", b'{"from": NaN}', "from must be a number of seconds from 0 to 86400, not nan"),
        ("regen", b'{"from": 1e308}', "from must be a number of seconds from 0 to 86400"),
        ("regen", b'{"from": 0.16, "to": Infinity}', "to must be a number of seconds"),
        ("extend", b'{"seconds": 1e308}', "seconds must be a number of seconds above 0"),
        ("extend", b'{"seconds": NaN}', "seconds must be a number of seconds above 0"),
        ("extend", b'{"seconds": 1, "tags": "\\udcff"}', "tags is not valid Unicode text"),
        ("extend", b'{"seconds": 1, "seed": -1}', "seed must be an integer"),
    ],
)
def test_edits_refuse_bad_times_and_texts(client, finished, kind, body, message) -> None:
    _refused(_post(client, f"/v1/songs/{finished['id']}/{kind}", body), 422, message)


def test_an_extension_obeys_the_servers_length(client, finished) -> None:
    # An extension of `seconds` up to the cap made a song of up to twice the cap.
    info = client.get("/v1/info").json()
    answer = _post(client, f"/v1/songs/{finished['id']}/extend", {"seconds": info["max_seconds"]})
    _refused(answer, 422, f"this server makes songs of at most {info['max_seconds']:g} s")
    room = (FITS_FRAMES - (finished["progress"]["frames"] - 1)) * 0.08
    assert f"seconds may add {room:g} s" in answer.json()["detail"]


def test_the_length_offered_is_what_the_model_fits(client) -> None:
    # /v1/info said 240 for this 1024-position model, and the page's first Generate got a 422.
    info = client.get("/v1/info").json()
    assert info["max_seconds"] == pytest.approx(FITS_FRAMES * 0.08)
    longest = _post(client, "/v1/songs", {"tags": "a", "seconds": info["max_seconds"]})
    assert longest.status_code == 202, longest.text
    assert longest.json()["progress"]["max_frames"] == FITS_FRAMES + 1
    assert client.delete(longest.json()["urls"]["self"]).status_code == 200
    _refused(_post(client, "/v1/songs", {**SONG, "seconds": 240}), 422, "at most 80.88 on this")
    # A prompt that leaves less room: the server's sentence, no command-line flag in it.
    many = _post(client, "/v1/songs", {**SONG, "lyrics": "la " * 300, "seconds": 80})
    _refused(many, 422, "with this prompt the longest song that fits is")


def test_no_other_site_drives_it(server: ServerProcess, client) -> None:
    # A page of evil.example could POST text/plain to a keyless loopback server: 202.
    body = json.dumps(SONG)
    plain = client.post("/v1/songs", content=body, headers={"content-type": "text/plain"})
    _refused(plain, 415, "the body must be JSON with Content-Type application/json")
    bare = client.post("/v1/songs", content=body, headers={"content-type": ""})
    _refused(bare, 415, "not none")
    evil = "http://evil.example"
    _refused(_post(client, "/v1/songs", SONG, origin=evil), 403, "only from its own page")
    _refused(_post(client, "/v1/songs", SONG, referer=f"{evil}/x"), 403, "not from 'http://evil")
    _refused(client.delete("/v1/songs/nope", headers={"origin": evil}), 403, "its own page")
    # Its own page, and scripts that say no origin, are served.
    own = _post(client, "/v1/songs", SONG, origin=server.url)
    assert own.status_code == 202, own.text
    assert client.delete(own.json()["urls"]["self"], headers={"origin": server.url}).is_success
    assert client.get("/v1/info", headers={"origin": evil}).status_code == 200  # reads: CORS


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io"])
def test_a_foreign_host_is_refused(server: ServerProcess, client, host: str) -> None:
    # DNS rebinding: evil.example resolved to 127.0.0.1 reached the keyless server as its own.
    host = host.format(port=server.port)
    for answer in (
        client.get("/v1/info", headers={"host": host}),
        _post(client, "/v1/songs", SONG, host=host),
    ):
        _refused(answer, 421, "only requests for 127.0.0.1, localhost, [::1]; this one names")
        assert repr(host) in answer.json()["detail"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:{port}", "[::1]:{port}", "127.0.0.2"])
def test_loopback_hosts_are_served(server: ServerProcess, client, host: str) -> None:
    assert client.get("/v1/info", headers={"host": host.format(port=server.port)}).is_success


def test_allowed_hosts() -> None:
    # `ServerConfig(allow_hosts=...)` (`serve --allow-host NAME`) adds a name; nothing else.
    assert host_refusal("studio.lan:8000", ("studio.lan",)) is None
    assert host_refusal("STUDIO.LAN", ("studio.lan",)) is None
    assert host_refusal("localhost", ()) is None
    assert "this one names the host 'studio.lan:8000'" in host_refusal("studio.lan:8000", ())
    assert host_refusal(None, ()).endswith("this one names no host")
    assert host_refusal("studio.lan:x", ("studio.lan",)) is not None


def test_one_server_per_folder(tiny_ckpt: Path, server: ServerProcess, client) -> None:
    # A second server on the folder marked the first one's running song interrupted at its
    # start; the song then ended `done` with no audio.
    song = client.post("/v1/songs", json={**SONG, "seconds": 3, "seed": 5}).json()
    wait_for(client, song["id"], ("running", "done"))
    second = ServerProcess(tiny_ckpt, server.folder, "--batch", "1")  # its command, run here
    ran = subprocess.run(second.command, env=second.env, capture_output=True, timeout=WAIT_S)
    err = ran.stderr.decode().strip()
    assert ran.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"is in use by another heartmula-rt serve (pid {server.process.pid}, port " in err
    assert f"port {server.port})" in err
    lock = json.loads((server.folder / "server.lock").read_text())
    assert lock == {"pid": server.process.pid, "port": server.port}
    job = wait_for(client, song["id"], ("done", "failed", "interrupted", "cancelled"))
    assert job["state"] == "done" and job["audio"], job
    assert client.get(job["urls"]["audio"]).status_code == 200
    assert (server.folder / f"{job['id']}.codes.safetensors").is_file()
