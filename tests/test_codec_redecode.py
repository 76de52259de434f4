"""Re-decoding an edited song (`HeartCodec.redecode`) against decoding it whole, on the tiny
fixture's codec: the same samples bit for bit, the original's samples before the first changed
window's region, only the changed windows (and the one before them) decoded again, the stored
in-context prefixes exact, and the input checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from heartmula_rt.errors import UserError
from heartmula_rt.model.checkpoint import load_codec
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.codec.detokenize import HOP, OVERLAP, PREFIX, WINDOW, plan_windows
from heartmula_rt.model.folder import CODEC_DIR
from heartmula_rt.request import CodecParams

SAMPLES_PER_CODE = 3840
PARAMS = CodecParams(num_steps=2)  # the scalar decoder's time per window is the same at any
SEED = 7
ORIGINAL = 1100  # codes: windows at 0, 320, 640, 960; the last one padded by tiling


def windows(num_codes: int) -> int:
    return len(plan_windows(num_codes)[1])


def noise() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def random_codes(num_codes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1024, (8, num_codes), generator=torch.Generator().manual_seed(seed))


def edited(codes: torch.Tensor, changed_from: int, length: int) -> torch.Tensor:
    """`codes` kept before `changed_from`, new random codes from there to `length`."""
    new = random_codes(length - changed_from, 1000 + changed_from)
    return torch.cat([codes[:, :changed_from], new], dim=1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Every decode here on one thread: float32 sums split across another count may round
    differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def codec(tiny_ckpt: Path, one_thread: None) -> HeartCodec:
    return load_codec(tiny_ckpt / CODEC_DIR)[0]


@pytest.fixture(scope="module")
def song(codec: HeartCodec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original song: codes, waveform, prefixes."""
    codes = random_codes(ORIGINAL, 0)
    wav, prefixes = codec.detokenize(codes, PARAMS, generator=noise(), return_prefixes=True)
    return codes, wav, prefixes


def check_redecode(
    codec: HeartCodec,
    original: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    changed_from: int,
    length: int,
    first_changed: int,
) -> torch.Tensor:
    """Check `redecode` of the edit against `detokenize`; returns the edit's waveform."""
    codes, wav, prefixes = original
    new = edited(codes, changed_from, length)
    expected, expected_prefixes = codec.detokenize(
        new, PARAMS, generator=noise(), return_prefixes=True
    )
    calls: list[tuple[int, int]] = []
    got, got_prefixes = codec.redecode(
        new,
        PARAMS,
        generator=noise(),
        changed_from=changed_from,
        prefixes=prefixes,
        original=wav,
        on_window=lambda done, total: calls.append((done, total)),
        return_prefixes=True,
    )
    assert got.shape == expected.shape == (2, length * SAMPLES_PER_CODE)
    assert torch.equal(got, expected)
    assert torch.equal(got_prefixes, expected_prefixes)
    # The original's samples up to window `first_changed`'s region, which window
    # `first_changed` (new codes) then changes.
    kept = first_changed * HOP * SAMPLES_PER_CODE
    assert torch.equal(got[:, :kept], wav[:, :kept])
    if first_changed:
        region = slice(kept, kept + OVERLAP * SAMPLES_PER_CODE)
        assert not torch.equal(got[:, region], wav[:, region])
    decoded = windows(length) - max(first_changed - 1, 0)
    assert calls == [(done, decoded) for done in range(1, decoded + 1)]
    return got


@pytest.mark.parametrize(
    "changed_from, length, first_changed",
    [
        pytest.param(100, 500, 0, id="in-window-0-shorter"),  # is detokenize
        pytest.param(660, 700, 1, id="in-overlap-1-2-shorter"),  # window 0 again, no prefix
        pytest.param(800, ORIGINAL, 2, id="mid-window-2"),
        pytest.param(3 * HOP, 1400, 2, id="at-window-3-start-longer"),
        pytest.param(1050, 1050, 3, id="cut-in-last-window"),  # shorter: no new codes at all
    ],
)
def test_redecode_equals_detokenize_of_the_edit(
    codec: HeartCodec,
    song: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    changed_from: int,
    length: int,
    first_changed: int,
) -> None:
    check_redecode(codec, song, changed_from, length, first_changed)


def test_redecode_continues_a_song_from_its_last_window(codec: HeartCodec) -> None:
    """The original ends on a window boundary (692 codes = 2 whole windows): the continuation's
    first changed window is one the original never had, and the original's last one is decoded
    again. The stored prefixes are the windows' final latents' last 104 frames, exactly."""
    codes = random_codes(HOP + WINDOW, 5)
    wav, prefixes = codec.detokenize(codes, PARAMS, generator=noise(), return_prefixes=True)
    latents = list(codec.window_latents(codes, PARAMS, generator=noise()))
    assert prefixes.dtype == torch.float32 and prefixes.shape == (2, PREFIX, 256)
    assert all(torch.equal(p, w[0, -PREFIX:]) for p, w in zip(prefixes, latents, strict=True))
    song = (codes, wav, prefixes)
    expected = check_redecode(codec, song, HOP + WINDOW, HOP + WINDOW + 100, 2)

    # The same by hand, as a stream would: a decoder resumed at window 1 given the new codes
    # a piece at a time hands out the audio from window 2's region on.
    new = edited(codes, HOP + WINDOW, HOP + WINDOW + 100)
    decoder = codec.window_decoder(PARAMS, generator=noise(), resume=1, prefix=prefixes[0])
    with torch.inference_mode():
        pieces = [
            p for at in range(0, new.shape[1], 97) for p in decoder.push(new[:, at : at + 97])
        ]
        pieces += decoder.finish()
    kept = 2 * HOP * SAMPLES_PER_CODE
    assert torch.equal(torch.cat(pieces, dim=1), expected[:, kept:])


def test_redecode_refuses_what_does_not_fit(
    codec: HeartCodec, song: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    codes, wav, prefixes = song
    new = edited(codes, 800, 1400)
    good = {"generator": noise(), "changed_from": 800, "prefixes": prefixes, "original": wav}

    def never(*_: int) -> None:
        raise AssertionError("nothing is decoded before the inputs are checked")

    cases = [
        ({"prefixes": prefixes.double()}, r"prefixes must be float32 \[W, 104, 256\]"),
        ({"prefixes": prefixes[:, :100]}, r"not torch.float32 \[4, 100, 256\]"),
        ({"prefixes": prefixes[0]}, r"prefixes must be float32"),
        ({"prefixes": prefixes[:3]}, r"samples are not the song of the 3 windows' prefixes"),
        ({"original": wav[:, :-1]}, r"samples are not the song of the 4 windows' prefixes"),
        ({"original": wav[:, : 600 * SAMPLES_PER_CODE]}, r"not the song of the 4 windows'"),
        ({"original": wav[0]}, r"original must be the original song's float32 waveform \[2, N\]"),
        ({"original": wav.double()}, r"original must be"),
        ({"changed_from": -1}, r"changed_from must be a code index in \[0, 1400\]"),
        ({"changed_from": 1401}, r"changed_from must be a code index in \[0, 1400\]"),
        ({"changed_from": True}, r"changed_from must be a code index"),
        ({"changed_from": 1200}, r"changed_from 1200 is past the original song's end \(1100"),
        ({"generator": None}, r"generator must be a CPU torch.Generator"),
    ]
    for change, message in cases:
        with pytest.raises(UserError, match=message) as refused:
            codec.redecode(new, PARAMS, **{**good, **change}, on_window=never)
        assert "\n" not in str(refused.value)
