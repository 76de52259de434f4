"""What every command shares: exit codes, the one-line parser, the model and song flag groups
(defined once), reading texts, and the lines that say what was loaded and made.

Every user mistake is one line on stderr and exit code 2; nothing heavy is loaded before the
inputs and the output path have been checked. stdout carries only a command's product (the
audio of `-o -`, a plan, a bench table, the version); every message goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heartmula_rt.config import CODEC_PRECISIONS, LM_DTYPES, QUANT_MODES, default_model_path
from heartmula_rt.errors import UserError
from heartmula_rt.memory.report import format_plan
from heartmula_rt.request import DEFAULT_MAX_SECONDS, SamplingParams, SongRequest

if TYPE_CHECKING:  # torch loads with the commands that run a model, not with `plan` or --help
    from collections.abc import Iterable

    import torch

    from heartmula_rt.runtime.loader import PipelineConfig
    from heartmula_rt.runtime.pipeline import Pipeline

# A command-line option of one value: (flag, type or None for text, default, help).
Option = tuple[str, Any, object, str]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a Unix tool killed by it


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def model_path(path: Path | None) -> Path:
    """The given folder, or the default one (`fetch_weights` fills it on first use)."""
    return default_model_path() if path is None else path


def fetch_weights(root: Path, given: Path | None) -> None:
    """Download the weights into the default folder if it is empty (a given folder never)."""
    from heartmula_rt.model import folder

    if given is None and not (root / folder.LM_DIR / "config.json").is_file():
        print(f"no weights in {root}: downloading them (or pass --model-path)", file=sys.stderr)
        folder.download(root)


def read_text_arg(value: str, flag: str) -> str:
    """`--tags` / `--lyrics`: `-` reads stdin, the name of an existing file reads that file,
    anything else is the text itself (never refused for how it looks)."""
    if value == "-":
        return sys.stdin.read()
    if not os.path.isfile(value):
        if _looks_like_a_file(value):  # `--lyrics lyrcs.txt`: a typo is sung, but said
            print(
                f"note: {flag} {value!r} names no file here, so it is sung as the text itself",
                file=sys.stderr,
            )
        return value
    try:
        # utf-8-sig: a leading byte-order mark (Windows editors) is not part of the text.
        with open(value, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {value} is not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {flag} {value} ({e.strerror})") from None


def _looks_like_a_file(value: str) -> bool:
    """One word with a text file's extension (`lyrics.txt`, `song.lrc`) or a path from a
    folder (`./x`, `~/x`, `/x`): what a user means as a file, not as words to sing (`rock/pop`
    is a tag)."""
    text = value.strip()
    if not text or any(c.isspace() for c in text):
        return False
    extension = os.path.splitext(text)[1].lower()
    return extension in TEXT_FILE_EXTENSIONS or text.startswith(("/", "./", "../", "~/"))


TEXT_FILE_EXTENSIONS = (".txt", ".lrc", ".md", ".text", ".lyrics", ".json", ".srt")

# Song settings the command line sets, by their `SongRequest.of` names (None: not given).
SONG_FLAGS = ("max_seconds", "topk", "temperature", "cfg_scale", "seed")


def song_settings(args: argparse.Namespace) -> dict[str, object]:
    """The song settings given on the command line (`add_song_options`, --seed)."""
    return {k: getattr(args, k) for k in SONG_FLAGS if getattr(args, k) is not None}


def song_request(args: argparse.Namespace) -> SongRequest:
    """The song `gen`'s arguments ask for: texts read as `read_text_arg` says, settings given
    on the command line, the request's own defaults for the rest."""
    if args.tags == "-" and args.lyrics == "-":
        raise UserError("only one of --tags and --lyrics can read stdin (-)")
    tags, lyrics = read_text_arg(args.tags, "--tags"), read_text_arg(args.lyrics, "--lyrics")
    return SongRequest.of(tags, lyrics, **song_settings(args))


def pipeline_config(args: argparse.Namespace, **fields: object) -> PipelineConfig:
    """The `PipelineConfig` of the model options (`add_model_options`), `fields` over them."""
    from heartmula_rt.runtime.loader import PipelineConfig

    options = {
        "model_path": model_path(args.model_path),
        "device": args.device,
        "codec_device": args.codec_device,
        "dtype": args.dtype,
        "codec_dtype": args.codec_dtype,
        "quant": args.quant,
        "threads": args.threads,
        "lora": tuple(getattr(args, "lora", None) or ()),
    }
    return PipelineConfig(**{**options, **fields})


