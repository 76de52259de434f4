"""LoRA adapters and the LM's speed (#32): frames/s of one batch of songs with no adapter, with
one adapter merged into the weights, and with a different adapter for each song run per LM row
(`serve --lora NAME=PATH`), side by side, on one pipeline's device.

    python tools/make_checkpoint.py /tmp/mid --lm mid --codec tiny
    python benchmarks/lora_bench.py --model-path /tmp/mid --threads 1 --name lora-mid

Every way makes the same `--songs` songs (same prompts, seeds and length, EOS ignored) in one
batch of `--songs` × 2 LM rows (guidance), through `Pipeline.generate_frames_batch` (the song
runner and the pipeline's engine), after one warm-up batch, in rounds that start one way later
each time (the machine's drift falls on all):

- `none`: the base model;
- `merged`: adapter 1 merged before quantization (`--lora`, what gen does): the same model
  shape, so the same speed is expected;
- `per-song-none`: the adapters loaded per row (`lora_per_song`) but no song choosing one: the
  per-row wrappers' cost alone;
- `per-song-4`: song i runs adapter i (4 different adapters in one batch).

The adapters are random rank-`--rank` LoRAs on every attention and MLP linear of both stacks
(SimpleTuner's default targets), written as PEFT folders. Per way: `lm_frames_per_s` (every
song's frames over the batch's wall time, prefills included) and `steps_per_s` (batch frame
steps per second). Writes `{UTC date}_{device}_{name}.json` to `--out-dir` (device, torch,
commit, command, runs: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from rounds import rotated_rounds, way_runs  # noqa: E402

import heartmula_rt  # noqa: E402
from heartmula_rt.bench import results as bench_results  # noqa: E402
from heartmula_rt.memory.planner import checkpoint_configs  # noqa: E402
from heartmula_rt.model.lora import lora_targets  # noqa: E402
from heartmula_rt.request import SongRequest  # noqa: E402

WAYS = ("none", "merged", "per-song-none", "per-song-4")
TAGS = ["piano,calm", "rock,loud", "jazz,night", "metal,fast", "folk", "pop", "ambient", "funk"]


def make_adapters(model_path: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` random PEFT folders of rank `rank` over every attention and MLP linear."""
    config = checkpoint_configs(model_path)[0]
    targets = {n: s for n, s in lora_targets(config).items() if ".layers." in n}
    folders = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        state = {}
        for name, (out, inn) in targets.items():
            key = f"base_model.model.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, inn, generator=g) / inn**0.5
            state[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
        folder = root / f"adapter{i + 1}"
        folder.mkdir(parents=True)
        save_file(state, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": rank}))
        folders.append(folder)
    return folders


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--songs", type=int, default=4, help="songs in the batch (4)")
    parser.add_argument("--seconds", type=float, default=4.0, help="each song's length (4)")
    parser.add_argument("--rank", type=int, default=16, help="the adapters' rank (16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up (3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quant", default="none")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="lora")
    args = parser.parse_args()

    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    options = {
        "device": args.device,
        "engine": args.engine,
        "dtype": args.dtype,
        "quant": args.quant,
        "threads": args.threads,
    }
    songs = [
        SongRequest.of(
            TAGS[i % len(TAGS)], "[verse] la la la", max_seconds=args.seconds
        ).with_settings(seed=i + 1, stop_at_eos=False, cfg_scale=1.5)
        for i in range(args.songs)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model_path, Path(tmp), args.songs, args.rank)
        named = [f"a{i + 1}={path}" for i, path in enumerate(adapters)]
        pipes = {
            "none": heartmula_rt.load_pipeline(args.model_path, **options),
            "merged": heartmula_rt.load_pipeline(args.model_path, lora=[adapters[0]], **options),
        }
        per_song = heartmula_rt.load_pipeline(
            args.model_path, lora=named, lora_per_song=True, **options
        )
        pipes["per-song-none"] = pipes["per-song-4"] = per_song
        requests = {
            way: songs
            if way != "per-song-4"
            else [replace(s, lora=f"a{i + 1}") for i, s in enumerate(songs)]
            for way in WAYS
        }
        rows = sum(s.sampling.cfg_rows for s in songs)

        def run(way: str) -> dict:
            pipe = pipes[way]
            start = time.perf_counter()
            frames = pipe.generate_frames_batch(requests[way], rows=rows)
            wall = time.perf_counter() - start
            made = sum(f.shape[1] for f in frames)
            return {
                "wall_s": wall,
                "frames": made,
                "lm_frames_per_s": made / wall,
                "steps_per_s": max(f.shape[1] for f in frames) / wall,
            }

        raw = rotated_rounds(WAYS, args.rounds, run)
        device = str(pipes["none"].device)
        config = pipes["none"].config

    def fields(way: str) -> dict:
        return {
            "name": way,
            "engine": config.engine,
            "quant": config.quant,
            "dtype": config.dtype,
            "adapters": {"none": 0, "merged": 1, "per-song-none": 0}.get(way, args.songs),
            "lora": {"none": None, "merged": "merged"}.get(way, "per-song"),
            "songs": args.songs,
            "rows": rows,
        }

    runs = way_runs(raw, fields, ("lm_frames_per_s", "steps_per_s", "wall_s"), "vs_none")
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "commit": bench_results.commit(),
        "command": shlex.join(["python", *sys.argv]),
        "model": str(args.model_path),
        "date": date,
        "threads": config.threads,
        "cpu_count": os.cpu_count(),
        "settings": {
            "songs": args.songs,
            "seconds": args.seconds,
            "rank": args.rank,
            "rounds": args.rounds,
            "targets": "every attention and MLP linear of the backbone and the decoder",
        },
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    kind = "cpu" if result["device"] == "cpu" else "gpu"
    out = args.out_dir / f"{date[:10]}_{kind}_{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(
            f"{r['name']:<14} {r['lm_frames_per_s']:8.2f} frames/s  "
            f"{r['steps_per_s']:7.2f} steps/s  ×{r['vs_none']:.3f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
