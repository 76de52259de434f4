"""The plain generation loop (SPEC §3-4), for a batch of songs: each song's prompt → its frame 0,
then one frame for every running song per backbone step, until each one's EOS token or length.

`prefill` (one song's prompt, its own rows) and `decode_one_frame` (every row of the batch at
its own position) are the two steps; each returns the frames and the raw codebook-0 logits of
its backbone step, which is what the parity tests compare. `run_batch` drives them over a
`scheduler.Scheduler`; `generate_frames` is one song run as a batch of its own.

The seed contract: a song's token of codebook k in frame f is drawn with noise seeded by
`sampling.draw_seed(seed, f, k)`, so its draws depend on its seed alone, never on its
neighbours, its rows or when it was admitted. Its logits do not depend on its neighbours either
while the batch keeps one row count: a matmul's rows are computed alike whatever the other rows
hold, but a CPU or GPU matmul of another row count may round differently (measured on this
project's CPU: 1 row, 2–3 rows and 4 or more differ in the last bits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from heartmula_rt.config import GenConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.lm import HeartMuLa, LMCache
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.model.sampling import cfg_mix, draw_seed, sample_topk
from heartmula_rt.request import SamplingParams, prompt_too_long
from heartmula_rt.runtime.scheduler import Scheduler, SongRun

# What a song's maker calls as frames come: `OnFrame(n)` with the number made so far, `OnCodes(new)`
# with the frames made since its last call ([n_codebooks, k] int64, CPU).
OnFrame = Callable[[int], None]
OnCodes = Callable[[Tensor], None]
# Raw logits [rows, V] and the codebook → the token of every row [rows, 1].
Draw = Callable[[Tensor, int], Tensor]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation, carrying the frames made so far ([8, T'] int64, CPU).

    A KeyboardInterrupt subclass, so code that does not look for it still stops as on any
    Ctrl-C, while a caller that does can decode the partial song.
    """

    def __init__(self, frames: Tensor) -> None:
        super().__init__(f"generation interrupted after {frames.shape[1]} frames")
        self.frames = frames


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch, carrying every song's frames made so far (`.frames`: one
    [8, T'] int64 CPU tensor per song, in the order they were given)."""

    def __init__(self, frames: list[Tensor]) -> None:
        made = ", ".join(str(f.shape[1]) for f in frames)
        super().__init__(f"generation interrupted after {made} frames")
        self.frames = frames


class Sampler:
    """Every song's tokens of one step from the raw logits of the batch's rows (SPEC §4): with
    guidance (scale above 1) a song's rows are [cond, uncond] and the token drawn from the
    guided logits goes to both. Draws are seeded per (song seed, frame, codebook)."""

    def __init__(self, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)

    def draw(self, logits: Tensor, song: SongRun, codebook: int) -> Tensor:
        """One song's token [1, 1] from its rows' logits [rows, V]."""
        p = song.sampling
        if song.rows == 2:
            logits = cfg_mix(logits[:1], logits[1:], p.cfg_scale)
        if p.topk == 1:
            return sample_topk(logits, 1, p.temperature)
        self.generator.manual_seed(draw_seed(song.seed, song.first_frame + song.made, codebook))
        return sample_topk(logits, p.topk, p.temperature, self.generator)

    def draws(self, placed: Sequence[tuple[int, SongRun]], rows: int) -> Draw:
        """The `Draw` of a step over `rows` rows holding each song at its first row."""

        def draw(logits: Tensor, codebook: int) -> Tensor:
            if len(placed) == 1 and placed[0][1].rows == rows:  # one song: no gather
                return self.draw(logits, placed[0][1], codebook).expand(rows, 1)
            tokens = torch.zeros(rows, 1, dtype=torch.long, device=logits.device)
            for first, song in placed:
                end = first + song.rows
                tokens[first:end] = self.draw(logits[first:end], song, codebook)
            return tokens

        return draw


def song_draw(sampling: SamplingParams, device: torch.device, seed: int = 0) -> Draw:
    """The draws of one song alone in its rows, always as for frame 0 (parity tests and
    micro-benchmarks call the steps directly)."""
    song = SongRun(None, sampling, seed=seed)
    return Sampler(device).draws([(0, song)], song.rows)


def sample_frame(
    model: HeartMuLa, last: Tensor, c0_logits: Tensor, cache: LMCache, draw: Draw
) -> Tensor:
    """The depth decoder's expansion of one backbone step into a frame per row [rows, n] (on the
    device). `draw` maps raw logits to the token of every row (`Sampler.draws`, or the static
    engine's fused sampler)."""
    token = draw(c0_logits, 0)
    tokens = [token]
    # Positions restart at 0 every frame: [last hidden, c0 embedding] at 0 and 1, then one
    # codebook embedding per step.
    x = torch.stack([last, model.embed_audio(token[:, 0], 0)], dim=1)
    start = 0
    for i in range(1, model.config.audio_num_codebooks):
        token = draw(model.decoder_step(x, start, cache, i), i)
        tokens.append(token)
        start += x.shape[1]
        x = model.embed_audio(token, i)
    return torch.cat(tokens, dim=1)


def prefill(model: HeartMuLa, prompt: Prompt, cache: LMCache, draw: Draw) -> tuple[Tensor, Tensor]:
    """Frame 0 of one song from its whole prompt at positions 0..P-1, over its own rows
    (`cache`), its SLOT filled from its own reference (`Prompt.reference`; both engines prefill
    here): (frames [rows, n], c0 logits [rows, V])."""
    ids = prompt.ids.to(model.text_embeddings.weight.device)
    rows = model.embed_prompt(ids, prompt.slot_index, cache.rows, prompt.reference)
    last, logits = model.backbone_step(rows, 0, cache)
    return sample_frame(model, last, logits, cache, draw), logits


def feed_given(model: HeartMuLa, song: SongRun, cache: LMCache) -> Tensor:
    """After its prompt, a continued song's given frames (`SongRun.given`) into its own rows'
    cache, all but the last, one backbone step each: the very steps the song ran when it made
    them alone, so its cache (and what it draws next) is what it was. They become its frames;
    returns the last one [rows, n] on the device, for the next step to feed."""
    given = song.given.to(model.device)
    start = len(song.prompt)
    for j in range(given.shape[0] - 1):
        frame = given[j].expand(cache.rows, -1)
        model.backbone_step(model.embed_frame(frame), start + j, cache)
    song.frames.extend(song.given.clone().unbind(0))
    return given[-1].expand(cache.rows, -1)


def decode_one_frame(
    model: HeartMuLa,
    frames: Tensor,
    positions: int | Tensor,
    cache: LMCache,
    kv_len: int | None,
    draw: Draw,
) -> tuple[Tensor, Tensor]:
    """The next frame of every row from its previous one [rows, n] fed at its position:
    `positions` [rows] (int64, on the device) reading `kv_len` cached positions, or one int for
    every row (one song alone: no mask): (frames [rows, n], c0 logits)."""
    last, logits = model.backbone_step(model.embed_frame(frames), positions, cache, kv_len)
    return sample_frame(model, last, logits, cache, draw), logits


def check_length(model: HeartMuLa, prompt: Prompt, max_frames: int) -> None:
    """Refuse a request that does not fit the backbone's context."""
    if max_frames < 0:
        raise UserError(f"the number of frames must be 0 or more, not {max_frames}")
    limit = model.config.backbone.max_seq_len
    tags = prompt.slot_index  # the tags' tokens, then the SLOT, then the lyrics'
    too_long = prompt_too_long(tags, len(prompt) - tags - 1, max_frames, limit)
    if too_long is not None:
        if len(prompt) + 1 < limit:  # a shorter song fits: say how to ask for one
            too_long += " (--max-seconds / max_seconds; `heartmula-rt extend` continues a song)"
        raise UserError(too_long)


def song_codes(song: SongRun, model: HeartMuLa) -> Tensor:
    """A song's frames so far as codes [n_codebooks, T] int64 on the CPU."""
    if not song.frames:
        return torch.zeros(model.config.audio_num_codebooks, 0, dtype=torch.long)
    return torch.stack(song.frames, dim=1)


def add_frames(song: SongRun, frames: Tensor) -> None:
    """Record frames [k, n] (CPU) the song made, then call its callbacks. They are copied: on
    the CPU `.cpu()` returns the engine's own tensor, which later steps overwrite."""
    frames = frames.clone()
    song.frames.extend(frames.unbind(0))
    if song.on_codes is not None:
        song.on_codes(frames.T.contiguous())
    if song.on_frame is not None:
        song.on_frame(song.made)


def song_rows(model: HeartMuLa, song: SongRun) -> contextlib.AbstractContextManager:
    """Where the model runs LoRAs per row (`lora_rows.apply_lora_rows`): `song`'s rows assigned its
    adapter (`SongRun.lora`, in place, so a captured graph sees it), and a context for the calls
    over only its rows (its prefill, its given frames). Else nothing."""
    rows = getattr(model, "lora_rows", None)
    if rows is None:
        return contextlib.nullcontext()
    rows.assign(song.first_row, song.rows, song.lora, song.lora_scale)
    return rows.at(song.first_row)


def free_rows(model: HeartMuLa, song: SongRun) -> None:
    """`song`'s rows back to no adapter, where the model runs LoRAs per row."""
    rows = getattr(model, "lora_rows", None)
    if rows is not None:
        rows.assign(song.first_row, song.rows, None)


def reserve_rows(model: HeartMuLa, rows: int) -> None:
    """Room in the per-row LoRA index for a batch of `rows` rows (before any graph capture)."""
    lora = getattr(model, "lora_rows", None)
    if lora is not None:
        lora.reserve(rows)


def ends_at(frame: Tensor, song: SongRun, gen: GenConfig) -> str | None:
    """Why `song` ends with `frame` [n] (CPU): "eos" if it holds an EOS id, else None."""
    eos = song.sampling.stop_at_eos and bool((frame >= gen.audio_eos_id).any())
    return "eos" if eos else None


@torch.no_grad()
def run_batch(model: HeartMuLa, gen: GenConfig, scheduler: Scheduler) -> None:
    """Run every song of `scheduler` to its end, one frame of every running song per backbone
    step (a host sync each), admitting waiting songs into freed rows between frames.

    A song stops at the first frame holding a token ≥ `gen.audio_eos_id`, which is dropped
    (unless `stop_at_eos` is False), or after `max_frames` frames past frame 0; stray ids below
    EOS but past the codec's codebook are kept as they are. Each song's frames accumulate in
    its `SongRun`, so a Ctrl-C (which propagates) or an error leaves what was made.
    """
    device = model.device
    rows, n = scheduler.rows, model.config.audio_num_codebooks
    reserve_rows(model, rows)
    cache = model.new_cache(rows, scheduler.positions)
    frames = torch.zeros(rows, n, dtype=torch.long, device=device)  # each row's last frame
    positions = torch.zeros(rows, dtype=torch.long, device=device)  # where it is fed
    live = torch.zeros(rows, dtype=torch.long, device=device)  # 1 where a song runs
    sampler = Sampler(device)

    def vacate(song: SongRun, why: str) -> None:
        rows_of = slice(song.first_row, song.first_row + song.rows)
        positions[rows_of] = live[rows_of] = 0  # idle rows stay at their position 0
        free_rows(model, song)
        scheduler.finish(song, why)

    while scheduler.busy():
        for song in scheduler.cancelled():
            vacate(song, "cancelled")
        for song in scheduler.admit():
            first, count = song.first_row, song.rows
            view = cache.rows_view(first, count)
            with song_rows(model, song):  # its own rows: its LoRA, where songs choose one
                frame, _ = prefill(model, song.prompt, view, sampler.draws([(0, song)], count))
                if song.given is None:
                    add_frames(song, frame[:1].cpu())
                else:
                    frame = feed_given(model, song, view)
            frames[first : first + count] = frame
            positions[first : first + count] = len(song.prompt) + song.made - 1
            live[first : first + count] = 1
            if song.frames_left == 0:
                vacate(song, "length")
        if not scheduler.running:
            continue
        placed = [(song.first_row, song) for song in scheduler.running]
        draw = sampler.draws(placed, rows)
        if scheduler.one_song:  # one position for every row (frame f is fed at P + f - 1)
            song = placed[0][1]
            step_at, kv_len = len(song.prompt) + song.made - 1, None
        else:  # every row at its own position, reading the whole cache (scheduler.py)
            step_at, kv_len = positions, scheduler.positions
        frames, _ = decode_one_frame(model, frames, step_at, cache, kv_len, draw)
        on_host = frames.cpu()  # the plain loop's one sync per frame
        positions += live
        for first, song in placed:
            why = ends_at(on_host[first], song, gen)
            if why is None:
                add_frames(song, on_host[first : first + 1])
                why = "length" if song.frames_left == 0 else None
            if why is not None:
                vacate(song, why)


def generate_frames(
    model: HeartMuLa,
    prompt: Prompt,
    gen: GenConfig,
    sampling: SamplingParams,
    *,
    on_frame: OnFrame | None = None,
    on_codes: OnCodes | None = None,
) -> Tensor:
    """Codes [n_codebooks, T] int64 on the CPU, T ≤ max_frames + 1 (frame 0 included): one
    song, a batch of its own rows (`run_batch`). `on_frame(n)` is called with the number of
    frames made so far after each one, `on_codes(new)` (streaming) with the frames made since
    its last call, just before `on_frame`. Ctrl-C raises GenerationInterrupted with the
    frames made so far."""
    song = SongRun(prompt, sampling, on_frame, on_codes)
    return run_one(lambda s: run_batch(model, gen, s), model, song)


def run_one(run: Callable[[Scheduler], None], model: HeartMuLa, song: SongRun) -> Tensor:
    """One song through `run` (an engine's batch loop) in a batch of its own rows; its codes
    (a continued song's given frames first)."""
    check_length(model, song.prompt, song.sampling.max_frames)
    scheduler = Scheduler(song.rows, max(song.positions, 1), one_song=True)
    scheduler.submit(song)
    try:
        run(scheduler)
    except KeyboardInterrupt:
        raise GenerationInterrupted(song_codes(song, model)) from None
    return song_codes(song, model)
