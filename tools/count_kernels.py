"""Kernel launches of one LM frame of the static engine, counted on the meta device.

    python tools/count_kernels.py [--preset 3B] [--dtype bfloat16] [--no-cfg] [--top 12]

Prints the total and the backbone layers', decoder layer steps', sampler's and the rest's
shares: for the plain layers as built (q, k, v, w1 and w3 apart), then as a pipeline loads the
LM on a GPU (each layer's q/k/v and w1/w3 merged into one matmul: `lm.merge_projections`; the
fused twins of `kernels.fused_layers` swapped in: the residual adds inside the norms, the KV-cache
writes inside RoPE), counting SDPA as one kernel, then the same as a GPU runs each decode
step's attention: RoPE, the KV-cache write and the split-key attention in one kernel
(`kernels.decode_attention.rope_attention`; a second launch combines the chunks of a cache
longer than one chunk: the backbone's). The counting rule is `heartmula_rt.runtime.launches`'s
docstring. Needs no GPU and no weights.
"""

from __future__ import annotations

import argparse

import torch

from heartmula_rt.config import LM_PRESETS
from heartmula_rt.model.fused import use_fused_layers
from heartmula_rt.model.lm import merge_projections
from heartmula_rt.runtime.launches import count_frame_launches, meta_lm, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="3B", choices=sorted(LM_PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-cfg", action="store_true", help="batch 1 instead of CFG's 2")
    parser.add_argument("--top", type=int, default=0, help="list each part's N most launched ops")
    args = parser.parse_args(argv)
    model = meta_lm(args.preset, getattr(torch, args.dtype))
    setting = f"{args.preset}, {args.dtype}, {'no CFG' if args.no_cfg else 'CFG'}"
    print(f"{setting}, plain layers:")
    print(report(count_frame_launches(model, cfg=not args.no_cfg), args.top))
    merge_projections(model)
    use_fused_layers(model)
    print(f"{setting}, as loaded on a GPU (merged q/k/v and w1/w3, fused layers):")
    print(report(count_frame_launches(model, cfg=not args.no_cfg), args.top))
    gpu = count_frame_launches(model, cfg=not args.no_cfg, gpu=True)
    print(f"{setting}, the same with a GPU's fused decode attention (RoPE, cache, attention):")
    print(report(gpu, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
