"""What a server is configured with, and every default of it in one place: the service's limits
(`ServiceConfig`), where it listens and who may use it (`ServerConfig`), how it scales on Ray
(`ScaleConfig`). Standard library only, so that `heartmula-rt serve --help` shows these defaults
without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heartmula_rt.errors import UserError
from heartmula_rt.request import DEFAULT_MAX_SECONDS


@dataclass(frozen=True)
class ServiceConfig:
    """What a service may take on: `folder` holds every job's files and the job database."""

    folder: Path = Path("heartmula-rt-songs")
    songs_at_once: int | None = None  # default: what a `vram` plan holds, else 8
    max_queue: int = 32  # songs waiting for rows, beyond those running
    max_seconds: float = DEFAULT_MAX_SECONDS  # the longest song a request may ask for
    # Every other field a client sets is bounded too (limits.py), so that no request can stall
    # the others: 64 ODE steps is 6x the default, the scales' defaults are 1.5 and 1.25.
    max_num_steps: int = 64
    max_guidance_scale: float = 20.0
    max_cfg_scale: float = 20.0
    max_temperature: float = 10.0
    max_topk: int | None = None  # None: the model's audio vocabulary
    max_tags_chars: int = 1000
    max_lyrics_chars: int = 16000  # a long lyric sheet is a few thousand


@dataclass(frozen=True)
class ServerConfig:
    """Where the API listens and who may use it, and the service behind it."""

    service: ServiceConfig
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: $HEARTMULA_RT_API_KEY, if set
    # Host names a keyless server answers besides the loopback ones (`serve --allow-host`):
    # without a key, a request naming any other host is refused (DNS rebinding).
    allow_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScaleConfig:
    """How many replicas, and what each takes of a machine."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None  # default: min_replicas
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # 1: a replica per GPU
    upscale_delay_s: float = 10.0  # how long songs must wait before another replica starts
    downscale_delay_s: float = 300.0  # how long a replica must be idle before it goes

    def check(self) -> None:
        if self.min_replicas < 1:
            raise UserError(f"--min-replicas must be at least 1, not {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise UserError(
                f"--max-replicas ({self.max_replicas}) must be at least --min-replicas "
                f"({self.min_replicas})"
            )
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise UserError("a replica's CPUs and GPUs must not be negative")
