"""Reference audio over HTTP (#33): `POST /v1/references` embeds a clip's bytes (bounded, decoded
safely, cached by its hash and range; bad input one sentence), `POST /v1/songs` takes
`"reference": {"embedding": [512], "strength": s}` (bounded), the job and its sidecar keep it,
an edit goes on with it, and the song is the one the Python API makes with that reference.

A real server process on the tiny checkpoint; its embedder is a stand-in for MuQ-MuLan
(tests/hooks/fake_embedder, the FakeMulan of tests/test_reference_wiring.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import heartmula_rt
from heartmula_rt.model import reference as ref
from heartmula_rt.request import Reference, SongRequest
from heartmula_rt.runtime.codes import SongCodes

pytest.importorskip("fastapi", reason="the server's extra: pip install -e '.[serve]'")
import httpx  # noqa: E402
from serving import ServerProcess, wait_for  # noqa: E402
from test_reference_wiring import FakeMulan, embedding  # noqa: E402

HOOKS = Path(__file__).parent / "hooks" / "fake_embedder"
SONG = {"tags": "piano,happy", "lyrics": "[verse]\nla la la\n", "seconds": 0.8, "topk": 20}
SONGS_AT_ONCE = 2


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("serve-ref")
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "HEARTMULA_RT_TEST_FAKE_EMBEDDER": "1",
           "HEARTMULA_RT_TEST_FAKE_EMBEDDER_LOG": str(folder / "embedder.log")}  # fmt: skip
    process = ServerProcess(
        tiny_ckpt, folder, "--batch", str(SONGS_AT_ONCE), "--max-seconds", "4", env=env
    )
    with process:
        yield process


def _wav(seconds: float = 3.0, rate: int = 24000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * 440 * t) * np.linspace(0.2, 1.0, t.shape[0])
    out = io.BytesIO()
    sf.write(out, wave.astype(np.float32), rate, format="WAV")
    return out.getvalue()


def _refused(answer: httpx.Response, status: int, message: str) -> None:
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert message in detail and "\n" not in detail and "/tmp" not in detail, detail


def test_a_clip_is_embedded_once_and_cached(server, client, tmp_path: Path) -> None:
    clip = _wav(4.0)
    wav_type = {"content-type": "audio/wav"}
    first = client.post("/v1/references?start=1&end=3", content=clip, headers=wav_type)
    assert first.status_code == 200, first.text
    got = first.json()
    assert got["seconds"] == [1.0, 3.0] and len(got["embedding"]) == 512
    (tmp_path / "clip.wav").write_bytes(clip)
    expected = ref.embedder_of(FakeMulan()).embed_file(tmp_path / "clip.wav", (1.0, 3.0))
    np.testing.assert_allclose(got["embedding"], expected.numpy(), rtol=0, atol=1e-6)
    again = client.post("/v1/references?start=1&end=3", content=clip, headers=wav_type).json()
    assert again == got
    other = client.post("/v1/references", content=clip, headers=wav_type).json()
    assert other["id"] != got["id"] and other["seconds"] == [0.0, 30.0]
    # Loaded once for all three (kept on the CPU), and the second answer was the cache's.
    assert (server.folder / "embedder.log").read_text().splitlines() == ["cpu"]


def test_bad_clips_are_one_sentence(client) -> None:
    wav = {"content-type": "audio/wav"}
    silent = io.BytesIO()
    sf.write(silent, np.zeros(3 * 24000, np.float32), 24000, format="WAV")
    short = io.BytesIO()
    sf.write(short, 0.5 * np.ones(12000, np.float32), 24000, format="WAV")
    cases = [
        (b"not audio at all", wav, "", 422, "not an audio file"),
        (silent.getvalue(), wav, "", 422, "silent"),
        (short.getvalue(), wav, "", 422, "0.50 s long"),
        (_wav(3.0), wav, "?start=5&end=9", 422, "starts past the end"),
        (_wav(3.0), wav, "?start=0&end=100", 422, "at most 60 s"),
        (_wav(3.0), wav, "?start=2&end=1", 422, "start must come before end"),
        (_wav(3.0), {"content-type": "text/plain"}, "", 415, "audio/wav"),
        (_wav(3.0), {"content-type": "application/json"}, "", 415, "audio/wav"),
    ]
    for data, headers, query, status, message in cases:
        _refused(client.post(f"/v1/references{query}", content=data, headers=headers), status,
                 message)  # fmt: skip
    nan = client.post("/v1/references?start=nan&end=2", content=_wav(), headers=wav)
    assert nan.status_code == 422
    big = b"RIFF" + bytes(16 * 2**20)
    _refused(client.post("/v1/references", content=big, headers=wav), 413, "over")


def test_a_song_with_a_reference_is_the_apis_and_its_edit_keeps_it(
    server, client, tiny_ckpt: Path
) -> None:
    reference = Reference(embedding(1), 0.75)
    body = {**SONG, "seed": 5, "format": "wav", "reference": reference.record()}
    plain = client.post("/v1/songs", json={**SONG, "seed": 5, "format": "wav"})
    job = client.post("/v1/songs", json=body)
    assert job.status_code == 202 and plain.status_code == 202, job.text
    done = wait_for(client, job.json()["id"], ("done", "failed"))
    assert done["state"] == "done", done
    assert done["request"]["reference"] == reference.record()
    pipe = heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")
    request = SongRequest.of(SONG["tags"], SONG["lyrics"], reference=reference, max_seconds=0.8,
                             topk=20, seed=5)  # fmt: skip
    frames = pipe.generate_frames_batch([request], rows=2 * SONGS_AT_ONCE)[0]
    kept = SongCodes.load(server.folder / f"{done['id']}.codes.safetensors")
    assert kept.request == request and torch.equal(kept.codes, frames)
    other = wait_for(client, plain.json()["id"], ("done", "failed"))
    without = SongCodes.load(server.folder / f"{other['id']}.codes.safetensors")
    assert without.request.reference is None
    assert without.codes.shape != kept.codes.shape or not torch.equal(without.codes, kept.codes)
    # an edit of it goes on with its reference
    extended = client.post(f"/v1/songs/{done['id']}/extend", json={"seconds": 0.4})
    assert extended.status_code == 202, extended.text
    ended = wait_for(client, extended.json()["id"], ("done", "failed"))
    edit = SongCodes.load(server.folder / f"{ended['id']}.codes.safetensors")
    assert edit.request.reference == reference


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"embedding": [0.01] * 511, "strength": 1}, "512 numbers"),
        ({"embedding": [0.01] * 512, "strength": 2}, "from 0 to 1"),
        ({"embedding": [1.0] * 512, "strength": 1}, "at most 1.01 on this server"),
        ({"embedding": ["x"] * 512}, "only numbers"),
        ({"strength": 1}, "needs its embedding"),
        ({"embedding": [0.01] * 512, "id": "abc"}, '"embedding": [numbers]'),
        ([0.1] * 512, '"embedding": [numbers]'),
    ],
)
def test_bad_references_in_a_body_are_one_sentence(client, given, message) -> None:
    _refused(client.post("/v1/songs", json={**SONG, "reference": given}), 422, message)
