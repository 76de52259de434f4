"""HeartCodec against the reference outputs (SPEC §5), plus windows, the input guard, the noise
contract, the official key layout and the bf16 path."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heartmula_rt.config import CodecConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.checkpoint import load_codec
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.codec.detokenize import (
    HOP,
    WINDOW,
    extend_codes,
    plan_windows,
    sanitize_codes,
)
from heartmula_rt.model.folder import CODEC_DIR
from heartmula_rt.request import CodecParams

# Same place as conftest's fixtures_dir, needed at collection time to parametrize over the cases.
TINY = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tiny-public"
CODEC_CASES = [
    c
    for c in json.loads((TINY / "expected" / "cases.json").read_text())["cases"]
    if c["kind"] == "codec"
]
FRAMES = 2 * WINDOW  # latent frames per window
SAMPLES_PER_WINDOW = FRAMES * 1920


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def advanced_generator(seed: int, windows: int) -> torch.Generator:
    """A generator advanced exactly as the noise contract says `windows` windows advance it."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(windows):
        torch.randn((1, FRAMES, 256), generator=g, dtype=torch.float32)
    return g


@pytest.fixture(scope="module")
def codec(fixtures_dir: Path) -> HeartCodec:
    return load_codec(fixtures_dir / "tiny-public" / "ckpt" / CODEC_DIR)[0]


@pytest.mark.parametrize("case", CODEC_CASES, ids=lambda c: c["file"])
def test_codec_matches_reference(codec: HeartCodec, fixtures_dir: Path, case: dict) -> None:
    expected = load_file(fixtures_dir / "tiny-public" / "expected" / case["file"])
    codes, seed = expected["codes"], case["noise_seed"]
    params = CodecParams(case["num_steps"], case["guidance_scale"])

    latents = list(
        codec.window_latents(codes, params, generator=torch.Generator().manual_seed(seed))
    )
    assert len(latents) == case["windows"] == expected["latents"].shape[0]
    for got, want in zip(latents, expected["latents"], strict=True):
        assert rel_l2(got[0], want) <= 1e-5

    g = torch.Generator().manual_seed(seed)
    wav = codec.detokenize(codes, params, generator=g)
    assert wav.dtype == torch.float32 and wav.device.type == "cpu"
    assert wav.shape == (2, int(expected["wav_length"]))
    assert rel_l2(wav[:, :: case["wav_stride"]], expected["wav"]) <= 1e-3
    # Noise contract: exactly one randn((1, 744, 256)) per window and nothing else.
    assert torch.equal(g.get_state(), advanced_generator(seed, case["windows"]).get_state())


@pytest.mark.parametrize(
    "num_codes, length, windows",
    [
        (1, WINDOW, 1),
        (150, WINDOW, 1),  # shorter than a window: repeated up to one window
        (WINDOW, WINDOW, 1),
        (WINDOW + 1, 692, 2),
        (424, 692, 2),  # (T − 104) mod 320 == 0: the reference stops at 424 codes, one window
        (744, 1012, 3),  # another case of the same quirk
        (3001, 3252, 10),  # the longest default song (240 s + frame 0)
    ],
)
def test_plan_windows(num_codes: int, length: int, windows: int) -> None:
    assert plan_windows(num_codes) == (length, [HOP * i for i in range(windows)])


def test_windows_cover_every_code() -> None:
    for num_codes in range(1, 4000):
        length, starts = plan_windows(num_codes)
        assert length >= num_codes
        assert starts == list(range(0, starts[-1] + 1, HOP))
        assert starts[-1] + WINDOW == length  # the last window ends exactly at the padded end
        # ...and the decoded audio reaches past the trim.
        assert SAMPLES_PER_WINDOW + (len(starts) - 1) * HOP * 3840 >= num_codes * 3840


def test_extend_codes_is_periodic() -> None:
    codes = torch.arange(8 * 150).view(8, 150)
    out = extend_codes(codes, WINDOW)
    assert out.shape == (8, WINDOW)
    assert torch.equal(out, torch.cat([codes, codes, codes[:, :72]], dim=1))


def test_tail_dropped_by_reference_is_decoded(codec: HeartCodec) -> None:
    num_codes = 424  # (424 − 104) mod 320 == 0: the reference decodes only codes [0, 372)
    codes = torch.randint(0, 1024, (8, num_codes), generator=torch.Generator().manual_seed(0))
    calls: list[tuple[int, int]] = []
    g = torch.Generator().manual_seed(7)
    wav = codec.detokenize(
        codes, CodecParams(num_steps=1), generator=g, on_window=lambda *a: calls.append(a)
    )
    assert calls == [(1, 2), (2, 2)]
    assert wav.shape == (2, num_codes * 3840) and wav.shape[1] > SAMPLES_PER_WINDOW
    assert wav[:, SAMPLES_PER_WINDOW:].abs().amax() > 0  # the last 52 codes are audio, not zeros
    assert torch.equal(g.get_state(), advanced_generator(7, 2).get_state())


