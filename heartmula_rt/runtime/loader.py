"""Loading a pipeline: `PipelineConfig` (how: where the weights come from, devices, dtypes,
engine, quantization, a `--vram` budget, LoRA adapters), checked when made, and `load_pipeline`,
which reads the weights (quantized while loading), places the models as a plan says, and
returns the `Pipeline` (pipeline.py)."""


from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from heartmula_rt.config import (
    LM_DTYPES,
    LM_PRESETS,
    LMConfig,
    default_codec_dtype,
    default_dtype,
)
from heartmula_rt.errors import UserError
from heartmula_rt.memory.placement import Placement
from heartmula_rt.memory.planner import (
    DEFAULT_OVERHEADS,
    MemoryPlan,
    checkpoint_configs,
    device_budgets,
    dtype_name,
    plan_memory,
    preset_configs,
)
from heartmula_rt.memory.sizing import measure_overheads
from heartmula_rt.model import checkpoint, folder
from heartmula_rt.model.codec import CODEC_DTYPES, HeartCodec, check_codec_dtype
from heartmula_rt.model.folder import CODEC_DIR, LM_DIR
from heartmula_rt.model.fused import use_fused_layers
from heartmula_rt.model.lm import merge_projections
from heartmula_rt.model.lora import LoraAdapter, LoraSpec, load_loras, merge_lora, parse_lora_spec
from heartmula_rt.model.lora_rows import apply_lora_rows, lora_rows_bytes
from heartmula_rt.model.synthetic import Models, synthetic_models
from heartmula_rt.quant import check_mode, quantize_model
from heartmula_rt.quant.cache import load_quantized_lm
from heartmula_rt.quant.fast import check_fast_path, use_fast_kernels
from heartmula_rt.request import (
    DEFAULT_MAX_SECONDS,
    check_songs,
    max_frames_for,
)
from heartmula_rt.runtime.engine import (
    check_engine,
    check_engine_over_streaming,
    default_engine,
    make_engine,
)
from heartmula_rt.runtime.pipeline import Pipeline, check_streamable

DTYPES = {name: getattr(torch, name) for name in LM_DTYPES}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UserError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    """`auto` (the default everywhere): the first CUDA GPU if torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def _same_gpu(a: torch.device, b: torch.device) -> bool:
    """Whether two CUDA devices are one GPU, "cuda" being torch's default, cuda:0."""
    return a.type == b.type == "cuda" and (a.index or 0) == (b.index or 0)


def resolve_threads(threads: int | None = None) -> int:
    """The CPU threads torch's ops get: `threads`, or by default one fewer than the cores this
    process may run on (its affinity mask, which containers and `taskset` narrow), at least 1
    and at most torch's own count in the calling thread (OMP_NUM_THREADS or
    `torch.set_num_threads` is kept). Every op of a team of threads ends at a barrier, and one
    core taken by another process makes every barrier wait for the scheduler (a one-window
    decode beside a busy process: 1.4 s on 1 thread, 3.6 s on 2 of 2 cores); a core left free
    avoids that."""
    if threads is None:
        return max(1, min(len(os.sched_getaffinity(0)) - 1, torch.get_num_threads()))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be a whole number of at least 1, not {threads!r}")
    return threads


