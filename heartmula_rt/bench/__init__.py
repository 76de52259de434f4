"""`heartmula-rt bench`: LM frames/s, codec time and end-to-end RTF of each engine, as JSON.

One invocation measures the engines it is given side by side, on one model and one prompt, and
writes one results file (fields: benchmarks/README.md). Each LM run makes every frame of the
budget (`stop_at_eos=False`: random weights sample EOS early), so runs are comparable; the codec
does not depend on the engine and is timed once, on the first engine's frames.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from heartmula_rt.bench.results import (
    ResultsFile,
    Save,
    format_table,
    results_dir,
    results_of,
    write_results,
)
from heartmula_rt.bench.timing import (
    bench_codec_dtypes,
    cache_positions,
    codec_variant,
    frame_launches,
    greedy_agreement,
    lm_bytes_per_frame,
    lm_bytes_per_step,
    measure_copy_gbps,
    peak_vram_gib,
    reads_to_position,
    reset_peak,
    sync,
    time_codec,
    time_stream,
    timed_batch,
    timed_generate,
)
from heartmula_rt.config import DEFAULT_PROMPT_LEN, WINDOW, default_bench_dir
from heartmula_rt.errors import UserError
from heartmula_rt.memory.planner import GiB, parse_vram
from heartmula_rt.memory.report import format_plan
from heartmula_rt.memory.sizing import cuda_context_bytes
from heartmula_rt.model.codec.scalar import DECODE_CHUNK, largest_activation_bytes
from heartmula_rt.model.prompt import Prompt
from heartmula_rt.model.synthetic import synthetic_prompt
from heartmula_rt.quant import check_mode
from heartmula_rt.request import FRAME_MS, SamplingParams, SongRequest
from heartmula_rt.runtime.decode import check_length
from heartmula_rt.runtime.engine import (
    ENGINES,
    Engine,
    check_engine,
    check_engine_over_streaming,
    default_engine,
    make_engine,
)
from heartmula_rt.runtime.loader import PipelineConfig, load_pipeline, plan_for
from heartmula_rt.runtime.pipeline import Pipeline

# The prompt of runs on a real checkpoint: the tags and lyrics of a typical short song.
SAMPLE_TAGS = "pop,piano,female vocals,happy,wedding,romantic"
SAMPLE_LYRICS = """[intro]

[verse]
the morning light is spilling through the window on the floor
i hear you humming softly as you're walking through the door
we never had a fortune but we always had a song
and every little moment feels like where we both belong

[chorus]
so hold me in the kitchen while the coffee's getting cold
we'll dance like we are twenty even when we're growing old
and if the world keeps turning faster than we understand
i'll find my way back home to you, i'll always hold your hand

[verse]
the seasons keep on changing and the city keeps on loud
but you can always find me in the quiet of the crowd

[bridge]
la la la, oh, la la la

[outro]
"""


def parse_engines(value: str | None, device: torch.device) -> list[str]:
    """A comma list of engine names (checked by `BenchConfig`); by default the plain engine and
    the device's default one."""
    if value is None:
        value = ",".join(dict.fromkeys(("plain", default_engine(device))))
    return list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))


