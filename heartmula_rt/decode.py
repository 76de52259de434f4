"""The plain generation loop (SPEC §3-4): prompt → frame 0, then one frame per backbone step until
an EOS token or `max_frames`.

`prefill` and `decode_one_frame` are the two steps; each returns the frame and the raw codebook-0
logits of its backbone step, which is what the parity tests compare. `generate_frames` drives them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import GenConfig
from .errors import UserError
from .lm import HeartMuLa, LMCache
from .prompt import Prompt
from .request import DEFAULT_SAMPLING, SamplingParams
from .sampling import cfg_mix, sample_topk

# What a song's maker calls as frames come: `OnFrame(n)` with the number made so far, `OnCodes(new)`
# with the frames made since its last call ([n_codebooks, k] int64, CPU).
OnFrame = Callable[[int], None]
OnCodes = Callable[[Tensor], None]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation, carrying the frames made so far ([8, T'] int64, CPU).

    A KeyboardInterrupt subclass, so code that does not look for it still stops as on any
    Ctrl-C, while a caller that does can decode the partial song.
    """

    def __init__(self, frames: Tensor) -> None:
        super().__init__(f"generation interrupted after {frames.shape[1]} frames")
        self.frames = frames


@dataclass(frozen=True)
class Sampler:
    """One song's sampling (`SamplingParams`) with its random numbers. With guidance (scale
    above 1) rows are [cond, uncond] and the one token drawn from the guided logits is fed to
    both."""

    params: SamplingParams = DEFAULT_SAMPLING
    generator: torch.Generator | None = None

    @property
    def cfg_rows(self) -> int:
        return self.params.cfg_rows

    def __call__(self, logits: Tensor) -> Tensor:
        """Raw logits [rows, V] → the sampled token [1, 1]."""
        p = self.params
        if self.cfg_rows == 2:
            logits = cfg_mix(logits[:1], logits[1:], p.cfg_scale)
        return sample_topk(logits, p.topk, p.temperature, self.generator)


def sample_frame(
    model: HeartMuLa,
    last: Tensor,
    c0_logits: Tensor,
    cache: LMCache,
    sampler: Callable[[Tensor], Tensor],
) -> Tensor:
    """The depth decoder's expansion of one backbone step into a frame [n] (on the device).

    `sampler` maps raw logits [rows, V] to the token [1, 1] fed to every row (`Sampler`, or
    the engine's fused one)."""
    b = last.shape[0]
    token = sampler(c0_logits)
    tokens = [token]
    # Positions restart at 0 every frame: [last hidden, c0 embedding] at 0 and 1, then one
    # codebook embedding per step.
    x = torch.stack([last, model.embed_audio(token[0, 0], 0).expand_as(last)], dim=1)
    start = 0
    for i in range(1, model.config.audio_num_codebooks):
        token = sampler(model.decoder_step(x, start, cache, i))
        tokens.append(token)
        start += x.shape[1]
        x = model.embed_audio(token, i).expand(b, 1, -1)
    return torch.cat(tokens, dim=1)[0]


def prefill(
    model: HeartMuLa, prompt: Prompt, cache: LMCache, sampler: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Frame 0 from the whole prompt at positions 0..P-1: (frame [n], c0 logits [rows, V])."""
    ids = prompt.ids.to(model.text_embeddings.weight.device)
    rows = model.embed_prompt(ids, prompt.slot_index, cache.rows)
    last, logits = model.backbone_step(rows, 0, cache)
    return sample_frame(model, last, logits, cache, sampler), logits


def decode_one_frame(
    model: HeartMuLa, frame: Tensor, pos: int, cache: LMCache, sampler: Sampler
) -> tuple[Tensor, Tensor]:
    """The next frame from the previous one fed at position `pos`: (frame [n], c0 logits)."""
    rows = model.embed_frame(frame.expand(cache.rows, -1))
    last, logits = model.backbone_step(rows, pos, cache)
    return sample_frame(model, last, logits, cache, sampler), logits


def check_length(model: HeartMuLa, prompt: Prompt, max_frames: int) -> None:
    """Refuse a request that does not fit the backbone's context."""
    if max_frames < 0:
        raise UserError(f"the number of frames must be 0 or more, not {max_frames}")
    limit = model.config.backbone.max_seq_len
    if len(prompt) + max_frames + 1 > limit:
        fits = limit - len(prompt) - 1  # frames that fit after this prompt (80 ms each)
        longest = (
            f"with this prompt the longest that fits is {fits} frames ({fits * 0.08:g} s, "
            "--max-seconds / max_seconds)"
            if fits > 0
            else "shorten the lyrics"
        )
        raise UserError(
            f"the prompt ({len(prompt)} tokens) plus {max_frames} frames is too long for the "
            f"model's context of {limit}; {longest}"
        )


@torch.no_grad()
def generate_frames(
    model: HeartMuLa,
    prompt: Prompt,
    gen: GenConfig,
    sampling: SamplingParams,
    *,
    on_frame: OnFrame | None = None,
    on_codes: OnCodes | None = None,
) -> Tensor:
    """Codes [n_codebooks, T] int64 on the CPU, T ≤ max_frames + 1 (frame 0 included).

    Stops at the first frame holding a token ≥ `gen.audio_eos_id`, which is dropped (unless
    `sampling.stop_at_eos` is False: benchmarks on random weights run every frame); stray ids
    below it but past the codec's codebook are returned as they are. `on_frame(n)` is called
    with the number of frames made so far after each one, `on_codes(new)` (streaming) with
    the frames made since its last call, [n_codebooks, k] int64 on the CPU, just before
    `on_frame`. A seed draws from a generator on the model's device. Ctrl-C raises
    GenerationInterrupted with the frames made so far.
    """
    check_length(model, prompt, sampling.max_frames)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    sampler = Sampler(sampling, generator)
    cache = model.new_cache(sampler.cfg_rows, len(prompt) + sampling.max_frames)
    frames: list[Tensor] = []
    try:
        frame, _ = prefill(model, prompt, cache, sampler)
        frames.append(frame)
        if on_codes is not None:
            on_codes(frame[:, None].cpu())
        if on_frame is not None:
            on_frame(1)
        for n in range(sampling.max_frames):
            frame, _ = decode_one_frame(model, frame, len(prompt) + n, cache, sampler)
            # The plain path syncs here, every frame.
            if sampling.stop_at_eos and bool((frame >= gen.audio_eos_id).any()):
                break
            frames.append(frame)
            if on_codes is not None:
                on_codes(frame[:, None].cpu())
            if on_frame is not None:
                on_frame(len(frames))
    except KeyboardInterrupt:
        raise GenerationInterrupted(_stack(frames, model)) from None
    return _stack(frames, model)


def _stack(frames: list[Tensor], model: HeartMuLa) -> Tensor:
    if not frames:
        return torch.zeros(model.config.audio_num_codebooks, 0, dtype=torch.long)
    return torch.stack(frames, dim=1).cpu()
