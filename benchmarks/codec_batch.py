"""The codec decoding several songs' windows together (`HeartCodec.detokenize_many`) against one
window at a time, and its scalar decoder over several windows at once against one at a time, on
the tiny fixture's codec on the CPU.

    python benchmarks/codec_batch.py --out benchmarks/results/codec_batch-<date>.json

`--count` songs of `--codes` codes each (372: one window) are decoded with every `--songs`
setting and every `--threads` count, and `--count` random windows' latents go through the scalar
decoder `--songs` windows at a time, in rounds over all of them (each round starting one
setting later), so a neighbour's burst of work lands on all; one warm-up run of each setting
comes first and is not counted. Each run's output is hashed: every `--songs` setting must give
the same bytes (the audio equals the per-song `detokenize`'s), which the file records. Also
recorded: the machine's runnable tasks (/proc/stat), the mean of a run's start and end, since
other processes share these cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "fixtures" / "tiny-public" / "ckpt"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cpu_threads import cpu_model, runnable_tasks  # noqa: E402

from heartmula_rt.bench import results as bench_results  # noqa: E402
from heartmula_rt.config import LATENTS_PER_CODE  # noqa: E402
from heartmula_rt.model.checkpoint import load_codec  # noqa: E402
from heartmula_rt.model.codec.detokenize import WINDOW  # noqa: E402
from heartmula_rt.model.folder import CODEC_DIR  # noqa: E402
from heartmula_rt.request import CodecParams  # noqa: E402


def parse_ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results JSON to write")
    parser.add_argument("--model-path", type=Path, default=TINY)
    parser.add_argument("--count", type=int, default=4, help="songs decoded (4)")
    parser.add_argument("--codes", type=int, default=372, help="codes per song (372: 1 window)")
    parser.add_argument("--songs", type=parse_ints, default=[1, 2, 4], help="comma list (1,2,4)")
    parser.add_argument("--threads", type=parse_ints, default=[1, 2], help="comma list (1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (3)")
    args = parser.parse_args()

    codec = load_codec(args.model_path / CODEC_DIR)[0]
    g = torch.Generator().manual_seed(0)
    songs = [
        torch.randint(0, codec.config.codebook_size, (8, args.codes), generator=g)
        for _ in range(args.count)
    ]
    params = CodecParams()  # the defaults: 10 steps, guidance 1.25
    streams = codec.config.out_channels // codec.config.latent_hidden_dim
    latents = torch.randn(  # the scalar decoder's input: every song's window, its streams
        args.count * streams, codec.config.latent_hidden_dim, LATENTS_PER_CODE * WINDOW, generator=g
    )

    def decode(n: int) -> list[torch.Tensor]:
        generators = [torch.Generator().manual_seed(i) for i in range(args.count)]
        return codec.detokenize_many(songs, params, generators=generators, songs=n)

    def scalar(n: int) -> list[torch.Tensor]:
        return [codec.scalar_model.decode_chunked(x) for x in latents.split(n * streams)]

    paths = {"detokenize_many": decode, "scalar decoder": scalar}
    settings = [
        (path, threads, n) for path in paths for threads in args.threads for n in args.songs
    ]

    def measure(path: str, threads: int, n: int) -> tuple[float, float, str]:
        """Seconds, runnable tasks (mean of start and end) and the outputs' hash."""
        torch.set_num_threads(threads)
        load = runnable_tasks()
        start = time.perf_counter()
        with torch.inference_mode():
            out = paths[path](n)
        seconds = time.perf_counter() - start
        digest = hashlib.sha256(b"".join(w.numpy().tobytes() for w in out)).hexdigest()[:16]
        return seconds, (load + runnable_tasks()) / 2, digest

    for setting in settings:  # warm-up, not counted
        measure(*setting)
    raw: dict[tuple[str, int, int], list[tuple[float, float, str]]] = {s: [] for s in settings}
    for round_ in range(args.repeats):
        # Each round starts one setting later: what runs before a setting (a thread count
        # switch, a large batch's freed memory) changes from round to round.
        shift = round_ % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            raw[setting].append(measure(*setting))
            print(setting, raw[setting][-1], flush=True)

    runs = []
    for (path, threads, n), results in raw.items():
        seconds = [round(r[0], 4) for r in results]
        runs.append(
            {
                "path": path,
                # the codec alone: no LM engine, nothing quantized, no LM frames
                "engine": None,
                "quant": None,
                "lm_frames_per_s": None,
                "threads": threads,
                "songs": n,
                "raw_s": seconds,
                "median_s": statistics.median(seconds),
                "windows_per_s": round(args.count / statistics.median(seconds), 3),
                "runnable_tasks": [round(r[1], 1) for r in results],
                "output_sha256": sorted({r[2] for r in results}),
            }
        )
    result = {
        "device": {"cpu": cpu_model(), "cpu_count": os.cpu_count()},
        "torch": torch.__version__,
        "commit": bench_results.commit(),
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(args.model_path),
        "codec_dtype": "float32",
        "songs_decoded": args.count,
        "codes_per_song": args.codes,
        "num_steps": params.num_steps,
        "guidance_scale": params.guidance_scale,
        "repeats": args.repeats,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'path':16} {'threads':>7} {'songs':>5} {'median s':>9} {'windows/s':>9}  output")
    for run in runs:
        print(
            f"{run['path']:16} {run['threads']:7} {run['songs']:5} {run['median_s']:9.2f} "
            f"{run['windows_per_s']:9.3f}  {','.join(run['output_sha256'])}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
