"""The public pipeline: checkpoint folder → LM frames → HeartCodec → waveform."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from . import checkpoint
from .checkpoint import CODEC_DIR, LM_DIR
from .codec import CODEC_DTYPES, HeartCodec, check_codec_dtype, default_codec_dtype
from .config import CodecConfig, GenConfig, LMConfig
from .decode import check_length
from .engine import (
    Engine,
    check_engine,
    check_engine_over_streaming,
    default_engine,
    make_engine,
)
from .errors import UserError
from .fused import use_fused_layers
from .lm import HeartMuLa
from .planner import (
    MemoryPlan,
    Placement,
    checkpoint_configs,
    measure_overheads,
    parse_vram,
    plan_memory,
)
from .prompt import Prompt, build_prompt, read_text
from .quant import check_mode
from .quant.cache import load_quantized_lm
from .quant.fast import check_fast_path
from .stream import SongStream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FRAME_MS = 80  # 12.5 LM frames per second


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


def default_dtype(device: torch.device) -> str:
    """The LM's default weight dtype: bfloat16 on a GPU, float32 on the CPU."""
    return "bfloat16" if device.type == "cuda" else "float32"


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"seed must be an integer in [0, 2**63), not {seed}")


def resolve_threads(threads: int | None = None) -> int:
    """The CPU threads torch's ops get: `threads`, or by default one fewer than the cores this
    process may run on (its affinity mask, which containers and `taskset` narrow), at least 1
    and at most torch's own count in the calling thread (OMP_NUM_THREADS or
    `torch.set_num_threads` is kept). Every op of a team of threads ends at a barrier, and one
    core taken by another process makes every barrier wait for the scheduler (a one-window
    decode: 1.4 s on 1 thread, up to 25 s on 2 of 2 cores); a core left free avoids that."""
    if threads is None:
        return max(1, min(len(os.sched_getaffinity(0)) - 1, torch.get_num_threads()))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be a whole number of at least 1, not {threads!r}")
    return threads


def max_frames_for(max_seconds: float) -> int:
    """The reference's frame budget: max_audio_length_ms // 80."""
    if not 0 < max_seconds < math.inf:
        raise UserError(f"max_seconds must be a positive number, not {max_seconds}")
    return int(max_seconds * 1000) // FRAME_MS