@dataclass(frozen=True)
class BenchConfig:
    """One `heartmula-rt bench` invocation, checked when made: what it loads (`pipeline`, the
    same config `load_pipeline` takes; one pipeline per quantization mode or budget), what it
    runs, and where the results go."""

    pipeline: PipelineConfig  # quant and vram set per mode or budget
    engines: tuple[str, ...]
    quant_modes: tuple[str, ...] = ("none",)
    vram_budgets: tuple[str, ...] = ()  # one pipeline planned per budget, one file each
    sampling: SamplingParams = SamplingParams(seed=0, stop_at_eos=False)
    prompt_len: int | None = None  # synthetic models: random prompt ids (DEFAULT_PROMPT_LEN)
    repeats: int = 3
    warmup: int = 1
    codec_repeats: int = 1
    codec: bool = True
    greedy_frames: int = 0
    batch_sizes: tuple[int, ...] = ()  # songs at once, each measured beside one song alone
    out_dir: Path = dataclasses.field(default_factory=default_bench_dir)  # the user's cache
    name: str | None = None

    def __post_init__(self) -> None:
        for flag, value, least in (
            ("--repeats", self.repeats, 1),
            ("--warmup", self.warmup, 0),
            ("--codec-repeats", self.codec_repeats, 1),
            ("--greedy-frames", self.greedy_frames, 0),
        ):
            if value < least:
                raise UserError(f"{flag} must be at least {least}, not {value}")
        if self.sampling.max_frames < 1:
            raise UserError(f"--max-seconds must allow one frame ({FRAME_MS / 1000} s) at least")
        if self.sampling.seed is None:
            raise UserError("a benchmark needs a seed: every run samples the same way")
        if not self.engines:
            raise UserError(f"--engines names no engine; use a comma list of {', '.join(ENGINES)}")
        for name in self.engines:
            check_engine(name, self.pipeline.torch_device)
        for mode in self.quant_modes:
            replace(self.pipeline, quant=mode)  # each mode's pipeline checked now
        if self.pipeline.model_path is not None and self.prompt_len is not None:
            raise UserError(
                "--prompt-len is for --synthetic models; a checkpoint's prompt is fixed"
            )
        if any(b < 1 for b in self.batch_sizes):
            raise UserError(f"--batch takes songs at once of 1 or more, not {self.batch_sizes}")
        if self.prompt_len is not None and self.prompt_len < 1:
            raise UserError(f"the prompt length must be at least 1, not {self.prompt_len}")
        if self.vram_budgets:
            if self.batch_sizes:
                raise UserError("--batch is measured without --vram: give one or the other")
            if self.quant_modes != ("none",):
                raise UserError("--vram plans the quantization itself: leave out --quant")
            if self.pipeline.torch_device.type != "cuda":
                raise UserError("--vram budgets GPU memory: bench it on a CUDA device")
            if self.pipeline.codec_device != self.pipeline.device:
                raise UserError(
                    "bench --vram measures one GPU's plans (a comma list of budgets): leave out "
                    "--codec-device"
                )
            for budget in self.vram_budgets:
                parse_vram(budget)

    def for_quant(self, quant: str) -> PipelineConfig:
        """The pipeline of one quantization mode; its engine the first one benchmarked."""
        return replace(self.pipeline, quant=quant, engine=self.engines[0])

    def for_budget(self, budget: str) -> PipelineConfig:
        """The pipeline of one budget, planned for songs as long as the benchmark's."""
        # Half a frame more, so that rounding cannot lose one (max_frames_for rounds down).
        seconds = (self.sampling.max_frames + 0.5) * FRAME_MS / 1000
        return replace(self.pipeline, vram=budget, engine=self.engines[0], max_seconds=seconds)


def bench_prompt(pipe: Pipeline, config: BenchConfig) -> Prompt:
    """Random ids of `prompt_len` (DEFAULT_PROMPT_LEN) for synthetic models; for a checkpoint
    the prompt of a built-in short song."""
    if pipe.config.synthetic is not None:
        length = DEFAULT_PROMPT_LEN if config.prompt_len is None else config.prompt_len
        return synthetic_prompt(length, pipe.lm_config.text_vocab_size)
    return pipe.prompt(SongRequest(SAMPLE_TAGS, SAMPLE_LYRICS, config.sampling))


@dataclass
class LMTiming:
    """One engine's LM measurements: counted runs only, peak memory over all of them."""

    frames: Tensor  # of the last run
    prefill_s: list[float]
    decode_s: list[float]
    peak_vram_gib: float | None
    greedy: tuple[float | None, int | None] = (None, None)


def _time_lm(
    pipe: Pipeline, engine: Engine, prompt: Prompt, config: BenchConfig
) -> tuple[Tensor, list[float], list[float]]:
    """The last run's frames and each counted run's prefill and decode seconds: `warmup`
    runs, then `repeats` counted ones, with the benchmark's sampling settings."""
    prefill_s, decode_s = [], []
    for i in range(config.warmup + config.repeats):
        frames, prefill, decode = timed_generate(pipe, engine, prompt, config.sampling)
        what = "warm-up" if i < config.warmup else f"run {i - config.warmup + 1}/{config.repeats}"
        fps = (frames.shape[1] - 1) / decode
        print(f"{engine.name} {what}: {fps:.2f} frames/s", file=sys.stderr)
        if i >= config.warmup:
            prefill_s.append(prefill)
            decode_s.append(decode)
    return frames, prefill_s, decode_s


