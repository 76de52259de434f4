"""`heartmula-rt extend`, `resume` and `regen`: a song made by gen or serve, named by its audio
file (its codes sidecar beside it) or the sidecar itself, edited (runtime/edit.py) and decoded
through the song runner's codec stage, only the windows the edit changed where the song's
lossless audio and window prefixes allow."""

from __future__ import annotations

import argparse
import secrets
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from heartmula_rt.cli import common, reference
from heartmula_rt.config import ENGINES
from heartmula_rt.errors import UserError
from heartmula_rt.request import FRAME_MS, SongRequest, max_frames_for, seconds_value
from heartmula_rt.runtime.events import SongEvents

if TYPE_CHECKING:
    import torch

    from heartmula_rt.runtime.codes import SongCodes
    from heartmula_rt.runtime.loader import PipelineConfig
    from heartmula_rt.runtime.pipeline import Pipeline
    from heartmula_rt.runtime.runner import Original, Song


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """`extend`, `resume`, `regen`: a song made by gen or serve, named by its audio file (its
    codes sidecar beside it) or the sidecar itself."""
    commands = {
        "extend": "make a song longer: continue after its last frame (same or new lyrics, tags)",
        "resume": "finish an interrupted song: with its seed, exactly the uninterrupted song",
        "regen": "make a section of a song again; the rest is kept as it is",
    }
    for name, help_text in commands.items():
        p = subparsers.add_parser(name, help=help_text)
        p.add_argument("song", type=Path, help="the song's audio file (or its .codes.safetensors)")
        if name != "resume":
            p.add_argument("--tags", default=None, help="new tags (default: the song's)")
            p.add_argument("--lyrics", default=None, help="new lyrics (default: the song's)")
        if name == "extend":
            p.add_argument("--seconds", type=float, required=True, help="how much longer")
            p.add_argument(
                "--context-seconds",
                type=float,
                default=None,
                help="past the model's context, each run continues from the song's last this "
                "many seconds (default 164, at most half a run)",
            )
        if name == "regen":
            p.add_argument("--from", dest="start", required=True, help="where: seconds or m:ss")
            p.add_argument(
                "--to", dest="end", default=None, help="the section's end (default: the end)"
            )
            p.add_argument("--count", type=int, default=1, help="takes, made in one batch (1)")
        p.add_argument(
            "--seed",
            type=int,
            default=None,
            help="random (printed) for regen; the song's own for extend and resume",
        )
        if name != "resume":  # resume finishes the song as it began: with its own reference
            reference.add_reference_options(p)
        p.add_argument("-o", "--output", type=Path, default=None, help="default: beside SONG")
        p.add_argument("--force", action="store_true", help="use codes of another checkpoint")
        common.add_model_path(p, "checkpoint folder")
        p.add_argument("--engine", choices=ENGINES, default=None, help="as for gen")
        common.add_model_options(p, codec_help="as for gen")
        p.set_defaults(func=cmd_regen if name == "regen" else cmd_extend)
        if name == "resume":
            p.set_defaults(tags=None, lyrics=None, seconds=None, context_seconds=None)




def _original_audio(
    given: Path, sidecar: Path, song: SongCodes, changed_from: int, sample_rate: int
) -> Original | None:
    """The song's audio and prefixes for an edit of `song` that changes its frames from
    `changed_from` on (`given`: the SONG argument). None, said once on stderr, where they
    cannot be had: `given` is the sidecar, which keeps no prefixes (a streamed song, an older
    heartmula-rt's), or the audio is lossy (MP3, Ogg) or not the song of the codes."""
    import soundfile as sf
    import torch

    from heartmula_rt.model.codec.detokenize import num_output_samples
    from heartmula_rt.runtime.codes import SUFFIX
    from heartmula_rt.runtime.runner import Original

    samples = num_output_samples(song.frames, sample_rate)

    def unusable() -> str | None:
        if given.name.endswith(SUFFIX):
            return f"{given.name} holds the song's codes, not its audio"
        if song.prefixes is None:
            return f"{sidecar.name} keeps no codec prefixes (a streamed song, or an older one)"
        if song.request.noise_seed is None:
            return f"{sidecar.name} has no seed for the codec's noise"
        if not given.is_file():
            return f"{given} does not exist"
        info = sf.info(str(given))
        if info.format not in ("WAV", "WAVEX", "FLAC"):
            lossy = info.format in ("MP3", "OGG")
            return f"{given.name} is {'lossy' if lossy else 'not WAV or FLAC'}"
        if (info.frames, info.channels, info.samplerate) != (samples, 2, sample_rate):
            return (
                f"{given.name} is not the audio of its codes ({info.frames} samples, "
                f"{info.channels} channels at {info.samplerate} Hz; its {song.frames} frames make "
                f"{samples}, 2 channels at {sample_rate} Hz)"
            )
        return None

    try:
        why = unusable()
        if why is None:
            data, _ = sf.read(str(given), dtype="float32", always_2d=True)
            wav = torch.from_numpy(data.T.copy())
            if wav.shape == (2, samples):
                return Original(given, wav, song.prefixes, changed_from)
            why = f"{given.name} read as {list(wav.shape)} samples, not [2, {samples}]"
    except (sf.SoundFileError, OSError) as e:
        why = f"{given.name} cannot be read ({e})"
    print(f"note: {why}: decoding every window", file=sys.stderr)
    return None