@dataclass(frozen=True)
class PipelineConfig:
    """How to load a pipeline: where the weights come from and how the models run.

    Checked when made, and every field then holds what will be used: `device` "auto" becomes
    "cuda" or "cpu", the dtypes, engine and threads left out become the device's defaults.
    These defaults are the only ones (`load_pipeline`, the CLI and `bench` all make one).
    """

    model_path: Path | None = None  # a checkpoint folder in the official layout (SPEC §1)
    synthetic: str | None = None  # or: random weights of this LM_PRESETS size, made on device
    device: str = "auto"  # auto: the first CUDA GPU if torch sees one, else the CPU
    codec_device: str | None = None  # the codec's, if not `device` (the LM's): frames cross once
    dtype: str | None = None  # LM weights: bfloat16 on a GPU, float32 on the CPU
    codec_dtype: str | None = None  # codec.CODEC_DTYPES: mixed on a GPU, float32 on the CPU
    engine: str | None = None  # engine.ENGINES: graph on a GPU, plain on the CPU
    quant: str = "none"  # quant.QUANT_MODES
    # A GPU memory budget ("12G"; with the codec on a GPU of its own, each one's, or "12G,8G":
    # the LM's, then the codec's): the planner chooses the rest.
    vram: str | None = None
    max_seconds: float = DEFAULT_MAX_SECONDS  # the longest song a `vram` plan makes room for
    stream: bool = False  # the pipeline will stream: a plan that cannot is refused at load
    songs: int = 1  # songs at once (`generate_frames_batch`) a `vram` plan makes room for
    threads: int | None = None  # torch's CPU threads (resolve_threads)
    # LoRA adapters, "[NAME=]PATH[:SCALE]" (`lora.parse_lora_spec`) or `LoraSpec`s: merged into
    # the LM's weights before quantization (docs/lora.md), or with `lora_per_song` run per LM
    # row, each song choosing one by NAME (`SongRequest.lora`; serve) or none.
    lora: tuple[str | Path | LoraSpec, ...] = ()
    lora_per_song: bool = False

    def __post_init__(self) -> None:
        if (self.model_path is None) == (self.synthetic is None):
            raise UserError(
                "give one of a checkpoint folder (model_path) and a synthetic model size"
            )
        if self.synthetic is not None and self.synthetic not in LM_PRESETS:
            raise UserError(
                f"unknown model preset {self.synthetic!r}; use one of {', '.join(LM_PRESETS)}"
            )
        device = parse_device(self.device)
        engine = default_engine(device) if self.engine is None else self.engine
        check_engine(engine, device)
        check_mode(self.quant)
        check_fast_path(self.quant, device)
        max_frames_for(self.max_seconds)
        check_songs(self.songs)
        codec_device = device if self.codec_device is None else parse_device(self.codec_device)
        if _same_gpu(codec_device, device):  # "cuda" and "cuda:0" are one device
            codec_device = device
        if self.vram is not None:
            if device.type != "cuda":
                raise UserError(f"--vram budgets GPU memory; the device {device} is not a CUDA GPU")
            if self.quant != "none":
                raise UserError("--vram chooses the quantization itself: leave out --quant")
            _vram_budgets(self.vram, device, codec_device)
        resolved = {
            "model_path": None if self.model_path is None else Path(self.model_path),
            "device": str(device),
            "codec_device": str(codec_device),
            "dtype": dtype_name(parse_dtype(self.dtype or default_dtype(device))),
            "codec_dtype": check_codec_dtype(self.codec_dtype or default_codec_dtype(codec_device)),
            "engine": engine,
            "threads": resolve_threads(self.threads),
            "lora": tuple(
                parse_lora_spec(s)
                for s in ((self.lora,) if isinstance(self.lora, str | Path) else self.lora or ())
            ),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_codec_device(self) -> torch.device:
        return torch.device(self.codec_device)

    @property
    def lm_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def codec_weights_dtype(self) -> torch.dtype:
        """What the codec's DiT blocks load as (the precision mode's first dtype)."""
        return CODEC_DTYPES[self.codec_dtype][0]


def load_pipeline(
    source: str | Path | PipelineConfig,
    *,
    adapters: Sequence[LoraAdapter] | None = None,
    **options: Any,
) -> Pipeline:
    """Load a checkpoint folder in the official layout (SPEC §1), or what a `PipelineConfig`
    says (random weights of a preset size, `synthetic`, for benchmarks and tests).

    `options` are `PipelineConfig`'s fields: `device` (or `lm_device`), the LM's and by default
    the codec's, is `auto` (a CUDA GPU if torch sees one, else the CPU; as `heartmula-rt gen`),
    `cpu`, `cuda` or `cuda:N`; `codec_device` puts the codec on another. `dtype` is the LM's weight
    dtype (bfloat16 on a GPU, float32 on the CPU); `codec_dtype` one of `codec.CODEC_DTYPES`
    (`mixed` on a GPU, `float32` on the CPU); both load tensor by tensor. On a GPU (without a
    `vram` plan, which moves the codec) the codec's estimator is replayed as a CUDA graph.
    `engine` is one of `engine.ENGINES` (graph on a GPU, plain on the CPU). `quant` is one of
    `quant.QUANT_MODES`: the LM is then quantized while it loads, tensor by tensor, so its
    unquantized weights never sit in memory whole, cached for the next load (`quant.cache`),
    and run by the fast kernels the device has (`quant.fast`). On a GPU the LM's norms, RoPE
    and SiLU·mul are the fused twins of `heartmula_rt.model.fused`.

    `vram` ("12G") is a GPU memory budget: the planner (`planner.plan_memory`, for songs of up
    to `max_seconds`) then chooses the quantization and what lives on the GPU, the models load
    on the host and move as planned (`Pipeline.placement`), and `Pipeline.plan` holds the
    plan. `stream=True` says the pipeline will stream (`Pipeline.stream`): a plan that cannot
    is refused before loading.

    `threads` is the number of CPU threads torch's ops use (default: `resolve_threads`, the
    cores the process may run on less one); the pipeline sets it in every thread it runs in, the
    stream's worker included, since torch's count is kept per thread.
    """
    if isinstance(source, PipelineConfig):
        if options:
            raise UserError("give a PipelineConfig or options, not both")
        config = source
    elif not isinstance(source, (str, os.PathLike)) or isinstance(source, bytes):
        raise UserError(
            "load_pipeline takes a checkpoint folder (a str or Path) or a PipelineConfig, not "
            f"{type(source).__name__}"
        )
    else:
        if "lm_device" in options:  # the LM's device by the name that pairs with codec_device
            if "device" in options:
                raise UserError("give device or lm_device (one name of the LM's device), not both")
            options["device"] = options.pop("lm_device")
        config = PipelineConfig(model_path=Path(source), **options)
    torch.set_num_threads(config.threads)  # loading converts tensors on the CPU too
    device = config.torch_device
    if config.model_path is not None:
        folder.check_model_path(config.model_path)
    # Every adapter read and checked against the checkpoint before any weight loads.
    adapters = load_adapters(config) if adapters is None else list(adapters)
    per_row = adapters if config.lora_per_song else []
    plan = None
    if config.vram is not None:
        rows_bytes = lora_rows_bytes(per_row, _lm_config_of(config), config.lm_dtype)
        plan = plan_for(config, rows_bytes) if per_row else plan_for(config)
        check_engine_over_streaming(config.engine, plan.offloaded_lm_layers)
        if config.stream:
            check_streamable(plan)
        if per_row and plan.offloaded_lm_layers:
            raise UserError(
                f"the --vram {plan.budget_bytes / 2**30:g}G plan streams backbone layers from "
                "host memory, which per-song LoRAs cannot run over; give a larger budget, or "
                "load the adapters merged"
            )
    quant = config.quant if plan is None else plan.quant
    load_device = device if plan is None else torch.device("cpu")
    merged = [] if config.lora_per_song else adapters
    if config.model_path is None:
        models = _synthetic(config, quant, load_device, merged)
    else:
        models = _from_checkpoint(config, quant, load_device, merged)
    lm, codec = models.lm, models.codec
    if plan is None:
        codec.to(config.torch_codec_device)  # a no-op where it was loaded
    # A plan moves the codec between host and GPU: no graph captured over its tensors.
    prepare_codec(codec, config.codec_dtype, config.torch_codec_device, graphs=plan is None)
    if plan is None and device.type == "cuda":
        use_fused_layers(lm)
    placement = None
    if plan is not None:
        placement = Placement(plan, device, config.torch_codec_device)
        placement.place_lm(lm)
        placement.place_codec(codec)
    if per_row:  # over the quantized base, its fast kernels and fused layers, where it runs
        apply_lora_rows(lm, per_row, rows=1)
    if models.lm_config.audio_vocab_size <= models.codec_config.codebook_size:
        raise UserError(
            f"LM audio vocabulary {models.lm_config.audio_vocab_size} does not fit codec "
            f"codebook {models.codec_config.codebook_size}: these checkpoints do not belong "
            "together"
        )
    return Pipeline(
        lm=lm,
        lm_config=models.lm_config,
        codec=codec,
        codec_config=models.codec_config,
        tokenizer=models.tokenizer,
        gen_config=models.gen_config,
        config=config,
        engine=make_engine(config.engine, lm, models.gen_config),
        placement=placement,
        adapters=tuple(adapters),
    )


def _lm_config_of(config: PipelineConfig) -> LMConfig:
    """The LM's config, from the checkpoint's config files alone (or the preset's)."""
    if config.model_path is None:
        return preset_configs(config.synthetic)[0]
    return checkpoint_configs(config.model_path)[0]


def load_adapters(config: PipelineConfig) -> list[LoraAdapter]:
    """The LoRA adapters of `config.lora`, each read and checked against the checkpoint's LM
    (its config files alone): all of them, or a one-line refusal and none."""
    if not config.lora:
        return []
    return load_loras(config.lora, _lm_config_of(config))


def prepare_codec(
    codec: HeartCodec, mode: str, device: torch.device, *, graphs: bool = True
) -> HeartCodec:
    """The codec at precision `mode` (`codec.CODEC_DTYPES`) with the fast path a pipeline uses
    on `device`: its estimator replayed as a CUDA graph on a GPU, if `graphs`."""
    codec.set_precision(mode)
    codec.use_fast_path("graph" if graphs and device.type == "cuda" else None)
    return codec


def _from_checkpoint(
    config: PipelineConfig,
    quant: str,
    device: torch.device,
    lora: Sequence[LoraAdapter] = (),
) -> Models:
    """A checkpoint folder's models on `device`, the LM quantized as `quant` says, `lora`'s
    adapters merged into its weights before quantizing."""
    root = config.model_path
    tokenizer_file = folder.tokenizer_path(root)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise UserError(f"{tokenizer_file} is not a valid tokenizer file ({e})") from None
    gen_config = folder.load_gen_config(root)
    if quant == "none":
        lm, lm_config = checkpoint.load_lm(root / LM_DIR, device=device, dtype=config.lm_dtype)
        merge_lora(lm, lora)
        merge_projections(lm)  # q/k/v and w1/w3 as one matmul each (the quantized load does too)
    else:
        lm = load_quantized_lm(
            root / LM_DIR, quant, device=device, dtype=config.lm_dtype, lora=lora
        )
        lm_config = lm.config
    codec_device = config.torch_codec_device if device == config.torch_device else device
    codec, codec_config = checkpoint.load_codec(
        root / CODEC_DIR, device=codec_device, dtype=config.codec_weights_dtype
    )
    return Models(lm, lm_config, codec, codec_config, gen_config, tokenizer)


def _synthetic(
    config: PipelineConfig,
    quant: str,
    device: torch.device,
    lora: Sequence[LoraAdapter] = (),
) -> Models:
    """Random models of the preset size on `device` (host memory for a plan to place), their
    numbers drawn on the pipeline's device either way (a full model never passes through host
    memory unless the plan puts it there), the LM quantized as `quant` says."""
    models = synthetic_models(
        config.synthetic,
        device,
        config.lm_dtype,
        codec_dtype=config.codec_weights_dtype,
        draw_on=config.torch_device,
    )
    merge_lora(models.lm, lora)  # before quantizing
    merge_projections(models.lm)  # as a checkpoint loads: quantized concatenated
    quantize_model(models.lm, quant)
    if device == config.torch_device:  # else the placement swaps them in where it puts them
        use_fast_kernels(models.lm, config.lm_dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the unquantized weights' blocks
    return models


def _vram_budgets(vram: str, device: torch.device, codec_device: torch.device) -> tuple:
    """`vram`'s budgets (`planner.device_budgets`) for an LM on `device` and a codec on
    `codec_device`."""
    apart = codec_device != device
    return device_budgets(vram, codec_apart=apart, codec_on_gpu=codec_device.type == "cuda")


def plan_for(config: PipelineConfig, lora_bytes: int = 0) -> MemoryPlan:
    """The memory plan of `config.vram` for these models, from their configs alone (a
    checkpoint's config files and headers): one GPU's, or with the codec on a device of its
    own, the LM's GPU's with the codec's GPU's inside it (`MemoryPlan.codec_device_plan`)."""
    if config.model_path is None:
        lm_config, codec_config = preset_configs(config.synthetic)
    else:
        lm_config, codec_config = checkpoint_configs(config.model_path)
    device, codec_device = config.torch_device, config.torch_codec_device
    budget, codec_budget = _vram_budgets(config.vram, device, codec_device)
    return plan_memory(
        budget,
        lm_config,
        codec_config,
        max_frames=max_frames_for(config.max_seconds),
        songs=config.songs,
        lm_dtype=config.dtype,
        codec_dtype=config.codec_weights_dtype,
        overheads=measure_overheads(device),
        codec_apart=codec_device != device,
        codec_budget_bytes=codec_budget,
        codec_overheads=measure_overheads(codec_device) if codec_budget else DEFAULT_OVERHEADS,
        lora_bytes=lora_bytes,
    )
