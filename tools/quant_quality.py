"""Print the README's quantization quality table: every mode against the unquantized model on
tiny-public and on the mid-size random model, float32 on the CPU, no CFG.

    python tools/quant_quality.py [--shared ../shared] [--frames 64]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from heartmula_rt.quant import QUANT_MODES, quantize_model

from heartmula_rt.bench.quality import measure_quality
from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.folder import LM_DIR, load_gen_config
from heartmula_rt.model.synthetic import synthetic_models, synthetic_prompt

PROMPT_LEN = 40  # the tests' prompt length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--shared", type=Path, default=here.parent / "shared")
    parser.add_argument("--frames", type=int, default=64)
    args = parser.parse_args()
    ckpt = args.shared / "fixtures/tiny-public/ckpt"
    mid = synthetic_models("mid", torch.device("cpu"), torch.float32, seed=3)
    models = {
        "tiny-public": (load_lm(ckpt / LM_DIR)[0], load_gen_config(ckpt)),
        "mid (8 layers, dim 512)": (mid.lm, mid.gen_config),
    }
    print(
        "| model | mode | rel. logit error c0 / decoder | KL(ref ‖ quant) | top-1 agreement "
        "(teacher-forced) | greedy agreement (free-running) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (model, gen) in models.items():
        prompt = synthetic_prompt(PROMPT_LEN, model.config.text_vocab_size)
        for mode in QUANT_MODES[1:]:
            quantized = quantize_model(copy.deepcopy(model), mode)
            q = measure_quality(model, quantized, prompt, gen, frames=args.frames)
            print(
                f"| {name} | {mode} | {q['rel_err_c0']:.3f} / {q['rel_err_decoder']:.3f} | "
                f"{q['kl']:.2g} | {q['top1_agreement']:.3f} | {q['greedy_agreement']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