class _CodecProgress(SongEvents):
    """The codec's bar over an edit's windows, and what it decoded of them."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def window(self, song: Song, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc="codec", unit="window", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def written(self, song: Song) -> None:
        self.close()
        if song.clipped:
            print(
                f"note: {song.clipped} samples in {song.output.name} were outside [-1, 1] and "
                "were clipped",
                file=sys.stderr,
            )
        for note in (song.error, song.note):  # song.note: its codes kept elsewhere
            if note:
                print(f"note: {note}", file=sys.stderr)
        if song.original is not None:
            from heartmula_rt.model.codec.detokenize import HOP

            decoded, windows = song.windows
            kept = ""
            if decoded < windows:  # windows c − 1 … decoded: the audio before c is copied
                copied = (windows - decoded + 1) * HOP * FRAME_MS / 1000
                kept = f"; the audio before {copied:g} s is {song.original.path.name}'s"
            print(f"codec: decoded {decoded} of {windows} windows{kept}", file=sys.stderr)


def decode_song(pipe: Pipeline, song: SongCodes, out: Path) -> float:
    """A sidecar's song decoded again into `out` (`heartmula-rt decode`), its codes kept beside
    it with the window prefixes of this audio; the seconds of audio written."""
    from heartmula_rt.runtime.runner import CodecStopped, Song, finish_songs

    again = Song(
        song.request,
        output=out,
        codes=song.codes,
        ended=song.ended,
        model=song.model,
        lora=song.lora,  # the adapters that made the codes, named again beside the new audio
    )
    common.note_stray_ids(song.codes, pipe.codec_config.codebook_size)
    progress = _CodecProgress()
    try:
        finish_songs(pipe, [again], progress)
    except CodecStopped as stop:
        raise stop.cause from None
    finally:
        progress.close()
    return again.seconds


def _decode_keeping_codes(
    pipe: Pipeline,
    frames: torch.Tensor,
    out: Path,
    request: SongRequest,
    ended: str,
    original: Original | None = None,
) -> float | None:
    """An edit's song through the runner's codec stage: its sidecar (how its LM part `ended`)
    saved first beside `out` and kept, then its audio; if the codec stage is interrupted (then
    None, said on stderr) or fails, the LM's work survives, and `heartmula-rt decode` finishes
    it."""
    from heartmula_rt.runtime.runner import CodecStopped, Song, finish_songs

    song = Song(request, output=out, original=original, codes=frames, ended=ended)
    common.note_stray_ids(frames, pipe.codec_config.codebook_size)
    progress = _CodecProgress()
    try:
        finish_songs(pipe, [song], progress)
    except CodecStopped as stop:
        progress.close()
        what = f"the LM's {frames.shape[1]} frames are saved in {song.sidecar}"
        if song.sidecar is None:  # kept nowhere (save_codes said why)
            what = song.note
        how = f"`heartmula-rt decode {song.sidecar} -o {out}` makes the song from them"
        common.codec_stage_stopped(stop.cause, what, how)
        return None
    return song.seconds


def parse_time(value: str, flag: str) -> float:
    """A moment of a song: seconds (`65`, `65.5`) or `[h:]m:ss[.f]` (`1:05`)."""
    try:
        parts = [float(p) for p in value.split(":")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or any(p >= 60 for p in parts[1:]):
        raise UserError(f"{flag} takes seconds or m:ss such as 1:05, not {value!r}")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds_value(flag, seconds)  # nan, inf, 1e400: one sentence naming the flag


def _edited_song(args: argparse.Namespace) -> tuple[Path, SongCodes, SongRequest]:
    """The song an edit starts from (its sidecar, checked), and its request with the texts the
    command line gives instead (`--tags`, `--lyrics`, read as gen reads them). Its reference
    is the sidecar's unless the command line gives one (`with_reference`)."""
    from heartmula_rt.runtime.codes import SongCodes, find_sidecar

    reference.check_reference_args(args)
    if args.tags == "-" and args.lyrics == "-":
        raise UserError("only one of --tags and --lyrics can read stdin (-)")
    sidecar = find_sidecar(args.song)
    song = SongCodes.load(sidecar)
    texts = {
        name: getattr(song.request, name)
        if value is None
        else common.read_text_arg(value, f"--{name}")
        for name, value in (("tags", args.tags), ("lyrics", args.lyrics))
    }
    return sidecar, song, replace(song.request, **texts)


