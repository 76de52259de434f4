"""The LM and the codec on two devices, on the CPU: torch's two names of the host, `cpu` and
`cpu:0`, are two devices to a pipeline (the codec apart from the LM, its codes crossing to it
once per window), so the split paths run here. They give the audio one device gives, to the
bit: a song, its stream, and the service's pipeline (the codec on its own thread, decoding each
song's windows while the LM goes on)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import heartmula_rt
from heartmula_rt import SongRequest
from heartmula_rt.errors import UserError
from heartmula_rt.request import request_from_json
from heartmula_rt.runtime.audio import write_audio
from heartmula_rt.runtime.codes import SongCodes

pytest.importorskip("fastapi", reason="the server's extra: pip install -e '.[serve]'")

from heartmula_rt.serve.config import ServiceConfig  # noqa: E402
from heartmula_rt.serve.jobs import SqliteJobStore  # noqa: E402
from heartmula_rt.serve.service import FINAL, SongService  # noqa: E402

WINDOW_FRAMES = 372  # the codec's window: longer songs cross it more than once
WAIT_S = 300.0


@pytest.fixture(scope="module")
def one(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu", threads=1)


@pytest.fixture(scope="module")
def two(tiny_ckpt: Path):
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu", codec_device="cpu:0", threads=1)


def test_two_names_are_two_devices(tiny_ckpt: Path, two) -> None:
    assert (two.config.device, two.config.codec_device) == ("cpu", "cpu:0")
    assert two.codec.flow_matching.cond_feature_emb.weight.device.type == "cpu"
    assert two.config.codec_dtype == "float32"  # the codec's device's default
    # lm_device: the LM's device by the name that pairs with codec_device
    named = heartmula_rt.load_pipeline(tiny_ckpt, lm_device="cpu", codec_device="cpu:0", threads=1)
    assert named.config == two.config
    with pytest.raises(UserError, match="not both"):
        heartmula_rt.load_pipeline(tiny_ckpt, device="cpu", lm_device="cpu")


def test_a_song_and_its_stream_are_the_same_on_two_devices(one, two) -> None:
    # Past the first window (two windows in all), never ending at EOS.
    request = SongRequest.of("piano", "[verse]\nla la", max_seconds=32, seed=2, stop_at_eos=False)
    alone = one.generate(request)
    assert alone.shape[1] > WINDOW_FRAMES * 3840
    assert torch.equal(two.generate(request), alone)
    streamed = np.concatenate(list(two.stream(request)), axis=1)
    assert np.array_equal(streamed, alone.numpy())


def test_the_service_pipeline_on_two_devices(one, two, tmp_path: Path) -> None:
    config = ServiceConfig(tmp_path, songs_at_once=2, max_seconds=32)
    service = SongService(two, SqliteJobStore(tmp_path / "jobs.sqlite3"), config)
    song = {"tags": "piano", "lyrics": "[verse]\nla la", "seconds": 32, "topk": 20}
    # The tiny model's songs of these seeds run to their length, past the first window.
    bodies = [{**song, "seed": seed, "format": "wav"} for seed in (0, 3)]
    service.start()
    try:
        jobs = [service.submit(body) for body in bodies]
        deadline = time.monotonic() + WAIT_S
        while any(service.job(j.id).state not in FINAL for j in jobs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        service.close()
    rows = service.runner.scheduler.rows
    for body, job in zip(bodies, jobs, strict=True):
        done = service.job(job.id)
        assert done.state == "done" and done.frames > WINDOW_FRAMES, done  # decoded while made
        request, _ = request_from_json(body, {}, also=("format",))
        frames = one.generate_frames_batch([request], rows=rows)[0]
        kept = SongCodes.load(tmp_path / f"{job.id}.codes.safetensors", model=one.fingerprint)
        assert torch.equal(kept.codes, frames)
        expected = tmp_path / f"expected-{job.id}.wav"
        write_audio(expected, one.decode_frames(frames, seed=body["seed"]), one.sample_rate)
        assert (tmp_path / done.audio).read_bytes() == expected.read_bytes()
