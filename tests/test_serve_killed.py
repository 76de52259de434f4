"""A server killed with SIGKILL after a song's LM part ended and before its codec started
(issue #31, item 4): the runner saved the song's sidecar as its LM part ended, so on restart the
song is `interrupted` with its frames and can be edited. And a song cancelled before its first
codec window keeps its audio (item 24): its frames are decoded at the cancel."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from heartmula_rt.runtime.codes import SongCodes

pytest.importorskip("fastapi", reason="the server's extra: pip install -e '.[serve]'")
import httpx  # noqa: E402
from serving import WAIT_S, ServerProcess, wait_for  # noqa: E402

HOOKS = Path(__file__).parent / "hooks" / "held_codec"
SAMPLES_PER_FRAME = 3840
SONG = {"tags": "piano,happy", "lyrics": "[verse]\nla la la\n", "topk": 20}


def _held_codec_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "HEARTMULA_RT_TEST_HOLD_CODEC": "1"}


def test_a_song_killed_between_its_lm_and_its_codec_is_kept(tiny_ckpt: Path, tmp_path: Path):
    server = ServerProcess(tiny_ckpt, tmp_path, "--max-seconds", "8", env=_held_codec_env())
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            song = c.post("/v1/songs", json={**SONG, "seconds": 2, "seed": 4, "format": "wav"})
            assert song.status_code == 202, song.text
            job_id = song.json()["id"]
            sidecar = tmp_path / f"{job_id}.codes.safetensors"
            deadline = time.monotonic() + WAIT_S
            while not sidecar.is_file():  # written as the LM part ends (the codec is held)
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            kept = SongCodes.load(sidecar)
            assert kept.ended in ("eos", "length") and kept.frames > 0
            job = c.get(f"/v1/songs/{job_id}").json()
            assert job["progress"]["audio_seconds"] == 0  # the codec never started
    finally:
        server.kill()  # SIGKILL: nothing saved on the way out
    server = ServerProcess(tiny_ckpt, tmp_path, "--max-seconds", "8")
    with server, httpx.Client(base_url=server.url, timeout=60) as c:
        job = c.get(f"/v1/songs/{job_id}").json()
        assert job["state"] == "interrupted", job
        assert job["progress"]["frames"] == kept.frames, job  # not 0
        extended = c.post(f"/v1/songs/{job_id}/extend", json={"seconds": 1})
        assert extended.status_code == 202, extended.text  # not "has no codes to edit"
        done = wait_for(c, extended.json()["id"], ("done", "failed"))
        assert done["state"] == "done", done
        longer = SongCodes.load(tmp_path / f"{done['id']}.codes.safetensors")
        assert torch.equal(longer.codes[:, : kept.frames], kept.codes)  # the kept song's

        # Item 24: cancelled before its first codec window, a song keeps its audio.
        long = c.post("/v1/songs", json={**SONG, "seconds": 8, "seed": 9, "format": "wav"})
        long_id = long.json()["id"]
        wait_for(c, long_id, ("running",))
        cancelled = c.delete(f"/v1/songs/{long_id}")
        assert cancelled.status_code == 200, cancelled.text
        job = wait_for(c, long_id, ("cancelled",))
        audio = c.get(f"/v1/songs/{long_id}/audio")
        assert audio.status_code == 200, audio.text  # not 404 "has no audio (cancelled)"
        frames = SongCodes.load(tmp_path / f"{long_id}.codes.safetensors").frames
        assert sf.info(io.BytesIO(audio.content)).frames == frames * SAMPLES_PER_FRAME


def test_serve_on_ray_takes_the_folder_lock(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys):
    """`serve --ray` on a folder another server holds is refused, as `serve` is, before Ray
    starts (it used to start and share the folder)."""
    ray = pytest.importorskip("ray", reason="the Ray extra: pip install -e '.[ray]'")
    from serving import free_port

    from heartmula_rt import cli
    from heartmula_rt.serve.server import FolderLock

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started on a folder another server holds")

    monkeypatch.setattr(ray, "init", no_ray)
    lock = FolderLock(tmp_path, 1234).acquire()  # another server's
    try:
        args = ["serve", "--model-path", str(tiny_ckpt), "--folder", str(tmp_path), "--ray"]
        code = cli.main([*args, "--port", str(free_port())])
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert code == 2 and "is in use by another heartmula-rt serve (pid" in err, err