def _time_batch(
    pipe: Pipeline, engine: Engine, prompt: Prompt, config: BenchConfig, songs: int
) -> tuple[list[float], list[float]]:
    """Each counted run's median prefill of one song and decode seconds of `songs` songs at
    once (`warmup` runs first, not counted)."""
    prefill_s, decode_s = [], []
    frames = songs * config.sampling.max_frames
    for i in range(config.warmup + config.repeats):
        prefills, decode = timed_batch(pipe, engine, prompt, config.sampling, songs)
        what = "warm-up" if i < config.warmup else f"run {i - config.warmup + 1}/{config.repeats}"
        print(
            f"{engine.name} {songs} songs {what}: {frames / decode:.2f} frames/s in all",
            file=sys.stderr,
        )
        if i >= config.warmup:
            prefill_s.append(statistics.median(prefills))
            decode_s.append(decode)
    return prefill_s, decode_s


def _greedy(engine: Engine, prompt: Prompt, config: BenchConfig) -> Tensor:
    greedy = replace(config.sampling, max_frames=config.greedy_frames, topk=1)
    return engine.generate_frames(prompt, greedy)


def _record(
    engine: str,
    lm: LMTiming,
    settings: dict[str, Any],
    *,
    bytes_per_frame: int,
    copy_gbps: float,
    codec_s: list[float],
    codec_peak: float | None,
    vram_budget_gib: float | None = None,
    songs: int = 1,
    launches: int | None = None,
) -> dict[str, Any]:
    """One run's JSON object, fields in the order of benchmarks/README.md: one song, or
    `songs` songs at once (then `bytes_per_frame` is what one frame of every song reads, and
    `launches` the kernel launches of that step)."""
    frames = lm.frames.shape[1]
    decode = statistics.median(lm.decode_s)
    prefill = statistics.median(lm.prefill_s)
    fps = songs * (frames - 1) / decode
    codec = statistics.median(codec_s) if codec_s else None
    e2e = None if codec is None else prefill + decode + codec
    peaks = [p for p in (lm.peak_vram_gib, codec_peak) if p is not None]
    return {
        "name": "-".join(
            [engine, settings["dtype"]]
            + [settings["quant"]] * (settings["quant"] != "none")
            + [f"x{songs}"] * (songs > 1)
        ),
        "engine": engine,
        **settings,
        "songs": songs,
        "rows": songs * settings["cfg_rows"],
        "frames": frames,
        "prefill_ms": prefill * 1000,
        "lm_frames_per_s": fps,
        "song_frames_per_s": fps / songs,
        "batch_speedup": None,
        "ms_per_frame": 1000 * songs / fps,
        "bytes_per_frame": bytes_per_frame,
        "achieved_gbps": bytes_per_frame * fps / songs / 1e9,
        "copy_gbps": copy_gbps,
        "floor_ms_per_frame": bytes_per_frame / copy_gbps / 1e6,
        # How far from the bandwidth floor (bytes / copy bandwidth) a step runs: on a GPU only,
        # where a decode step is bound by reading its bytes.
        "floor_ratio": (
            1000 * songs / fps / (bytes_per_frame / copy_gbps / 1e6)
            if settings.get("device_type") == "cuda"
            else None
        ),
        "launches_per_frame": launches,
        "codec_s": codec,
        "e2e_s": e2e,
        "e2e_rtf": None if e2e is None else e2e / (frames * FRAME_MS / 1000),
        "ttfa_s": None,
        "stream_s": None,
        "peak_vram_gib": max(peaks) if peaks else None,
        "vram_budget_gib": vram_budget_gib,
        "greedy_agreement": lm.greedy[0],
        "greedy_first_mismatch": lm.greedy[1],
        "raw_decode_s": lm.decode_s,
        "raw_prefill_s": lm.prefill_s,
        "raw_codec_s": codec_s,
    }


