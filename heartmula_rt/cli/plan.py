"""`heartmula-rt plan`: the memory plan and predicted peak of a --vram budget, from configs and
headers alone (no torch, no weights)."""

from __future__ import annotations

import argparse

from heartmula_rt.cli import common
from heartmula_rt.cli.reference import check_device
from heartmula_rt.config import CODEC_PRECISIONS, LM_DTYPES, default_codec_dtype, default_dtype
from heartmula_rt.memory.planner import (
    checkpoint_configs,
    device_budgets,
    plan_memory,
    preset_configs,
)
from heartmula_rt.memory.report import format_embedder, format_plan
from heartmula_rt.request import DEFAULT_MAX_SECONDS, SamplingParams, max_frames_for


def add_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan", help="print the memory plan and predicted peak of a --vram budget (no weights)"
    )
    plan.add_argument(
        "--vram",
        required=True,
        help="GPU memory budget, such as 6G or 12GiB; two, such as 12G,8G: the LM's GPU and the "
        "codec's GPU",
    )
    plan.add_argument(
        "--codec-device",
        choices=("cpu", "gpu"),
        default=None,
        help="the codec on another device than the LM's GPU: cpu (not planned) or gpu (a second "
        "GPU, with the same budget unless --vram gives two); two budgets imply gpu",
    )
    seconds, cfg_scale = DEFAULT_MAX_SECONDS, SamplingParams.cfg_scale
    common.add_options(
        plan,
        [
            ("--max-seconds", float, seconds, f"longest song ({seconds:g})"),
            ("--cfg-scale", float, cfg_scale, f"≤ 1 plans one LM row, no guidance ({cfg_scale})"),
            (
                "--songs",
                int,
                1,
                "songs made at once, each with its own KV cache rows (1); the plan also says "
                "how many its layout holds",
            ),
        ],
    )
    common.add_model_path(
        plan, "a checkpoint folder (configs and headers only); default: the 3B model's sizes"
    )
    plan.add_argument(
        "--dtype", choices=LM_DTYPES, default=None, help="LM (default: the GPU's, bfloat16)"
    )
    plan.add_argument(
        "--codec-dtype",
        choices=list(CODEC_PRECISIONS),
        default=None,
        help="codec (default: the GPU's, mixed)",
    )
    plan.add_argument(
        "--ref-device",
        default=None,
        help="also the reference embedder's memory (MuQ-MuLan, for --ref-audio) where it runs: "
        "cpu or cuda; it runs and is freed before the LM loads",
    )
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    ref_device = None if args.ref_device is None else check_device(args.ref_device)
    two_gpus = args.codec_device == "gpu" or (args.codec_device is None and "," in args.vram)
    apart = args.codec_device is not None or two_gpus
    budget, codec_budget = device_budgets(args.vram, codec_apart=apart, codec_on_gpu=two_gpus)
    codec_device = "cpu" if apart and not two_gpus else "cuda"
    sampling = SamplingParams(cfg_scale=args.cfg_scale, max_frames=max_frames_for(args.max_seconds))
    if args.model_path is None:
        lm_config, codec_config = preset_configs()
    else:
        lm_config, codec_config = checkpoint_configs(args.model_path)
    plan = plan_memory(  # a plan is for a GPU, whatever this machine has: its defaults
        budget,
        lm_config,
        codec_config,
        max_frames=sampling.max_frames,
        cfg_rows=sampling.cfg_rows,
        songs=args.songs,
        lm_dtype=args.dtype or default_dtype("cuda"),
        codec_dtype=CODEC_PRECISIONS[args.codec_dtype or default_codec_dtype(codec_device)][0],
        codec_apart=apart,
        codec_budget_bytes=codec_budget,
    )
    print(format_plan(plan))
    if ref_device is not None:
        print(format_embedder(ref_device, budget))
    return 0