def _edit_output(args: argparse.Namespace, sidecar: Path, what: str) -> Path:
    """`-o`, else `<song's stem>-<what><its audio extension>` beside it (never an existing
    file)."""
    from heartmula_rt.runtime.audio import check_output_path
    from heartmula_rt.runtime.codes import SUFFIX

    if args.output is not None:
        return check_output_path(args.output)
    stem = sidecar.name[: -len(SUFFIX)]
    given = Path(args.song)
    ext = given.suffix if not given.name.endswith(SUFFIX) and given.suffix else ".wav"
    out, n = sidecar.with_name(f"{stem}-{what}{ext}"), 1
    if what == "resumed" and stem.endswith(PARTIAL):  # gen's Ctrl-C: the song it was to be
        whole = sidecar.with_name(f"{stem[: -len(PARTIAL)]}{ext}")
        out = whole if not whole.exists() else whole.with_name(f"{whole.stem}-{what}{ext}")
    while out.exists():
        n += 1
        out = sidecar.with_name(f"{stem}-{what}-{n}{ext}")
    return check_output_path(out)


def with_reference(args: argparse.Namespace, request: SongRequest) -> SongRequest:
    """`request` with the reference the command line gives (embedded now, before the LM
    loads), else as it was: the song's own, from its sidecar."""
    if not reference.wanted(args):
        return request
    return replace(request, reference=reference.reference_of_args(args))


PARTIAL = ".partial"  # audio.partial_path's mark: <stem>.partial<ext>


def _edit_pipeline(args: argparse.Namespace, song: SongCodes, sidecar: Path) -> Pipeline:
    """The pipeline an edit runs on, after the song's sidecar is checked against its
    checkpoint (unless --force)."""
    from heartmula_rt.model import folder
    from heartmula_rt.model.lora import LoraSpec
    from heartmula_rt.runtime.loader import load_pipeline

    config = common.pipeline_config(args, engine=args.engine)
    common.fetch_weights(config.model_path, args.model_path)
    folder.check_model_path(config.model_path)
    song.check_model(folder.fingerprint(config.model_path), sidecar, force=args.force)
    adapters = _song_adapters(config, song, sidecar, force=args.force)
    specs = tuple(LoraSpec(a.path, a.scale, a.name) for a in adapters)
    return load_pipeline(replace(config, lora=specs), adapters=adapters)


def _song_adapters(config: PipelineConfig, song: SongCodes, sidecar: Path, *, force: bool) -> list:
    """The LoRA adapters an edit runs merged: `--lora` if given, else those the song was made
    with (its sidecar's records, from their paths at their strengths). Each adapter the song
    was made with must be there with the same contents (fingerprint), or the edit is refused
    in one line, unless `force` (a missing one is then left out)."""
    from heartmula_rt.memory.planner import checkpoint_configs
    from heartmula_rt.model.lora import LoraSpec, load_loras

    lm_config = checkpoint_configs(config.model_path)[0]
    if config.lora:  # --lora: the user's adapters, all loaded or none
        adapters = load_loras(config.lora, lm_config)
        have = {a.fingerprint for a in adapters}
        for r in song.lora:
            if r.fingerprint not in have and not force:
                raise UserError(
                    f"{sidecar}: the song was made with LoRA {r.name!r} ({r.path}), and no "
                    "--lora given has its contents; give that file, or --force edits anyway"
                )
        return adapters
    adapters = []
    for r in song.lora:
        try:
            (adapter,) = load_loras([LoraSpec(Path(r.path), r.scale, r.name)], lm_config)
        except UserError as e:
            if not force:
                raise UserError(
                    f"{sidecar}: the song was made with LoRA {r.name!r}, which cannot be loaded "
                    f"again ({e}); give it with --lora PATH, or --force edits without it"
                ) from None
            print(f"note: leaving out LoRA {r.name!r}: {e}", file=sys.stderr)
            continue
        if adapter.fingerprint != r.fingerprint:
            if not force:
                raise UserError(
                    f"{sidecar}: LoRA {r.name!r} at {r.path} has changed since the song was made "
                    f"(its files' sha256 is {adapter.fingerprint[:12]}…, was "
                    f"{r.fingerprint[:12]}…); --force uses it anyway"
                )
            print(f"note: LoRA {r.name!r} has changed since the song was made", file=sys.stderr)
        adapters.append(adapter)
    return adapters


def _lm_bar(total: int, done: int) -> tqdm:
    return tqdm(total=total, initial=done, desc="LM", unit="frame", file=sys.stderr)