def parse_quant_modes(value: str) -> list[str]:
    """`--quant none,int8,int4`: each mode once, measured side by side in one run."""
    modes = [m.strip() for m in value.split(",") if m.strip()]
    if not modes:
        raise UserError("--quant needs at least one mode")
    for mode in modes:
        check_mode(mode)
    if len(set(modes)) != len(modes):
        raise UserError(f"--quant names a mode twice: {value}")
    return modes


def parse_batch_sizes(value: str | None) -> tuple[int, ...]:
    """`--batch 1,2,4,8`: songs at once, each size once, in the order given."""
    if value is None:
        return ()
    sizes = []
    for part in (p.strip() for p in value.split(",")):
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"--batch takes a comma list of song counts of 1 or more, not {value}")
        sizes.append(int(part))
    return tuple(dict.fromkeys(sizes))


def _settings(config: BenchConfig, pipe: PipelineConfig, quant: str, prompt_len: int):
    """The settings every run of a file records (benchmarks/README.md)."""
    sampling = config.sampling
    return {
        "quant": quant,
        "dtype": pipe.dtype,
        "codec_dtype": pipe.codec_dtype,
        "cfg_rows": sampling.cfg_rows,
        "cfg_scale": sampling.cfg_scale,
        "topk": sampling.topk,
        "temperature": sampling.temperature,
        "max_seconds": sampling.max_frames * FRAME_MS / 1000,
        "prompt_len": prompt_len,
        "device_type": pipe.torch_device.type,
    }


def run_bench(config: BenchConfig) -> int:
    """Every run `config` asks for, one results file per quantization sweep or budget."""
    out_dir = results_dir(config.out_dir)
    torch.set_num_threads(config.pipeline.threads)
    if config.vram_budgets:
        return _bench_budgets(config, out_dir)
    device = config.pipeline.torch_device
    runs, codec_dtypes, model_name = [], None, ""
    default_name = (
        f"synthetic-{config.pipeline.synthetic}"
        if config.pipeline.model_path is None
        else config.pipeline.model_path.name
    )
    results = ResultsFile(out_dir, config.name or default_name)

    def save(more: list[dict[str, Any]], codec: dict[str, Any] | None) -> Path:
        result = results_of(device, model_name, runs + more)
        result["codec"] = codec_dtypes or codec
        return results.write(result)

    for i, quant in enumerate(config.quant_modes):
        # The codec in float32: the other codec dtypes are made from it (`codec_variant`).
        pipe = load_pipeline(replace(config.for_quant(quant), codec_dtype="float32"))
        model_name = _model_name(pipe)
        prompt = bench_prompt(pipe, config)
        settings = _settings(config, config.pipeline, quant, len(prompt))
        mode_runs, codec = _bench_quant_mode(
            config, pipe, prompt, settings, first=i == 0, save=save
        )
        runs += mode_runs
        codec_dtypes = codec_dtypes or codec
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = save([], None)
    print(format_table(runs))
    print(f"wrote {path}", file=sys.stderr)  # stdout: the table only
    return 0


def _model_name(pipe: Pipeline) -> str:
    c = pipe.config
    return f"synthetic {c.synthetic}" if c.model_path is None else str(c.model_path)