def test_sanitize_codes_replaces_stray_ids() -> None:
    codes = torch.tensor(
        [
            [5, 1024, 1030, 7, 1024],  # consecutive strays take the last valid id before them
            [1024, 1025, 3, 4, 5],  # none before: the first valid id after
            [1024, 1024, 1024, 1024, 1024],  # none at all: 0
            [1, 2, 3, 4, 5],
            *[[0, 1, 2, 3, 4]] * 4,
        ]
    )
    original = codes.clone()
    fixed, n = sanitize_codes(codes, 1024)
    assert n == 10
    assert fixed[:3].tolist() == [[5, 5, 5, 7, 7], [3, 3, 3, 4, 5], [0, 0, 0, 0, 0]]
    assert torch.equal(fixed[3:], codes[3:])
    assert torch.equal(codes, original)  # the input is left alone
    clean, n = sanitize_codes(fixed.int(), 1024)
    assert n == 0 and clean.dtype == torch.int64 and torch.equal(clean, fixed)


@pytest.mark.parametrize(
    "codes",
    [
        torch.full((8, 4), -1),
        torch.zeros(8, 4),  # float
        torch.zeros(8, 4, dtype=torch.bool),
        torch.zeros(7, 4, dtype=torch.long),
        torch.zeros(8, dtype=torch.long),
        torch.zeros(1, 8, 4, dtype=torch.long),
        torch.zeros(8, 0, dtype=torch.long),
        [[0] * 4] * 8,
    ],
)
def test_sanitize_codes_rejects_bad_input(codes) -> None:
    with pytest.raises(UserError):
        sanitize_codes(codes, 1024)


def test_stray_ids_decode_like_their_replacement(codec: HeartCodec) -> None:
    codes = torch.randint(0, 1024, (8, 100), generator=torch.Generator().manual_seed(1))
    stray = codes.clone()
    stray[3, 10:14] = 1024 + torch.arange(4)
    stray[0, 0] = 1028
    fixed, n = sanitize_codes(stray, 1024)
    assert n == 5
    latents = [
        next(codec.window_latents(c, CodecParams(1), generator=torch.Generator().manual_seed(2)))
        for c in (stray, fixed)
    ]
    assert torch.equal(latents[0], latents[1])


def _official_layout(keys_tsv: Path) -> dict[str, tuple[int, ...]]:
    """The official full-size keys without unused ones, weight norm folded into `.weight`."""
    unused = re.compile(
        r"flow_matching\.zero_cond_embedding1|flow_matching\.vq_embed\.project_in\..*"
        r"|.*\._codebook\.(initted|cluster_size|embed_avg)|scalar_model\.encoder\..*"
    )
    layout = {}
    for line in keys_tsv.read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        if unused.fullmatch(key) or key.endswith(".original0"):
            continue
        layout[key.replace(".parametrizations.weight.original1", ".weight")] = tuple(
            json.loads(shape)
        )
    return layout


def test_state_dict_is_official_layout(fixtures_dir: Path, codec: HeartCodec) -> None:
    with torch.device("meta"):
        full = HeartCodec(CodecConfig())
    got = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert got == _official_layout(fixtures_dir / "keys" / "HeartCodec-oss.keys.tsv")

    with torch.device("meta"):
        tiny = HeartCodec(codec.config)
    tiny.load_state_dict(codec.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*tiny.parameters(), *tiny.buffers()])


def test_bfloat16_weights(fixtures_dir: Path) -> None:
    codec, _ = load_codec(fixtures_dir / "tiny-public" / "ckpt" / CODEC_DIR, dtype=torch.bfloat16)
    case = CODEC_CASES[0]
    expected = load_file(fixtures_dir / "tiny-public" / "expected" / case["file"])
    g = torch.Generator().manual_seed(case["noise_seed"])
    latents = next(codec.window_latents(expected["codes"], generator=g))
    assert latents.dtype == torch.float32
    assert rel_l2(latents[0], expected["latents"][0]) < 3e-2
    wav = codec.decode_window(latents)
    assert wav.dtype == torch.float32 and wav.shape == (2, SAMPLES_PER_WINDOW)
    assert math.isfinite(wav.abs().max().item())
