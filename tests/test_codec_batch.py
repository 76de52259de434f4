"""Several songs' windows through the codec together (`HeartCodec.detokenize_many`,
`Pipeline.decode_frames_batch`) against each song decoded alone, bit for bit, on the tiny
fixture: rounds, per-row prefixes and guidance scales, songs of different num_steps, the noise
contract per song and the input checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import heartmula_rt
from heartmula_rt.config import LATENTS_PER_CODE
from heartmula_rt.errors import UserError
from heartmula_rt.model.checkpoint import load_codec
from heartmula_rt.model.codec.detokenize import OVERLAP, WINDOW, plan_windows
from heartmula_rt.model.codec.dit import FlowMatching
from heartmula_rt.model.codec.scalar import ScalarModel
from heartmula_rt.model.folder import CODEC_DIR
from heartmula_rt.request import CodecParams
from heartmula_rt.runtime.pipeline import Pipeline

SAMPLES_PER_CODE = 3840
PREFIX = LATENTS_PER_CODE * OVERLAP  # latent frames a window after a song's first starts from
# Shorter than a window (with stray ids), one code into a second window, three windows. Few
# ODE steps: the scalar decoder's time per window is the same whatever the steps.
LENGTHS = [200, WINDOW + 1, 2 * WINDOW - 51]
PARAMS = [CodecParams(1, 1.25), CodecParams(2, 3.0), CodecParams(2, 0.5)]
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path) -> Pipeline:
    return heartmula_rt.load_pipeline(tiny_ckpt, device="cpu")


@pytest.fixture(autouse=True)
def pipeline_threads(pipe: Pipeline) -> None:
    """Every decode here on the pipeline's thread count: float32 sums split across another
    count may round differently."""
    torch.set_num_threads(pipe.threads)


@pytest.fixture(scope="module")
def codes() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    songs = [torch.randint(0, 1024, (8, n), generator=g) for n in LENGTHS]
    songs[0][3, 10:20] = 1024 + torch.arange(10)  # stray ids ≥ the codebook size
    return songs


@pytest.fixture(scope="module")
def alone(pipe: Pipeline, codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each song decoded by itself, as `decode_frames` does."""
    torch.set_num_threads(pipe.threads)
    return [pipe.decode_frames(c, p, seed=s) for c, p, s in zip(codes, PARAMS, SEEDS, strict=True)]


def windows(num_codes: int) -> int:
    return len(plan_windows(num_codes)[1])


