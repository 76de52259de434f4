"""The bytes-and-launches model of one decode step of a batch of songs, on the meta device (no GPU,
no weights): what benchmarks/README.md's "A model of the decode step" table is made from.

    python benchmarks/step_model.py [--preset 3B] [--songs 8] [--seconds 20,240] \\
        [--out benchmarks/results/step-model-3B-8songs.json]

For each song length: the static engine's capacity (positions rounded up to its 1024 step), the
bytes one step of the whole batch must read (`bench.timing`: the weights once, plus the backbone
KV cache) where every row reads every cached position (SDPA over the capacity: the batch path
before the split-key attention) and where each row reads only up to its own position (the
split-key kernel), at the songs' last frame and as the mean over the songs, and the launches of
one frame (`runtime.launches`) as the LM loads on a GPU now (merged q/k/v and w1/w3, fused
layers; on a GPU each decode step's RoPE, KV-cache write and attention in `rope_attention`: 2
launches per backbone layer, 1 per depth-decoder layer step). The launch counts before are
`tools/count_kernels.py` at BEFORE_COMMIT (fused layers; its GPU figure adds the backbone
attention's second launch). Nothing is timed: `lm_frames_per_s` is null.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from heartmula_rt.bench.timing import lm_bytes_per_frame, lm_bytes_per_step
from heartmula_rt.config import LM_PRESETS
from heartmula_rt.model.fused import use_fused_layers
from heartmula_rt.model.lm import merge_projections
from heartmula_rt.request import FRAME_MS
from heartmula_rt.runtime.engine import CAPACITY_STEP
from heartmula_rt.runtime.launches import count_frame_launches, meta_lm

BEFORE_COMMIT = "057b8b5"
# tools/count_kernels.py at BEFORE_COMMIT, 3B bf16 CFG, fused layers: SDPA counted as one kernel;
# on a GPU the backbone's split-key attention launches 2 (+28).
LAUNCHES_BEFORE = {"meta (SDPA as 1)": 895, "GPU (split-key attention)": 923}
PROMPT_TOKENS = 64  # a prompt's length (tags + lyrics); the step reads it with the frames


def commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="3B", choices=sorted(LM_PRESETS))
    parser.add_argument("--songs", type=int, default=8)
    parser.add_argument("--seconds", default="20,240")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model = merge_projections(meta_lm(args.preset, torch.bfloat16))
    use_fused_layers(model)
    rows = 2 * args.songs  # CFG
    launches_meta = count_frame_launches(model, songs=args.songs).total
    launches_gpu = count_frame_launches(model, songs=args.songs, gpu=True).total
    runs = []
    for seconds in (float(s) for s in args.seconds.split(",")):
        frames = round(seconds * 1000 / FRAME_MS)
        last = PROMPT_TOKENS + frames  # the last frame's position
        capacity = math.ceil(last / CAPACITY_STEP) * CAPACITY_STEP
        whole = lm_bytes_per_frame(model, capacity, rows)
        at_end = lm_bytes_per_step(model, [last] * rows)
        mean = round((lm_bytes_per_step(model, [PROMPT_TOKENS + 1] * rows) + at_end) / 2)
        runs.append(
            {
                "name": f"{args.preset}-bf16-x{args.songs}-{seconds:g}s",
                "engine": "graph",
                "quant": "none",
                "dtype": "bfloat16",
                "songs": args.songs,
                "rows": rows,
                "seconds": seconds,
                "capacity": capacity,
                "lm_frames_per_s": None,
                "weight_bytes": lm_bytes_per_frame(model, 0, 0),
                "bytes_per_step_before": whole,
                "bytes_per_step_after_last_frame": at_end,
                "bytes_per_step_after_mean": mean,
                "launches_per_frame_before": LAUNCHES_BEFORE,
                "launches_per_frame_after": {
                    "meta (SDPA as 1)": launches_meta,
                    "GPU (split-key attention)": launches_gpu,
                },
            }
        )
    report = {
        "device": "meta (no GPU: a model, not a measurement)",
        "torch": torch.__version__,
        "commit": commit(),
        "command": shlex.join(["python", "benchmarks/step_model.py", *(argv or sys.argv[1:])]),
        "host": platform.node(),
        "prompt_tokens": PROMPT_TOKENS,
        "before_commit": BEFORE_COMMIT,
        "runs": runs,
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
