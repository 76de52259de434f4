"""`heartmula-rt serve`: the HTTP API and web page over one pipeline (heartmula_rt/serve/), or
over model replicas on Ray Serve (`--ray`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from heartmula_rt.cli import common
from heartmula_rt.config import API_KEY_ENV, DEFAULT_SONGS_AT_ONCE, ENGINES
from heartmula_rt.errors import UserError
from heartmula_rt.serve.config import ScaleConfig, ServerConfig, ServiceConfig

# The flags' defaults are the configs' own (serve/config.py).
SERVICE, SERVER, SCALE = ServiceConfig(), ServerConfig(ServiceConfig()), ScaleConfig()

if TYPE_CHECKING:
    from heartmula_rt.runtime.loader import PipelineConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="an HTTP API and web page: songs from many clients, heard while made"
    )
    common.add_model_path(p)
    common.add_options(
        p,
        [
            ("--host", None, SERVER.host, f"address to bind ({SERVER.host})"),
            ("--port", int, SERVER.port, f"port ({SERVER.port})"),
            (
                "--api-key",
                None,
                None,
                f"required on every route but /health (default: ${API_KEY_ENV}); needed to bind "
                "anything but a loopback address",
            ),
        ],
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name a keyless server answers besides loopback ones (repeatable)",
    )
    common.add_options(
        p,
        [
            (
                "--folder",
                Path,
                SERVICE.folder,
                f"where the job database and every song's files go (./{SERVICE.folder})",
            ),
            (
                "--max-seconds",
                float,
                SERVICE.max_seconds,
                f"the longest song a request may ask for ({SERVICE.max_seconds:g})",
            ),
            (
                "--max-queue",
                int,
                SERVICE.max_queue,
                f"songs waiting beyond those running ({SERVICE.max_queue})",
            ),
            (
                "--batch",
                int,
                None,
                f"songs made at once (default {DEFAULT_SONGS_AT_ONCE}; with --vram what the plan "
                "holds)",
            ),
        ],
    )
    p.add_argument("--engine", choices=ENGINES, default=None, help="LM decode loop (as for gen)")
    p.add_argument("--vram", default=None, help="GPU memory budget(s) such as 12G (as for gen)")
    common.add_model_options(p, codec_help="as for gen")
    ray = p.add_argument_group("scale out on Ray Serve (pip install 'heartmula-rt[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve with model replicas on Ray Serve")
    common.add_options(
        ray,
        [
            ("--replicas", int, 1, "replicas (1; or min/max below)"),
            ("--min-replicas", int, None, "autoscaling's least"),
            ("--max-replicas", int, None, "autoscaling's most"),
            ("--replica-cpus", float, SCALE.num_cpus, f"CPUs a replica takes ({SCALE.num_cpus:g})"),
            (
                "--replica-gpus",
                float,
                None,
                "GPUs a replica takes (default: its pipeline's, 1 on a GPU, 2 with --codec-device "
                "on another, else 0)",
            ),
            ("--ray-address", None, None, "a Ray cluster's (default: start one)"),
        ],
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from heartmula_rt.serve.server import check_server, run_server

    server = ServerConfig(
        ServiceConfig(args.folder, args.batch, args.max_queue, args.max_seconds),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        allow_hosts=tuple(args.allow_host),
    )
    check_server(server)
    songs = {} if args.batch is None else {"songs": args.batch}
    # --lora NAME=PATH: served per song, each request choosing one by name (or none).
    config = common.pipeline_config(
        args,
        engine=args.engine,
        vram=args.vram,
        max_seconds=args.max_seconds,
        lora_per_song=True,
        **songs,
    )
    common.fetch_weights(config.model_path, args.model_path)
    if args.ray:
        return _serve_on_ray(args, config, server, songs)
    return run_server(config, server)


def _serve_on_ray(
    args: argparse.Namespace, config: PipelineConfig, server: object, songs: dict
) -> int:
    """`serve --ray`: each replica makes its own `PipelineConfig` from these arguments (so
    `--device auto` is its own GPU)."""
    import functools

    try:
        from heartmula_rt.serve.ray_app import run_ray_server
    except ImportError as e:
        raise UserError(
            f"serve --ray needs Ray Serve ({e.name} is missing): pip install 'heartmula-rt[ray]'"
        ) from None
    gpus = args.replica_gpus
    if gpus is None:  # the GPUs its pipeline names (Ray numbers a replica's own from cuda:0)
        gpus = float(len({d for d in (config.device, config.codec_device) if d.startswith("cuda")}))
    scale = ScaleConfig(
        min_replicas=args.min_replicas or args.replicas,
        max_replicas=args.max_replicas or max(args.replicas, args.min_replicas or 1),
        num_cpus=args.replica_cpus,
        num_gpus=gpus,
    )
    factory = functools.partial(
        common.pipeline_config,
        args,
        engine=args.engine,
        vram=args.vram,
        max_seconds=args.max_seconds,
        lora_per_song=True,
        **songs,
    )
    return run_ray_server(factory, server, scale, args.ray_address)