def add_options(p: argparse._ActionsContainer, rows: Iterable[Option]) -> None:
    """Options of one value each, a (flag, type, default, help) row each (type None: text)."""
    for flag, kind, default, help_text in rows:
        p.add_argument(flag, type=kind, default=default, help=help_text)


def add_model_path(
    p: argparse._ActionsContainer, help_text: str = "checkpoint folder (as for gen)"
) -> None:
    """--model-path, a checkpoint folder (None: `model_path`'s default)."""
    p.add_argument("--model-path", type=Path, default=None, help=help_text)


def add_model_options(
    p: argparse.ArgumentParser, codec_help: str, *, quant_list: bool = False
) -> None:
    """Where and how the models run: device, dtypes, LM quantization (gen and bench; bench
    takes several quantization modes, `quant_list`)."""
    p.add_argument(
        "--device",
        "--lm-device",
        dest="device",
        default="auto",
        help="the LM's device (and the codec's, unless --codec-device): auto (the default: "
        "cuda if torch sees a GPU, else cpu), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--dtype",
        choices=LM_DTYPES,
        default=None,
        help="LM weights (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument(
        "--codec-device",
        default=None,
        help="put the codec on another device than the LM (cpu, cuda:N): it then decodes "
        "beside the LM (default: --device)",
    )
    p.add_argument("--codec-dtype", choices=list(CODEC_PRECISIONS), default=None, help=codec_help)
    quant_help = (
        "LM weight-only quantization: none, int8 (per channel), nf4 or int4 (groups of 128)"
    )
    if quant_list:  # checked by bench.parse_quant_modes
        quant_help += "; several, comma-separated, are measured side by side (none,int8,int4)"
    p.add_argument(
        "--quant", choices=None if quant_list else QUANT_MODES, default="none", help=quant_help
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch's ops (default: the cores this process may use, less one)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="[NAME=]PATH[:SCALE]",
        help="a LoRA adapter (a PEFT folder, .safetensors or .pt; SCALE: its strength, "
        "default 1), merged into the LM before quantization; repeat for several. serve runs "
        "them per song instead: a request chooses one by NAME (docs/lora.md)",
    )


def add_song_options(p: argparse.ArgumentParser) -> None:
    """A song's sampling settings (gen and bench): None where not given, so that the request's
    own defaults (`SamplingParams`) apply."""
    d = SamplingParams
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help=f"longest song (default {DEFAULT_MAX_SECONDS:g})",
    )
    p.add_argument(
        "--topk", type=int, default=None, help=f"sample among the k likeliest ({d.topk})"
    )
    p.add_argument(
        "--temperature", type=float, default=None, help=f"sampling temperature ({d.temperature})"
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help=f"classifier-free guidance ({d.cfg_scale}); ≤ 1 means none (one LM row)",
    )


def note_stray_ids(frames: torch.Tensor, codebook_size: int) -> None:
    """Once per song: the codec replaces LM ids past its codebook (SPEC §5.1)."""
    from heartmula_rt.model.codec.detokenize import sanitize_codes

    n_stray = sanitize_codes(frames, codebook_size, frames.shape[0])[1]
    if n_stray:
        print(
            f"note: replaced {n_stray} codec ids ≥ {codebook_size} by a neighbouring frame's",
            file=sys.stderr,
        )


def print_loaded(pipe: Pipeline, seconds: float, what: str = "") -> None:
    """The line saying what `gen` loaded (and `what` it will make), and its plan if any."""
    config = pipe.config
    print(
        f"loaded {config.model_path} on {config.device} in {seconds:.1f} s (LM "
        f"{config.dtype}, quantization {config.quant}, codec {config.codec_dtype}, "
        f"{config.engine} engine, {config.threads} CPU threads){what}",
        file=sys.stderr,
    )
    if pipe.adapters:
        how = "per song" if config.lora_per_song else "merged"
        names = ", ".join(f"{a.name} ({a.scale:g})" for a in pipe.adapters)
        print(f"LoRA adapters, {how}: {names}", file=sys.stderr)
    if pipe.plan is not None:
        print(format_plan(pipe.plan), file=sys.stderr)


def codec_stage_stopped(e: BaseException, what: str, how: str) -> None:
    """The codec stage ended by `e`, the LM's frames kept (`what` says where, `how` how to
    finish): a Ctrl-C is said and returns; an error is raised again, with `what` said."""
    if isinstance(e, KeyboardInterrupt):
        print(f"interrupted during the codec: {what}; {how}", file=sys.stderr)
        return
    if isinstance(e, UserError):
        raise UserError(f"{e}; {what}") from None
    print(f"heartmula-rt: {what}; {how}", file=sys.stderr)
    raise e


