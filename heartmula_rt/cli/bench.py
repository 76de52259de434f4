"""`heartmula-rt bench`: LM frames/s, codec time and real-time factor of the engines, through
the same song runner as gen (heartmula_rt/bench/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from heartmula_rt.cli import common
from heartmula_rt.config import DEFAULT_PROMPT_LEN, ENGINES, LM_PRESETS, default_bench_dir
from heartmula_rt.errors import UserError
from heartmula_rt.request import SongRequest

if TYPE_CHECKING:
    from heartmula_rt.bench import BenchConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure LM frames/s, codec time and real-time factor of the engines"
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--synthetic",
        choices=list(LM_PRESETS),
        default="3B",
        help="random weights of this size, made on the device (default 3B, full codec)",
    )
    common.add_model_path(model, "a checkpoint folder instead")
    p.add_argument(
        "--engines",
        default=None,
        help=f"comma list of {','.join(ENGINES)} (default: plain,graph on GPU, plain on CPU)",
    )
    common.add_model_options(
        p,
        codec_help="the codec's precision (default: mixed on GPU, else float32)",
        quant_list=True,
    )
    common.add_song_options(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every run (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="counted LM runs per engine (3)")
    p.add_argument("--warmup", type=int, default=1, help="LM runs per engine not counted (1)")
    p.add_argument("--codec-repeats", type=int, default=1, help="counted codec runs (1)")
    p.add_argument("--no-codec", action="store_true", help="time the LM only")
    p.add_argument(
        "--greedy-frames",
        type=int,
        default=0,
        help="also compare N top-1 frames of each engine with the plain engine's (default 0: no)",
    )
    p.add_argument(
        "--batch",
        default=None,
        help="comma list of songs at once (1,2,4,8): each engine's one song and then each "
        "batch of songs, side by side (aggregate and per-song frames/s, speed-up over one)",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help=f"prompt tokens of a synthetic run (default {DEFAULT_PROMPT_LEN})",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"where the results JSON goes (default {default_bench_dir()})",
    )
    p.add_argument("--name", default=None, help="last part of the results file name")
    p.add_argument(
        "--vram",
        default=None,
        help="comma list of GPU budgets (4G,6G,8G,12G,16G,24G): one results file per budget, "
        "models placed as planned and the budget enforced",
    )
    p.add_argument(
        "--plot",
        nargs="+",
        type=Path,
        metavar="PATH",
        default=None,
        help="only draw: --plot OUT.png RESULTS.json [RESULTS.json ...]",
    )
    p.set_defaults(func=cmd_bench)


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """`heartmula-rt bench`'s arguments as a `BenchConfig` (every input checked here)."""
    from heartmula_rt.bench import BenchConfig, parse_batch_sizes, parse_engines, parse_quant_modes

    synthetic = {"model_path": None, "synthetic": args.synthetic} if args.model_path is None else {}
    out_dir = args.out_dir
    if out_dir is None:  # said, since nothing on the command line names it
        out_dir = default_bench_dir()
        print(f"results go to {out_dir} (--out-dir to choose)", file=sys.stderr)
    pipeline = common.pipeline_config(args, quant="none", **synthetic)  # quant: set per mode
    # Text only to carry the settings: the benchmark's prompt is made from the model.
    request = SongRequest.of("bench", **common.song_settings(args), stop_at_eos=False)
    return BenchConfig(
        pipeline=pipeline,
        engines=tuple(parse_engines(args.engines, pipeline.torch_device)),
        quant_modes=tuple(parse_quant_modes(args.quant)),
        vram_budgets=tuple(b.strip() for b in (args.vram or "").split(",") if b.strip()),
        sampling=request.sampling,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
        warmup=args.warmup,
        codec_repeats=args.codec_repeats,
        codec=not args.no_codec,
        greedy_frames=args.greedy_frames,
        batch_sizes=parse_batch_sizes(args.batch),
        out_dir=out_dir,
        name=args.name,
    )



def cmd_bench(args: argparse.Namespace) -> int:
    from heartmula_rt.bench import run_bench
    from heartmula_rt.bench.results import plot_results

    if args.plot is not None:
        png, *files = args.plot
        if not files:
            raise UserError("--plot needs the PNG to write, then at least one results file")
        plot_results(files, png)
        print(f"wrote {png}", file=sys.stderr)  # stdout carries only the product
        return 0
    return run_bench(bench_config(args))


