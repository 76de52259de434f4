"""What bench times, each through the product's own path: an LM song or a batch of songs through
the song runner (runtime/runner.py) with a given engine, the codec, a streamed song; and the
bytes one LM step must read."""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from heartmula_rt.config import WINDOW
from heartmula_rt.memory.sizing import module_bytes
from heartmula_rt.model import lm
from heartmula_rt.model.codec import HeartCodec
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.engine import Engine, StaticEngine
from heartmula_rt.runtime.loader import prepare_codec
from heartmula_rt.runtime.pipeline import Pipeline
from heartmula_rt.runtime.runner import run_songs
from heartmula_rt.runtime.scheduler import SongRun
from heartmula_rt.runtime.stream import SongStream


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_gbps(device: torch.device, repeats: int = 10, copies: int = 4) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus written: what a frame that only
    streams its weights once could reach. Median over `repeats` timings of `copies` copies."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):  # two warm-ups: first touch of the pages, clocks ramping up
        sync(device)
        start = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * nbytes * copies / statistics.median(times) / 1e9


def _bytes(weight: nn.Module | Tensor) -> int:
    """A plain Parameter's bytes, or its quantized replacement module's."""
    if isinstance(weight, nn.Module):
        return module_bytes(weight)
    return weight.numel() * weight.element_size()


def lm_bytes_per_frame(model: HeartMuLa, kv_positions: int, rows: int) -> int:
    """Bytes one decode frame must read, with `kv_positions` backbone positions cached.

    The backbone reads each weight once (of the audio embeddings only a frame's n rows; the text
    embeddings not at all) and its cache; codebook 0's head is read once; the depth decoder and
    its input projection run once per codebook 1..n-1, reading their weights every time, and each
    of those codebooks reads its own slice of the audio head.
    """
    cfg = model.config
    n, bb, dec = cfg.audio_num_codebooks, cfg.backbone, cfg.decoder
    emb = model.audio_embeddings
    weights = (
        module_bytes(model.backbone)
        + module_bytes(emb) * n // emb.num_embeddings
        + module_bytes(model.codebook0_head)
        + (n - 1) * (module_bytes(model.decoder) + module_bytes(model.projection))
        + _bytes(model.audio_head)
    )
    # Keys and values, in the activations' dtype; the decoder's step i reads i + 1 positions.
    decoder_positions = sum(i + 1 for i in range(1, n))
    kv_per_position = 2 * rows * model.text_embeddings.weight.element_size()
    kv = kv_per_position * (
        bb.num_layers * bb.num_kv_heads * bb.head_dim * kv_positions
        + dec.num_layers * dec.num_kv_heads * dec.head_dim * decoder_positions
    )
    return weights + kv


def lm_bytes_per_step(model: HeartMuLa, row_positions: Sequence[int]) -> int:
    """Bytes one batch step must read where each row reads its backbone keys and values only up
    to its own position (`row_positions`, one per row: the split-key decode attention of
    `kernels.decode_attention`), the weights once for all rows."""
    weights = lm_bytes_per_frame(model, 0, 0)
    return weights + sum(lm_bytes_per_frame(model, p, 1) - weights for p in row_positions)


def reads_to_position(engine: Engine) -> bool:
    """Whether `engine`'s steps read each row's cache only up to its position (the static
    engine where the split-key kernel runs), not every cached position of the step."""
    return isinstance(engine, StaticEngine) and engine.device.type in lm.SPLIT_DECODE_DEVICES


def frame_launches(model: HeartMuLa, quant: str, cfg: bool) -> int | None:
    """Kernel launches of one static-engine frame of an LM like `model` (its config, dtype and
    `quant`) as a pipeline loads it on its device (merged projections; on a GPU the fused
    layers and the split-key attention), counted on the meta device (`runtime.launches`); None
    where the count cannot run (no triton: the static engine's sampler)."""
    try:
        from heartmula_rt.model.fused import use_fused_layers
        from heartmula_rt.quant import quantize_model
        from heartmula_rt.runtime.launches import count_frame_launches
    except ImportError:
        return None
    gpu = model.device.type == "cuda"
    with torch.device("meta"):
        meta = HeartMuLa(model.config).to(model.audio_embeddings.weight.dtype)
    quantize_model(lm.merge_projections(meta), quant)
    if gpu:
        use_fused_layers(meta)
    try:
        return count_frame_launches(meta, cfg=cfg, gpu=gpu).total
    except ImportError:
        return None