@pytest.mark.parametrize(
    "songs, rounds, sample_calls",
    [
        # Each round: the next window of the first `songs` songs with windows left.
        (
            2,
            [[0, 1], [1, 2], [2], [2]],
            # (num_steps, each row's prefix, each row's guidance): songs 0 and 1 differ in
            # num_steps, so round 1 is two calls; round 2 shares one, song 1 at its second
            # window and song 2 at its first.
            [
                (1, [0], [1.25]),
                (2, [0], [3.0]),
                (2, [PREFIX, 0], [3.0, 0.5]),
                (2, [PREFIX], [0.5]),
                (2, [PREFIX], [0.5]),
            ],
        ),
        (
            3,
            [[0, 1, 2], [1, 2], [2]],
            [
                (1, [0], [1.25]),
                (2, [0, 0], [3.0, 0.5]),
                (2, [PREFIX, PREFIX], [3.0, 0.5]),
                (2, [PREFIX], [0.5]),
            ],
        ),
    ],
)
def test_songs_decoded_together_equal_each_alone(
    pipe: Pipeline,
    codes: list[torch.Tensor],
    alone: list[torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    songs: int,
    rounds: list[list[int]],
    sample_calls: list[tuple],
) -> None:
    calls, scalar_rows, done = [], [], []
    sample, decode_chunked = FlowMatching.sample, ScalarModel.decode_chunked

    def spy_sample(self, mu, noise, ic, prefix, *, num_steps, guidance_scale, **options):
        calls.append((num_steps, list(prefix), list(guidance_scale)))
        assert mu.shape[0] == noise.shape[0] == ic.shape[0] == len(prefix)
        return sample(
            self,
            mu,
            noise,
            ic,
            prefix,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            **options,
        )

    def spy_decode(self, latents, chunk):
        scalar_rows.append(latents.shape[0])
        return decode_chunked(self, latents, chunk)

    monkeypatch.setattr(FlowMatching, "sample", spy_sample)
    monkeypatch.setattr(ScalarModel, "decode_chunked", spy_decode)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    wavs = pipe.codec.detokenize_many(
        codes,
        PARAMS,
        generators=generators,
        songs=songs,
        on_window=lambda song, n, total: done.append((song, n, total)),
    )

    for wav, expected, c in zip(wavs, alone, codes, strict=True):
        assert wav.dtype == torch.float32 and wav.device.type == "cpu"
        assert wav.shape == (2, c.shape[1] * SAMPLES_PER_CODE)
        assert torch.equal(wav, expected)
    assert calls == sample_calls
    # The scalar decoder takes one window at a time (the memory planner's size).
    streams = pipe.codec_config.out_channels // pipe.codec_config.latent_hidden_dim
    assert scalar_rows == [streams] * sum(map(len, rounds))
    # on_window: each song's windows counted in the order the rounds decode them.
    made = [0] * len(codes)
    expected_done = []
    for round_songs in rounds:
        for song in round_songs:
            made[song] += 1
            expected_done.append((song, made[song], windows(LENGTHS[song])))
    assert done == expected_done
    # Noise contract: one randn((1, 744, 256)) per window from the song's own generator.
    for g, seed, n in zip(generators, SEEDS, LENGTHS, strict=True):
        reference = torch.Generator().manual_seed(seed)
        for _ in range(windows(n)):
            torch.randn((1, LATENTS_PER_CODE * WINDOW, 256), generator=reference)
        assert torch.equal(g.get_state(), reference.get_state())


def test_a_songs_noise_does_not_depend_on_its_neighbour(
    pipe: Pipeline, codes: list[torch.Tensor], alone: list[torch.Tensor]
) -> None:
    """Song 0 beside itself with another seed, in one batch: its audio is what it gets alone,
    and its neighbour's (its own codes, other noise) differs."""
    same, other = pipe.codec.detokenize_many(
        [codes[0], codes[0]],
        PARAMS[0],
        generators=[torch.Generator().manual_seed(SEEDS[0]), torch.Generator().manual_seed(99)],
        songs=2,
    )
    assert torch.equal(same, alone[0])
    assert not torch.equal(other, alone[0])


def test_mixed_precision_songs_decoded_together_equal_each_alone(tiny_ckpt: Path) -> None:
    """The GPU's default codec dtype (bf16 DiT blocks): rows of one batch still compute alike."""
    codec = load_codec(tiny_ckpt / CODEC_DIR, dtype=torch.bfloat16)[0].set_precision("mixed")
    g = torch.Generator().manual_seed(1)
    songs = [torch.randint(0, 1024, (8, 100), generator=g) for _ in range(2)]

    def noise() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in SEEDS[:2]]

    alone = [
        codec.detokenize(c, PARAMS[0], generator=n) for c, n in zip(songs, noise(), strict=True)
    ]
    together = codec.detokenize_many(songs, PARAMS[0], generators=noise(), songs=2)
    for wav, expected in zip(together, alone, strict=True):
        assert torch.equal(wav, expected)


def test_decode_frames_batch_gives_what_decode_frames_gives(
    pipe: Pipeline, codes: list[torch.Tensor], alone: list[torch.Tensor]
) -> None:
    wavs = pipe.decode_frames_batch(codes[:2], PARAMS[:2], seeds=SEEDS[:2])  # default songs
    assert len(wavs) == 2
    for wav, expected in zip(wavs, alone[:2], strict=True):
        assert torch.equal(wav, expected)


def bad_codes() -> list[torch.Tensor]:
    return [
        torch.zeros(7, 10, dtype=torch.long),  # wrong codebook count
        torch.zeros(8, 0, dtype=torch.long),  # no frames
        torch.zeros(8, 10),  # floats
        torch.full((8, 10), -1),  # a negative id
    ]


@pytest.mark.parametrize("bad", bad_codes(), ids=["shape", "empty", "float", "negative"])
def test_bad_codes_refused_as_detokenize_refuses_them_before_decoding(
    pipe: Pipeline, codes: list[torch.Tensor], bad: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before every input was checked")

    monkeypatch.setattr(FlowMatching, "sample", no_decoding)
    with pytest.raises(UserError) as alone_error:
        pipe.codec.detokenize(bad)
    with pytest.raises(UserError) as batch_error:
        pipe.codec.detokenize_many([codes[0], bad], songs=2)
    assert str(batch_error.value) == str(alone_error.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, codes: c.detokenize_many(codes[0]), "list of"),
        (lambda c, codes: c.detokenize_many(codes[:2], PARAMS), "3 CodecParams for 2 songs"),
        (lambda c, codes: c.detokenize_many(codes[:2], generators=[None]), "1 generators"),
        (lambda c, codes: c.detokenize_many(codes[:2], songs=0), "songs must be"),
    ],
    ids=["one tensor", "params", "generators", "songs"],
)
def test_bad_arguments_refused(
    pipe: Pipeline, codes: list[torch.Tensor], call, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        call(pipe.codec, codes)


def test_no_songs_decode_to_nothing(pipe: Pipeline) -> None:
    assert pipe.codec.detokenize_many([], songs=3) == []
    assert pipe.decode_frames_batch([]) == []
