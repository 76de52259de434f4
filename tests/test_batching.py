"""Many songs at once: a song's frames do not depend on what shares its batch, with real
sampling, for the plain engine and the static one (its capture-free step on the CPU).

Every comparison keeps the batch's row count: a song alone in a batch of `ROWS` rows against the
same song among others in a batch of `ROWS` rows (a matmul of another row count may round
differently; see decode.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from batches import POSITIONS, ROWS, run_songs
from tokenizers import Tokenizer

from heartmula_rt import load_pipeline
from heartmula_rt.config import GenConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SamplingParams, SongRequest
from heartmula_rt.runtime.engine import PlainEngine, StaticEngine
from heartmula_rt.runtime.scheduler import Scheduler, SongRun


def _songs(tokenizer: Tokenizer, gen: GenConfig) -> dict[str, tuple]:
    """(prompt, sampling) of songs that differ in every way a batch must keep apart."""

    def prompt(tags: str, lyrics: str):
        return build_prompt(tokenizer, gen, tags, lyrics)

    return {
        # guided, sampled, ends by its length
        "a": (prompt("piano,happy", "[Verse]\nhello\n"), SamplingParams(
            max_frames=6, topk=5, temperature=0.9, cfg_scale=1.5, seed=1)),
        # unguided, a longer prompt, another top-k and temperature
        "b": (prompt("rock", "[Verse]\n" + "la la la\n" * 6), SamplingParams(
            max_frames=9, topk=50, temperature=1.3, cfg_scale=1.0, seed=2)),
        # guided and greedy: ends by EOS at frame 13 (the reference's mula_eos case)
        "c": (prompt("metal", "[chorus]\nla la la\n"), SamplingParams(
            max_frames=40, topk=1, cfg_scale=2.0, seed=3)),
        # unguided, waits in the queue behind c
        "d": (prompt("jazz", "[Verse]\nnight\n"), SamplingParams(
            max_frames=4, topk=20, temperature=0.8, cfg_scale=1.0, seed=4)),
    }  # fmt: skip


def _engines(lm: HeartMuLa, gen: GenConfig) -> dict:
    return {
        "plain": PlainEngine(lm, gen),
        "static": StaticEngine(lm, gen, graphs=False, bucket=16, sync_every=3),
    }


@pytest.mark.parametrize("kind", ["plain", "static"])
def test_a_song_is_the_same_alone_and_in_a_batch(
    kind: str, lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer
) -> None:
    engine = _engines(lm, gen)[kind]
    songs = _songs(tokenizer, gen)
    alone = {name: run_songs(engine, [SongRun(p, s)])[0] for name, (p, s) in songs.items()}
    assert alone["c"].shape[1] == 13  # by EOS
    assert [alone[n].shape[1] for n in "abd"] == [7, 10, 5]  # by their lengths

    # 4 rows for 6 rows' worth of songs: a (2 rows) and b (1) start; c (2) waits, and d (1)
    # behind it (first come, first served); c starts when a ends, mid-song for b, and d in the
    # row left beside them.
    admitted: list[str] = []
    runs = {name: SongRun(p, s) for name, (p, s) in songs.items()}
    for name, song in runs.items():
        song.on_frame = lambda made, name=name: admitted.append(name) if made == 1 else None
    together = dict(zip(runs, run_songs(engine, list(runs.values())), strict=True))
    assert admitted == ["a", "b", "c", "d"]
    for name in songs:
        assert torch.equal(together[name], alone[name]), name

    if kind == "static":
        return  # the rest runs the same host loop; the CPU's interpreted sampler is slow
    # Submitted while another song is mid-song (from its callback), as a server does.
    late = SongRun(*songs["d"])
    scheduler = Scheduler(ROWS, POSITIONS)

    def submit_late(made: int) -> None:
        if made == 4:
            scheduler.submit(late)

    first = scheduler.submit(SongRun(*songs["b"], on_frame=submit_late))
    engine.run(scheduler)
    assert torch.equal(torch.stack(first.frames, dim=1), alone["b"])
    assert torch.equal(torch.stack(late.frames, dim=1), alone["d"])


def test_seeds_and_settings_are_each_songs_own(
    lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer
) -> None:
    engine = PlainEngine(lm, gen)
    prompt, sampling = _songs(tokenizer, gen)["b"]
    twins = run_songs(engine, [SongRun(prompt, sampling), SongRun(prompt, sampling)])
    assert torch.equal(twins[0], twins[1])  # the same seed in two rows: the same song
    takes = run_songs(
        engine, [SongRun(prompt, sampling), SongRun(prompt, replace(sampling, seed=9))]
    )
    assert not torch.equal(takes[0], takes[1])


def test_the_scheduler_refuses_songs_that_cannot_fit(tokenizer: Tokenizer, gen: GenConfig) -> None:
    prompt = build_prompt(tokenizer, gen, "rock", "hey")
    with pytest.raises(UserError, match="needs 2 LM rows"):
        Scheduler(1, POSITIONS).submit(SongRun(prompt, SamplingParams(cfg_scale=1.5)))
    with pytest.raises(UserError, match="cache positions"):
        Scheduler(2, 20).submit(SongRun(prompt, SamplingParams(max_frames=30)))


def test_rows_are_freed_at_once_and_reused_first_fit(tokenizer: Tokenizer, gen: GenConfig) -> None:
    prompt = build_prompt(tokenizer, gen, "rock", "hey")
    guided, plain = SamplingParams(max_frames=4), SamplingParams(max_frames=4, cfg_scale=1.0)
    scheduler = Scheduler(4, POSITIONS)
    songs = [scheduler.submit(SongRun(prompt, s)) for s in (plain, guided, guided, plain)]
    assert scheduler.admit() == songs[:2]  # rows 0 and 1-2; the next guided one waits
    assert [s.first_row for s in songs[:2]] == [0, 1]
    scheduler.finish(songs[0], "length")
    assert scheduler.admit() == []  # rows 0 and 3 are free, but not adjacent
    scheduler.finish(songs[1], "eos")
    assert scheduler.admit() == songs[2:]
    assert [s.first_row for s in songs[2:]] == [0, 2]
    scheduler.finish(songs[2], "cancelled")
    scheduler.finish(songs[3], "length")
    assert not scheduler.busy() and [s.ended for s in songs] == [
        "length",
        "eos",
        "cancelled",
        "length",
    ]


def test_a_pipeline_makes_many_songs_in_one_batch(tiny_ckpt) -> None:
    pipe = load_pipeline(tiny_ckpt, device="cpu")
    requests = [
        SongRequest.of("piano", "[verse]\nhello\n", max_seconds=0.6, seed=1, stop_at_eos=False),
        SongRequest.of(
            "rock",
            "[verse]\nla la\n",
            max_seconds=0.8,
            cfg_scale=1.0,
            topk=20,
            seed=2,
            stop_at_eos=False,
        ),
        SongRequest.of(
            "jazz", "[verse]\nnight\n", max_seconds=0.4, temperature=0.7, seed=3, stop_at_eos=False
        ),
    ]
    together = pipe.generate_frames_batch(requests, rows=3)  # the third waits for rows
    alone = [pipe.generate_frames_batch([r], rows=3)[0] for r in requests]
    assert [f.shape for f in together] == [(8, 8), (8, 11), (8, 6)]
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a, b)
    assert pipe.generate_frames_batch([]) == []


def test_rows_left_idle_stay_within_the_cache(
    lm: HeartMuLa, gen: GenConfig, tokenizer: Tokenizer
) -> None:
    # Guided songs one after another in rows 0-1 while row 2 stays idle: the batch runs more
    # steps than its cache has positions, and the idle row must not walk past its end.
    prompt = build_prompt(tokenizer, gen, "rock", "hey")
    sampling = SamplingParams(max_frames=8, stop_at_eos=False)
    positions = len(prompt) + sampling.max_frames
    songs = [SongRun(prompt, replace(sampling, seed=s)) for s in range(4)]
    scheduler = Scheduler(3, positions)
    for song in songs:
        scheduler.submit(song)
    PlainEngine(lm, gen).run(scheduler)
    assert sum(song.made - 1 for song in songs) > positions  # decode steps the batch ran
    alone = Scheduler(3, positions)
    again = alone.submit(SongRun(prompt, replace(sampling, seed=3)))
    PlainEngine(lm, gen).run(alone)
    assert torch.equal(torch.stack(songs[3].frames, 1), torch.stack(again.frames, 1))
