"""Measured quality of a quantized HeartMuLa against its unquantized reference.

Logit error and KL are teacher-forced: both models are fed the reference's greedy tokens (every
codebook of every frame), so an early difference does not compound into later ones. Greedy
agreement is measured free-running, where it does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heartmula_rt.config import GenConfig
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import decode_one_frame, generate_frames, prefill


class _Recorder:
    """A one-row sampler that keeps every logits row it is given and answers greedily, or with
    the `forced` tokens in order (teacher forcing)."""

    def __init__(self, forced: list[Tensor] | None = None) -> None:
        self.logits: list[Tensor] = []
        self.tokens: list[Tensor] = []
        self._forced = iter(forced) if forced is not None else None

    def __call__(self, logits: Tensor, codebook: int) -> Tensor:
        self.logits.append(logits[0].float())
        token = logits.argmax(dim=-1, keepdim=True) if self._forced is None else next(self._forced)
        self.tokens.append(token)
        return token


def _teacher_forced(model: HeartMuLa, prompt: Prompt, frames: int, recorder: _Recorder) -> Tensor:
    """Logits [frames, n_codebooks, V] of every sampler call over `frames` frames."""
    cache = model.new_cache(1, len(prompt) + frames)
    frame, _ = prefill(model, prompt, cache, recorder)
    for n in range(frames - 1):
        frame, _ = decode_one_frame(model, frame, len(prompt) + n, cache, None, recorder)
    return torch.stack(recorder.logits).view(frames, model.config.audio_num_codebooks, -1)


def _rel_error(q: Tensor, r: Tensor) -> float:
    return float(torch.linalg.vector_norm(q - r) / torch.linalg.vector_norm(r))


@torch.no_grad()
def measure_quality(
    reference: HeartMuLa,
    quantized: HeartMuLa,
    prompt: Prompt,
    gen_config: GenConfig,
    frames: int = 64,
) -> dict[str, float]:
    """Quality of `quantized` against `reference` over `frames` frames (frame 0 included):

    - rel_err_c0, rel_err_decoder: ‖q − r‖ / ‖r‖ over all teacher-forced codebook-0 logits, and
      over those of codebooks 1..n-1;
    - kl: mean over every teacher-forced token position of KL(reference ‖ quantized) between
      the full softmax of the logits at temperature 1 (no top-k truncation);
    - top1_agreement: the fraction of teacher-forced token positions whose argmax is the same;
    - greedy_agreement: the fraction of token positions equal between the two models' free-running
      greedy generations (no CFG, not stopped at EOS).
    """
    ref = _Recorder()
    r = _teacher_forced(reference, prompt, frames, ref)
    q = _teacher_forced(quantized, prompt, frames, _Recorder(forced=ref.tokens))
    kl = F.kl_div(q.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none")
    greedy_params = SamplingParams(frames - 1, topk=1, cfg_scale=1.0, stop_at_eos=False)
    greedy = [generate_frames(m, prompt, gen_config, greedy_params) for m in (reference, quantized)]
    return {
        "rel_err_c0": _rel_error(q[:, 0], r[:, 0]),
        "rel_err_decoder": _rel_error(q[:, 1:], r[:, 1:]),
        "kl": float(kl.sum(-1).mean()),
        "top1_agreement": float((q.argmax(-1) == r.argmax(-1)).float().mean()),
        "greedy_agreement": float((greedy[0] == greedy[1]).float().mean()),
    }