def cmd_extend(args: argparse.Namespace) -> int:
    """`extend` (the song made longer by --seconds, its texts the same or new) and `resume`
    (an interrupted song made to its own length: with its seed, exactly the uninterrupted
    song)."""
    from heartmula_rt.runtime.codes import lm_end
    from heartmula_rt.runtime.decode import GenerationInterrupted

    resume = args.command == "resume"
    sidecar, song, request = _edited_song(args)
    sampling = request.sampling
    if resume:
        if song.ended in ("eos", "length"):
            raise UserError(
                f"{sidecar}: the song ended by its {song.ended}, so there is nothing to resume; "
                "`heartmula-rt extend` makes it longer"
            )
        if song.frames > sampling.max_frames:
            raise UserError(f"{sidecar}: the song already has all its {song.frames} frames")
    else:
        more = max_frames_for(seconds_value("--seconds", args.seconds, positive=True))
        if more < 1:
            raise UserError(f"--seconds must add at least one 80 ms frame, not {args.seconds}")
        sampling = replace(sampling, max_frames=song.frames - 1 + more)
    request = replace(request, sampling=sampling)
    if args.seed is not None:
        # New draws from here on, the song's codec noise: its windows sound as they did.
        request = request.with_settings(seed=args.seed, noise_seed=song.request.noise_seed)
        sampling = request.sampling
    context = None
    if args.context_seconds is not None:
        given = seconds_value("--context-seconds", args.context_seconds, positive=True)
        context = max_frames_for(given)
    out = _edit_output(args, sidecar, "resumed" if resume else "extended")
    request = with_reference(args, request)
    pipe = _edit_pipeline(args, song, sidecar)
    # The frames from the song's end on are new (its last window changes too).
    original = _original_audio(Path(args.song), sidecar, song, song.frames, pipe.sample_rate)
    total = sampling.max_frames + 1
    bar = _lm_bar(total, song.frames)
    try:
        frames = pipe.continue_frames(
            request, song.codes, context_frames=context, on_frame=lambda n: bar.update(n - bar.n)
        )
        ended = lm_end(frames, sampling)
    except GenerationInterrupted as stop:
        frames, ended = stop.frames, "interrupted"
        print(f"interrupted: decoding the {frames.shape[1]} frames so far", file=sys.stderr)
    finally:
        bar.close()
    seconds = _decode_keeping_codes(pipe, frames, out, request, ended, original)
    if seconds is None:
        return common.EXIT_INTERRUPTED
    print(
        f"wrote {out}: {seconds:.1f} s of audio, {frames.shape[1] - song.frames} frames after "
        f"the song's {song.frames} (seed {sampling.seed})",
        file=sys.stderr,
    )
    return common.EXIT_INTERRUPTED if ended == "interrupted" else 0


def cmd_regen(args: argparse.Namespace) -> int:
    """A section of a song made again (`--from`, `--to`), `--count` takes in one batch."""
    from heartmula_rt.runtime.audio import check_output_path
    from heartmula_rt.runtime.codes import lm_end
    from heartmula_rt.runtime.edit import section

    sidecar, song, request = _edited_song(args)
    end_s = None if args.end is None else parse_time(args.end, "--to")
    start, end = section(song.frames, parse_time(args.start, "--from"), end_s, ("--from", "--to"))
    if args.count < 1:
        raise UserError(f"--count must be at least 1, not {args.count}")
    base = secrets.randbits(31) if args.seed is None else args.seed
    seeds = [base + i for i in range(args.count)]
    outs = []
    for i in range(args.count):
        name = "regen" if args.count == 1 else f"regen-{i + 1}"
        out = _edit_output(args, sidecar, name)
        if args.output is not None and args.count > 1:
            out = check_output_path(out.with_name(f"{out.stem}-{i + 1}{out.suffix}"))
        outs.append(out)
    request = with_reference(args, request)
    pipe = _edit_pipeline(args, song, sidecar)
    original = _original_audio(Path(args.song), sidecar, song, start, pipe.sample_rate)
    until = "the end" if end is None else f"{end * FRAME_MS / 1000:g} s"
    print(
        f"seeds {', '.join(map(str, seeds))}: {start * FRAME_MS / 1000:g} s to {until} made again",
        file=sys.stderr,
    )
    takes = pipe.regenerate_frames(request, song.codes, start, end, seeds=seeds)
    for seed, take, out in zip(seeds, takes, outs, strict=True):
        # The song's codec noise: the windows before the section sound as they did.
        take_request = request.with_settings(seed=seed, noise_seed=song.request.noise_seed)
        ended = song.ended if end is not None else lm_end(take, take_request.sampling)
        seconds = _decode_keeping_codes(pipe, take, out, take_request, ended, original)
        if seconds is None:
            return common.EXIT_INTERRUPTED
        print(f"wrote {out}: {seconds:.1f} s of audio (seed {seed})", file=sys.stderr)
    return 0