def _bench_quant_mode(
    config: BenchConfig,
    pipe: Pipeline,
    prompt: Prompt,
    settings: dict[str, Any],
    *,
    first: bool,
    save: Save,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One quantization mode's runs (one per engine), and, for the first mode only, the codec
    measurements (the codec does not depend on the LM's quantization): its per-dtype results
    and each engine's streamed song. `save` gets the mode's runs once its single songs are
    measured and again after each batch size."""
    device, sampling = pipe.device, config.sampling
    check_length(pipe.lm, prompt, max(sampling.max_frames, config.greedy_frames))
    engines = {pipe.engine.name: pipe.engine}  # the first one: the pipeline's own
    for name in config.engines[1:]:
        engines[name] = make_engine(name, pipe.lm, pipe.gen_config)
    reference = None
    if config.greedy_frames:
        plain = engines.get("plain") or make_engine("plain", pipe.lm, pipe.gen_config)
        reference = _greedy(plain, prompt, config)

    timings: dict[str, LMTiming] = {}
    for name, engine in engines.items():
        reset_peak(device)
        frames, prefill_s, decode_s = _time_lm(pipe, engine, prompt, config)
        peak = peak_vram_gib(device)
        greedy = (None, None)
        if reference is not None:
            greedy = greedy_agreement(_greedy(engine, prompt, config), reference)
        timings[name] = LMTiming(frames, prefill_s, decode_s, peak, greedy)

    codec_s, codec_peak, codec_dtypes, streams = [], None, None, {}
    if first and config.codec:
        frames = next(iter(timings.values())).frames
        codec_dtypes = bench_codec_dtypes(
            pipe.codec, frames, device, seed=sampling.seed, repeats=config.codec_repeats
        )
        codec_mode = config.pipeline.codec_dtype
        codec_s = codec_dtypes[codec_mode]["raw_codec_s"]
        codec_peak = codec_dtypes[codec_mode]["peak_vram_gib"]
        codec = codec_variant(pipe.codec, codec_mode, device)
        # Only the warm-up window (graph capture), as a loaded pipeline has done it once.
        time_codec(codec, frames, device, seed=0, repeats=0)
        for name, engine in engines.items():
            streams[name] = time_stream(pipe, engine, codec, prompt, sampling)
            print(f"{name} streamed: first audio after {streams[name][0]:.2f} s", file=sys.stderr)

    rows, p = settings["cfg_rows"], len(prompt)
    # The exact mean over the song: bytes grow linearly with the cached positions.
    bytes_per_frame = round(
        (
            lm_bytes_per_frame(pipe.lm, p + 1, rows)
            + lm_bytes_per_frame(pipe.lm, p + sampling.max_frames, rows)
        )
        / 2
    )
    copy_gbps = measure_copy_gbps(device)
    launches = frame_launches(pipe.lm, settings["quant"], cfg=rows == 2)
    runs = [
        _record(
            name,
            lm,
            settings,
            bytes_per_frame=bytes_per_frame,
            copy_gbps=copy_gbps,
            codec_s=codec_s,
            codec_peak=codec_peak,
            launches=launches,
        )
        for name, lm in timings.items()
    ]
    for run in runs:
        run["ttfa_s"], run["stream_s"] = streams.get(run["engine"], (None, None))
    codec_result = None if codec_dtypes is None else _codec_result(pipe, codec_dtypes)
    save(runs, codec_result)
    if config.batch_sizes:
        runs = _batch_runs(
            config,
            pipe,
            engines,
            timings,
            runs,
            prompt,
            settings,
            copy_gbps,
            lambda done: save(done, codec_result),
        )
    return runs, codec_result


def _batch_runs(
    config: BenchConfig,
    pipe: Pipeline,
    engines: dict[str, Engine],
    timings: dict[str, LMTiming],
    singles: list[dict[str, Any]],
    prompt: Prompt,
    settings: dict[str, Any],
    copy_gbps: float,
    save: Callable[[list[dict[str, Any]]], Path],
) -> list[dict[str, Any]]:
    """`--batch`: per engine, its one-song run (the product's path for one song) and then
    `songs` songs at once for every other size, side by side, each with its speed-up over
    the one song; `save` gets every run so far after each size."""
    runs = []
    for i, (single, (name, engine)) in enumerate(zip(singles, engines.items(), strict=True)):
        single["batch_speedup"] = 1.0
        runs.append(single)
        device = engine.model.device
        for songs in config.batch_sizes:
            if songs == 1:
                continue
            reset_peak(device)
            prefill_s, decode_s = _time_batch(pipe, engine, prompt, config, songs)
            timing = LMTiming(timings[name].frames, prefill_s, decode_s, peak_vram_gib(device))
            positions = len(prompt) + config.sampling.max_frames
            rows = songs * settings["cfg_rows"]
            # Every step of a batch of several songs reads its whole cache (scheduler.py),
            # unless the split-key attention reads each row only up to its position: then the
            # exact mean over the songs (made side by side, from the same prompt length).
            bytes_per_frame = lm_bytes_per_frame(
                engine.model, cache_positions(engine, positions), rows
            )
            if reads_to_position(engine):
                first = lm_bytes_per_step(engine.model, [len(prompt) + 1] * rows)
                last = lm_bytes_per_step(engine.model, [positions] * rows)
                bytes_per_frame = round((first + last) / 2)
            run = _record(
                name,
                timing,
                settings,
                bytes_per_frame=bytes_per_frame,
                copy_gbps=copy_gbps,
                codec_s=[],
                codec_peak=None,
                songs=songs,
                launches=single.get("launches_per_frame"),  # the same ops for any rows
            )
            run["batch_speedup"] = run["lm_frames_per_s"] / single["lm_frames_per_s"]
            runs.append(run)
            save(runs + singles[i + 1 :])
    return runs


def _codec_result(pipe: Pipeline, dtypes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results file's `codec` object (benchmarks/README.md)."""
    history, ahead = pipe.codec.scalar_model.context()
    chunk_frames = DECODE_CHUNK + history + ahead
    return {
        "decode_chunk": DECODE_CHUNK,
        "scalar_largest_activation_bytes": largest_activation_bytes(
            pipe.codec_config, chunk_frames
        ),
        "scalar_largest_activation_bytes_unchunked": largest_activation_bytes(
            pipe.codec_config, 2 * WINDOW
        ),
        "dtypes": dtypes,
    }


def _bench_budgets(config: BenchConfig, out_dir: Path) -> int:
    """`--vram 4G,6G,...`: per budget, the pipeline `load_pipeline` makes for it (its models
    placed as the plan says) with the budget enforced from before it loads
    (`set_per_process_memory_fraction`), one results file (first engine only)."""
    if config.pipeline.model_path is not None:
        raise UserError("--vram plans synthetic models: leave out --model-path")
    device = config.pipeline.torch_device
    total = torch.cuda.get_device_properties(device).total_memory
    # Every budget's plan first: one that cannot run is refused before any model is made.
    plans = [plan_for(config.for_budget(b)) for b in config.vram_budgets]
    for plan in plans:
        check_engine_over_streaming(config.engines[0], plan.offloaded_lm_layers)
    sampling = config.sampling
    for budget, plan in zip(config.vram_budgets, plans, strict=True):
        print(format_plan(plan), file=sys.stderr)
        context = cuda_context_bytes(device)
        torch.cuda.set_per_process_memory_fraction((plan.budget_bytes - context) / total, device)
        try:
            pipe = load_pipeline(config.for_budget(budget))
            prompt = bench_prompt(pipe, config)
            reset_peak(device)
            frames, prefill_s, decode_s = _time_lm(pipe, pipe.engine, prompt, config)
            pipe.decode_frames(frames[:, :WINDOW], seed=sampling.seed)  # warm-up: one window
            codec_s = []
            for _ in range(config.codec_repeats):
                sync(device)
                start = time.perf_counter()
                pipe.decode_frames(frames, seed=sampling.seed)
                sync(device)
                codec_s.append(time.perf_counter() - start)
            # Both phases' peak, plus the CUDA context the allocator does not see, read again
            # now: kernels loaded since the probe count, as the plan's headroom assumes.
            context_after = cuda_context_bytes(device)
            peak = peak_vram_gib(device) + context_after / GiB
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        plan = pipe.plan
        settings = _settings(config, pipe.config, plan.quant, len(prompt))
        bytes_per_frame = lm_bytes_per_frame(
            pipe.lm, len(prompt) + sampling.max_frames // 2, settings["cfg_rows"]
        )
        timing = LMTiming(frames, prefill_s, decode_s, peak)
        run = _record(
            config.engines[0],
            timing,
            settings,
            bytes_per_frame=bytes_per_frame,
            copy_gbps=measure_copy_gbps(device),
            codec_s=codec_s,
            codec_peak=None,
            vram_budget_gib=plan.budget_bytes / GiB,
        )
        run["plan"] = format_plan(plan)
        run["predicted_peak_gib"] = plan.predicted_peak_bytes / GiB
        run["headroom_gib"] = plan.headroom_bytes / GiB
        run["overheads"] = dataclasses.asdict(plan.overheads)
        run["cuda_context_after_gib"] = context_after / GiB
        result = results_of(device, _model_name(pipe), [run])
        path = write_results(out_dir, f"vram-{plan.budget_bytes / GiB:g}G", result)
        print(format_table([run]))
        print(f"wrote {path}", file=sys.stderr)  # stdout: the table only
        del pipe, timing, frames  # this budget's models leave the GPU
        torch.cuda.empty_cache()
    return 0