@dataclass
class Pipeline:
    """A loaded HeartMuLa LM and HeartCodec, ready to turn tags and lyrics into audio.

    Safe to share between threads: each call that runs a model holds `lock` (a song's stream
    holds it from its first frame to its last piece, `generate` for the LM and the codec), so
    calls from several threads run one at a time, in turn, each as it would alone.
    """

    lm: HeartMuLa
    lm_config: LMConfig
    codec: HeartCodec
    codec_config: CodecConfig
    tokenizer: Tokenizer
    gen_config: GenConfig
    device: torch.device
    engine: Engine
    sample_rate: int = 48000
    placement: Placement | None = None  # the `vram=` plan applied, with the models' host mirrors
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    threads: int = 1  # torch's CPU threads, set in every thread that runs this pipeline's work

    @property
    def plan(self) -> MemoryPlan | None:
        """The `vram=` memory plan this pipeline was loaded with."""
        return None if self.placement is None else self.placement.plan

    def prompt(self, tags: str, lyrics: str) -> Prompt:
        """Tags and lyrics (text or file paths) as prompt rows (SPEC §2)."""
        prompt = build_prompt(self.tokenizer, self.gen_config, read_text(tags), read_text(lyrics))
        if int(prompt.ids.max()) >= self.lm_config.text_vocab_size:
            raise UserError(
                f"tokenizer.json produces id {int(prompt.ids.max())}, outside the LM's text "
                f"vocabulary of {self.lm_config.text_vocab_size}"
            )
        return prompt

    def check_request(self, tags: str, lyrics: str, max_frames: int) -> None:
        """Everything `generate_frames` would refuse about the prompt, without generating."""
        check_length(self.lm, self.prompt(tags, lyrics), max_frames)

    def generate_frames(
        self,
        tags: str,
        lyrics: str,
        max_frames: int = 240_000 // FRAME_MS,
        topk: int = 50,
        temperature: float = 1.0,
        cfg_scale: float = 1.5,
        seed: int | None = None,
        on_frame: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Sample audio codes: int64 [8, T] on the CPU, frame 0 included, EOS frame dropped.

        With a seed, sampling repeats exactly with the same engine on the same device (engines
        draw their random numbers differently; greedy decoding, topk=1, agrees across them).
        """
        check_seed(seed)
        prompt = self.prompt(tags, lyrics)
        with self.lock:
            torch.set_num_threads(self.threads)  # per thread: the caller's may differ from load's
            return self.engine.generate_frames(
                prompt,
                max_frames=max_frames,
                topk=topk,
                temperature=temperature,
                cfg_scale=cfg_scale,
                seed=seed,
                on_frame=on_frame,
            )

    def decode_frames(
        self,
        frames: torch.Tensor,
        num_steps: int = 10,
        guidance_scale: float = 1.25,
        generator: torch.Generator | None = None,
        on_window: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Codes [8, T] → float32 stereo waveform [2, N] at 48 kHz, on the CPU.

        Codec noise is drawn from `generator` on the CPU, so a seed means the same noise on any
        device.
        """
        turn = (
            contextlib.nullcontext()
            if self.placement is None
            else self.placement.codec_turn(self.lm, self.codec, self.engine.release)
        )
        with self.lock, turn:
            torch.set_num_threads(self.threads)
            return self.codec.detokenize(
                frames,
                num_steps=num_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                on_window=on_window,
            )

    def generate(
        self,
        tags: str,
        lyrics: str,
        max_seconds: float = 240,
        seed: int | None = None,
        topk: int = 50,
        temperature: float = 1.0,
        cfg_scale: float = 1.5,
        num_steps: int = 10,
        guidance_scale: float = 1.25,
    ) -> torch.Tensor:
        """Tags and lyrics → float32 stereo waveform [2, N] at 48 kHz."""
        max_frames = max_frames_for(max_seconds)
        with self.lock:  # the song's LM and codec in one turn
            frames = self.generate_frames(
                tags,
                lyrics,
                max_frames=max_frames,
                topk=topk,
                temperature=temperature,
                cfg_scale=cfg_scale,
                seed=seed,
            )
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            return self.decode_frames(frames, num_steps, guidance_scale, generator)

    def stream(
        self,
        tags: str,
        lyrics: str,
        max_seconds: float = 240,
        seed: int | None = None,
        topk: int = 50,
        temperature: float = 1.0,
        cfg_scale: float = 1.5,
        num_steps: int = 10,
        guidance_scale: float = 1.25,
        on_frame: Callable[[int], None] | None = None,
    ) -> SongStream:
        """As `generate`, but an iterator of float32 [2, n] numpy pieces that come while the
        LM runs (heartmula_rt/stream.py); concatenated they equal `generate`'s waveform for the
        same seed, bit for bit."""
        check_streamable(self.plan)
        check_seed(seed)
        prompt = self.prompt(tags, lyrics)
        max_frames = max_frames_for(max_seconds)
        check_length(self.lm, prompt, max_frames)
        return SongStream(
            self.engine,
            self.codec,
            prompt,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=None if seed is None else torch.Generator().manual_seed(seed),
            on_frame=on_frame,
            lock=self.lock,
            max_frames=max_frames,
            topk=topk,
            temperature=temperature,
            cfg_scale=cfg_scale,
            seed=seed,
            threads=self.threads,
        )


def load_pipeline(
    model_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    codec_dtype: str | None = None,
    engine: str | None = None,
    quant: str = "none",
    vram: str | None = None,
    max_seconds: float = 240,
    stream: bool = False,
    threads: int | None = None,
) -> Pipeline:
    """Load a checkpoint folder in the official layout (SPEC §1).

    `device` is `auto` (a CUDA GPU if torch sees one, else the CPU; as `heartmula-rt gen`),
    `cpu`, `cuda` or `cuda:N`. `dtype` is the LM's weight dtype (default: `default_dtype`,
    bfloat16 on a GPU, float32 on the CPU); `codec_dtype` one of `codec.CODEC_DTYPES` (default:
    `mixed` on a GPU, `float32` on the CPU); both load tensor by tensor. On a GPU (without a
    `vram` plan, which moves the codec) the codec's estimator is replayed as a CUDA graph.
    `engine` is one of `engine.ENGINES` (default: `default_engine(device)`). `quant` is one of
    `quant.QUANT_MODES`: the LM is then quantized while it loads, tensor by tensor, so its
    unquantized weights never sit in memory whole, cached for the next load (`quant.cache`),
    and run by the fast kernels the device has (`quant.fast`). On a GPU the LM's norms, RoPE
    and SiLU·mul are the fused twins of `heartmula_rt.fused`.

    `vram` ("12G") is a GPU memory budget: the planner (`planner.plan_memory`, for songs of up
    to `max_seconds`) then chooses the quantization and what lives on the GPU, the models load
    on the host and move as planned (`Pipeline.placement`), and `Pipeline.plan` holds the
    plan. `stream=True` says the pipeline will stream (`Pipeline.stream`): a plan that cannot
    is refused before loading.

    `threads` is the number of CPU threads torch's ops use (default: `resolve_threads`, the
    cores the process may run on less one); the pipeline sets it in every thread it runs in, the
    stream's worker included, since torch's count is kept per thread.
    """
    threads = resolve_threads(threads)
    torch.set_num_threads(threads)  # loading converts tensors on the CPU too
    root = Path(model_path)
    device = parse_device(device)
    lm_dtype = parse_dtype(dtype or default_dtype(device))
    codec_mode = check_codec_dtype(codec_dtype or default_codec_dtype(device))
    codec_dtype = CODEC_DTYPES[codec_mode][0]  # the DiT blocks': what the weights load as
    engine = default_engine(device) if engine is None else engine
    check_engine(engine, device)
    check_mode(quant)
    check_fast_path(quant, device)
    checkpoint.check_model_path(root)
    plan = None
    if vram is not None:
        plan = _plan_for(root, vram, device, quant, max_seconds, lm_dtype, codec_dtype)
        check_engine_over_streaming(engine, plan.offloaded_lm_layers)
        if stream:
            check_streamable(plan)
        quant, load_device = plan.quant, torch.device("cpu")
    else:
        load_device = device
    tokenizer_file = checkpoint.tokenizer_path(root)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise UserError(f"{tokenizer_file} is not a valid tokenizer file ({e})") from None
    gen_config = checkpoint.load_gen_config(root)
    if quant == "none":
        lm, lm_config = checkpoint.load_lm(root / LM_DIR, device=load_device, dtype=lm_dtype)
    else:
        lm = load_quantized_lm(root / LM_DIR, quant, device=load_device, dtype=lm_dtype)
        lm_config = lm.config
    codec, codec_config = checkpoint.load_codec(
        root / CODEC_DIR, device=load_device, dtype=codec_dtype
    )
    codec.set_precision(codec_mode)
    if plan is None and device.type == "cuda":
        use_fused_layers(lm)
        codec.use_fast_path("graph")
    placement = None
    if plan is not None:
        placement = Placement(plan, device)
        placement.place_lm(lm)
        placement.place_codec(codec)
    if lm_config.audio_vocab_size <= codec_config.codebook_size:
        raise UserError(
            f"LM audio vocabulary {lm_config.audio_vocab_size} does not fit codec codebook "
            f"{codec_config.codebook_size}: these checkpoints do not belong together"
        )
    return Pipeline(
        lm=lm,
        lm_config=lm_config,
        codec=codec,
        codec_config=codec_config,
        tokenizer=tokenizer,
        gen_config=gen_config,
        device=device,
        engine=make_engine(engine, lm, gen_config),
        sample_rate=codec_config.sample_rate,
        placement=placement,
        threads=threads,
    )


def check_streamable(plan: MemoryPlan | None) -> None:
    """Streaming decodes while the LM runs: a plan must keep both models on the GPU."""
    if plan is not None and not plan.codec_beside_lm:
        raise UserError(
            f"the --vram {plan.budget_bytes / 2**30:g}G plan takes turns between the LM and the "
            "codec on the GPU, so it cannot stream: use a budget whose plan keeps the codec on "
            "the GPU throughout (see `heartmula-rt plan`), or do not stream"
        )


def _plan_for(
    root: Path,
    vram: str,
    device: torch.device,
    quant: str,
    max_seconds: float,
    lm_dtype: torch.dtype,
    codec_dtype: torch.dtype,
) -> MemoryPlan:
    """The memory plan of `vram` for this checkpoint, from its configs and headers alone."""
    if device.type != "cuda":
        raise UserError(f"--vram budgets GPU memory; the device {device} is not a CUDA GPU")
    if quant != "none":
        raise UserError("--vram chooses the quantization itself: leave out --quant")
    lm_config, codec_config = checkpoint_configs(root)
    budget = parse_vram(vram)
    return plan_memory(
        budget,
        lm_config,
        codec_config,
        max_frames=max_frames_for(max_seconds),
        lm_dtype=lm_dtype,
        codec_dtype=codec_dtype,
        overheads=measure_overheads(device),
    )