def timed_generate(
    pipe: Pipeline, engine: Engine, prompt: Prompt, sampling: SamplingParams
) -> tuple[Tensor, float, float]:
    """(frames, prefill seconds, decode seconds) of one song alone in its rows through the song
    runner, as `gen` makes it; prefill ends at on_frame(1)."""
    device, prefill_end = pipe.device, math.nan

    def on_frame(n: int) -> None:
        nonlocal prefill_end
        if n == 1:
            sync(device)
            prefill_end = time.perf_counter()

    sync(device)
    start = time.perf_counter()
    run = SongRun(prompt, sampling, on_frame=on_frame)
    (frames,) = run_songs(pipe, [run], run.rows, one_song=True, engine=engine)
    sync(device)
    return frames, prefill_end - start, time.perf_counter() - prefill_end


def time_codec(
    codec: HeartCodec, frames: Tensor, device: torch.device, *, seed: int, repeats: int
) -> list[float]:
    """Seconds to decode `frames` as the pipeline does, after one warm-up window."""
    codec.detokenize(frames[:, :WINDOW], generator=torch.Generator().manual_seed(seed))
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        codec.detokenize(frames, generator=torch.Generator().manual_seed(seed))
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def codec_variant(base: HeartCodec, mode: str, device: torch.device) -> HeartCodec:
    """The float32 `base` at codec dtype `mode` (a copy unless float32), prepared as a loaded
    pipeline prepares its codec (`pipeline.prepare_codec`)."""
    codec = base if mode == "float32" else copy.deepcopy(base)
    return prepare_codec(codec, mode, device)


def snr_db(x: Tensor, reference: Tensor) -> float:
    return 10 * math.log10(reference.pow(2).sum() / (x - reference).pow(2).sum())


def bench_codec_dtypes(
    codec32: HeartCodec, frames: Tensor, device: torch.device, *, seed: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Per codec dtype: decode time of `frames`, peak memory, and the waveform's SNR against
    float32's (same weights: the bfloat16 variants are made from the float32 codec)."""
    results, reference = {}, None
    for mode in ("float32", "mixed", "bfloat16"):
        codec = codec_variant(codec32, mode, device)
        reset_peak(device)
        times = time_codec(codec, frames, device, seed=seed, repeats=repeats)
        peak = peak_vram_gib(device)
        wav = codec.detokenize(frames, generator=torch.Generator().manual_seed(seed))
        reference = wav if reference is None else reference
        results[mode] = {
            "codec_s": statistics.median(times),
            "snr_db": None if mode == "float32" else snr_db(wav, reference),
            "peak_vram_gib": peak,
            "raw_codec_s": times,
        }
        print(f"codec {mode}: {results[mode]['codec_s']:.2f} s", file=sys.stderr)
        del codec, wav
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def time_stream(
    pipe: Pipeline, engine: Engine, codec: HeartCodec, prompt: Prompt, sampling: SamplingParams
) -> tuple[float, float]:
    """(seconds to the first audio, seconds to the last) of one streamed song, every frame of
    the budget made (`stop_at_eos=False`, as the LM timings)."""
    sync(pipe.device)
    start = time.perf_counter()
    stream = SongStream(
        pipe,
        prompt,
        sampling,
        generator=torch.Generator().manual_seed(sampling.seed),
        engine=engine,
        codec=codec,
    )
    for _ in stream:
        pass
    return stream.first_audio_s, time.perf_counter() - start


def greedy_agreement(frames: Tensor, reference: Tensor) -> tuple[float, int | None]:
    """(fraction of tokens equal to the reference's, first frame that differs or None)."""
    same = frames == reference
    differing = (~same).any(dim=0).nonzero()
    return same.double().mean().item(), int(differing[0]) if len(differing) else None


def peak_vram_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed_batch(
    pipe: Pipeline, engine: Engine, prompt: Prompt, sampling: SamplingParams, songs: int
) -> tuple[list[float], float]:
    """(each song's prefill seconds, decode seconds) of `songs` songs of `prompt` run together
    through the song runner (seeds `seed`, `seed + 1`, …), every one admitted at the start: the
    songs' prefills run one after another, each its own prompt's length, and decoding starts
    after the last one."""
    device, firsts = pipe.device, []

    def on_frame(made: int) -> None:
        if made == 1:
            sync(device)
            firsts.append(time.perf_counter())

    runs = [
        SongRun(prompt, replace(sampling, seed=sampling.seed + i), on_frame=on_frame)
        for i in range(songs)
    ]
    sync(device)
    start = time.perf_counter()
    run_songs(pipe, runs, songs * sampling.cfg_rows, engine=engine)
    sync(device)
    end = time.perf_counter()
    prefills = [b - a for a, b in zip([start, *firsts], firsts, strict=False)]
    return prefills, end - firsts[-1]


def cache_positions(engine: Engine, positions: int) -> int:
    """The cache positions `engine` keeps (and a batch of several songs reads every step) for
    songs needing `positions`: the static engine rounds its capacity up."""
    return engine.capacity_for(positions) if isinstance(engine, StaticEngine) else positions


