"""Editing a song's frames: continue it (resume an interrupted song, extend a finished one, past
the backbone's context with a sliding window) and regenerate a section of it.

A continued song is a `SongRun` with `given` frames: after its prompt they are fed one backbone
step each, the very steps the song ran when it made them alone (decode.feed_given), and its
draws go on from their index (the seed contract: a token of frame f, codebook k is drawn from
(seed, f, k)). So resuming a song from any frame with its seed and prompt gives exactly the
frames the uninterrupted song made, and a section made again with another seed changes only
from its first frame on.

A song longer than the context (`max_seq_len` positions: the prompt plus its frames) goes on in
runs: when a run is full, the next one is the prompt plus the song's last `context_frames`
frames (fed as above) and as many new frames as fit, the draws still indexed by the song's own
frame numbers. Memory stays one run's cache whatever the length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from heartmula_rt.config import DEFAULT_CONTEXT_FRAMES
from heartmula_rt.errors import UserError
from heartmula_rt.request import FRAME_MS, SongRequest
from heartmula_rt.runtime.codes import SongCodes
from heartmula_rt.runtime.decode import GenerationInterrupted, OnFrame, song_codes
from heartmula_rt.runtime.scheduler import SongRun

if TYPE_CHECKING:
    from heartmula_rt.runtime.pipeline import Pipeline

__all__ = ["DEFAULT_CONTEXT_FRAMES", "continue_song", "regenerate", "section"]


def frame_at(seconds: float) -> int:
    """The frame whose audio starts at or just before `seconds` (80 ms frames)."""
    return int(round(seconds * 1000, 6)) // FRAME_MS


def section(
    length: int, start_s: float, end_s: float | None, names: tuple[str, str] = ("from", "to")
) -> tuple[int, int | None]:
    """(first frame, end frame or None) of a section of a song of `length` frames given in
    seconds, refused in one line if it is not inside the song (`names`: how the caller calls
    the two moments)."""
    song_s = length * FRAME_MS / 1000
    start = frame_at(start_s)
    if not 1 <= start < length:
        raise UserError(
            f"{names[0]} {start_s:g} s is outside the song ({song_s:g} s): give a moment after "
            f"{FRAME_MS / 1000:g} s and before its end"
        )
    if end_s is None:
        return start, None
    end = frame_at(end_s)
    if not start < end <= length:
        raise UserError(
            f"{names[1]} {end_s:g} s must come after {names[0]} {start_s:g} s and by the "
            f"song's end ({song_s:g} s)"
        )
    return start, end


def _check_frames(frames: torch.Tensor | SongCodes, pipe: Pipeline) -> torch.Tensor:
    """A song's frames: a tensor, or a sidecar's (codes.py)."""
    if isinstance(frames, SongCodes):
        frames = frames.codes
    n = pipe.lm_config.audio_num_codebooks
    if not isinstance(frames, torch.Tensor) or frames.dim() != 2 or frames.shape[0] != n:
        shape = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise UserError(f"a song's frames are an int64 tensor [{n}, T], not {shape}")
    return frames.long().cpu()


def continue_song(
    pipe: Pipeline,
    request: SongRequest,
    frames: torch.Tensor,
    context_frames: int | None = None,
    on_frame: OnFrame | None = None,
) -> torch.Tensor:
    """`frames` [8, k] continued to `request.sampling.max_frames` + 1 frames or its EOS; the
    whole song [8, T] (the given frames first, unchanged). Past the context each run keeps
    `context_frames` (default `DEFAULT_CONTEXT_FRAMES`, at most half a run). `on_frame(n)`
    gets the song's frame count as new frames come."""
    song = _check_frames(frames, pipe)
    prompt = pipe.prompt(request, fit=False)
    limit = pipe.lm_config.backbone.max_seq_len
    fits = limit - len(prompt)  # frames one run holds
    if fits < 2:
        raise UserError(
            f"the prompt ({len(prompt)} tokens) leaves no room for frames in the model's "
            f"context of {limit}; shorten the lyrics"
        )
    if context_frames is None:
        context_frames = min(DEFAULT_CONTEXT_FRAMES, fits // 2)
    if not 1 <= context_frames < fits:
        raise UserError(
            f"a context of {context_frames} frames does not fit: with this prompt "
            f"({len(prompt)} tokens) a run holds {fits} frames, so keep 1 to {fits - 1}"
        )
    total = request.sampling.max_frames + 1
    if song.shape[1] >= total:
        raise UserError(
            f"the song already has {song.shape[1]} frames; ask for more than "
            f"{(song.shape[1] - 1) * 0.08:g} s to continue it"
        )
    while song.shape[1] < total:
        keep = song.shape[1] if song.shape[1] < fits else context_frames
        first = song.shape[1] - keep
        length = min(total - first, fits)  # this run's frames, the kept ones included
        run = SongRun(
            prompt,
            replace(request.sampling, max_frames=length - 1),
            given=song[:, first:].T.contiguous() if keep else None,
            first_frame=first,
            lora=request.lora,
            lora_scale=request.lora_scale,
        )
        if on_frame is not None:
            run.on_frame = lambda made, first=first: on_frame(first + made)
        try:
            made = pipe.run_songs([run], run.rows, one_song=True)[0]
        except KeyboardInterrupt:
            made = song_codes(run, pipe.lm)
            raise GenerationInterrupted(torch.cat([song, made[:, keep:]], dim=1)) from None
        song = torch.cat([song, made[:, keep:]], dim=1)
        if made.shape[1] < length:  # it ended by EOS
            break
    return song


def regenerate(
    pipe: Pipeline,
    request: SongRequest,
    frames: torch.Tensor,
    start: int,
    end: int | None,
    seeds: Sequence[int],
) -> list[torch.Tensor]:
    """One take per seed of `frames` [8, T] with frames `start`.. made again (all in one batch):
    to `request.sampling.max_frames` + 1 frames or EOS, or with `end` exactly `end - start`
    new frames followed by the song's own from `end`."""
    song = _check_frames(frames, pipe)
    length = song.shape[1]
    if not 1 <= start < length:
        raise UserError(
            f"a section starts after frame 0 and within the song's {length} frames, not at {start}"
        )
    if end is not None and not start < end <= length:
        raise UserError(f"a section ends after its start ({start}) and by {length}, not at {end}")
    if not seeds:
        raise UserError("give at least one seed: one take per seed")
    sampling = request.sampling
    if end is not None:  # exactly the section: no EOS inside it
        sampling = replace(sampling, max_frames=end - 1, stop_at_eos=False)
    prompt = pipe.prompt(replace(request, sampling=sampling))
    given = song[:, :start].T.contiguous()
    runs = [
        SongRun(
            prompt,
            replace(sampling, seed=seed),
            given=given,
            lora=request.lora,
            lora_scale=request.lora_scale,
        )
        for seed in seeds
    ]
    takes = pipe.run_songs(runs, sum(r.rows for r in runs), one_song=len(runs) == 1)
    if end is None:
        return takes
    return [torch.cat([take, song[:, end:]], dim=1) for take in takes]
