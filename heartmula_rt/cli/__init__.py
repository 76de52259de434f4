"""`heartmula-rt`: a thin command line over the Python API.

Every user mistake is one line on stderr and exit code 2; nothing heavy is loaded before the
inputs and the output path have been checked. stdout carries only a command's product (the
audio of `-o -`, a plan, a bench table, the version); every message goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from heartmula_rt import __version__
from heartmula_rt.config import (
    API_KEY_ENV,
    CODEC_PRECISIONS,
    DEFAULT_PROMPT_LEN,
    DEFAULT_SONGS_AT_ONCE,
    ENGINES,
    LM_DTYPES,
    LM_PRESETS,
    QUANT_MODES,
    default_codec_dtype,
    default_dtype,
    default_model_path,
)
from heartmula_rt.errors import UserError
from heartmula_rt.memory.planner import (
    checkpoint_configs,
    device_budgets,
    format_plan,
    plan_memory,
    preset_configs,
)
from heartmula_rt.request import (
    DEFAULT_MAX_SECONDS,
    FRAME_MS,
    CodecParams,
    SamplingParams,
    SongRequest,
    check_songs,
    max_frames_for,
)

if TYPE_CHECKING:  # torch loads with the commands that run a model, not with `plan` or --help
    import torch

    from heartmula_rt.bench import BenchConfig
    from heartmula_rt.runtime.batch_file import BatchSong
    from heartmula_rt.runtime.codes import SongCodes
    from heartmula_rt.runtime.pipeline import Pipeline, PipelineConfig

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a Unix tool killed by it


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _model_path(path: Path | None) -> Path:
    """The given folder, or the default one (`_fetch_weights` fills it on first use)."""
    return default_model_path() if path is None else path


def _fetch_weights(root: Path, given: Path | None) -> None:
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
        return value
    try:
        # utf-8-sig: a leading byte-order mark (Windows editors) is not part of the text.
        with open(value, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {value} is not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {flag} {value} ({e.strerror})") from None


# Song settings the command line sets, by their `SongRequest.of` names (None: not given).
_SONG_FLAGS = ("max_seconds", "topk", "temperature", "cfg_scale", "seed")


def _song_settings(args: argparse.Namespace) -> dict[str, object]:
    """The song settings given on the command line (`_add_song_options`, --seed)."""
    return {k: getattr(args, k) for k in _SONG_FLAGS if getattr(args, k) is not None}


def song_request(args: argparse.Namespace) -> SongRequest:
    """The song `gen`'s arguments ask for: texts read as `read_text_arg` says, settings given
    on the command line, the request's own defaults for the rest."""
    if args.tags == "-" and args.lyrics == "-":
        raise UserError("only one of --tags and --lyrics can read stdin (-)")
    tags, lyrics = read_text_arg(args.tags, "--tags"), read_text_arg(args.lyrics, "--lyrics")
    return SongRequest.of(tags, lyrics, **_song_settings(args))


def pipeline_config(args: argparse.Namespace, **fields: object) -> PipelineConfig:
    """The `PipelineConfig` of the model options (`_add_model_options`), `fields` over them."""
    from heartmula_rt.runtime.pipeline import PipelineConfig

    options = {
        "model_path": _model_path(args.model_path),
        "device": args.device,
        "codec_device": args.codec_device,
        "dtype": args.dtype,
        "codec_dtype": args.codec_dtype,
        "quant": args.quant,
        "threads": args.threads,
    }
    return PipelineConfig(**{**options, **fields})


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """`heartmula-rt bench`'s arguments as a `BenchConfig` (every input checked here)."""
    from heartmula_rt.bench import BenchConfig, parse_batch_sizes, parse_engines, parse_quant_modes

    synthetic = {"model_path": None, "synthetic": args.synthetic} if args.model_path is None else {}
    pipeline = pipeline_config(args, quant="none", **synthetic)  # quant: set per mode
    # Text only to carry the settings: the benchmark's prompt is made from the model.
    request = SongRequest.of("bench", **_song_settings(args), stop_at_eos=False)
    return BenchConfig(
        pipeline=pipeline,
        engines=tuple(parse_engines(args.engines, pipeline.torch_device)),
        quant_modes=tuple(parse_quant_modes(args.quant)),
        vram_budgets=tuple(b.strip() for b in (args.vram or "").split(",") if b.strip()),
        sampling=request.sampling,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
        warmup=args.warmup,
        codec_repeats=args.codec_repeats,
        codec=not args.no_codec,
        greedy_frames=args.greedy_frames,
        batch_sizes=parse_batch_sizes(args.batch),
        out_dir=args.out_dir,
        name=args.name,
    )


def _note_stray_ids(frames: torch.Tensor, codebook_size: int) -> None:
    """Once per song: the codec replaces LM ids past its codebook (SPEC §5.1)."""
    from heartmula_rt.model.codec.detokenize import sanitize_codes

    n_stray = sanitize_codes(frames, codebook_size, frames.shape[0])[1]
    if n_stray:
        print(
            f"note: replaced {n_stray} codec ids ≥ {codebook_size} by a neighbouring frame's",
            file=sys.stderr,
        )


def _save_sidecar(
    pipe: Pipeline, out: Path, frames: torch.Tensor, request: SongRequest, ended: str
) -> Path:
    """The song's codes beside its audio file `out` (codes.py); returns the sidecar's path."""
    from heartmula_rt.runtime.codes import SongCodes, sidecar_path

    path = sidecar_path(out)
    SongCodes(frames, request, ended, pipe.fingerprint).save(path)
    return path


def _add_prefixes(path: Path, song: SongCodes, prefixes: torch.Tensor) -> None:
    """The sidecar `song` written to `path` again, now with the codec's window prefixes of the
    audio just written beside it (codes.py), so that an edit of the song decodes only the
    windows it changes. A failure to write loses only them, and is said."""
    try:
        replace(song, prefixes=prefixes).save(path)
    except OSError as e:
        print(
            f"note: could not add the codec's window prefixes to {path} ({e.strerror or e}); "
            "its codes are kept, but an edit of the song will decode every window",
            file=sys.stderr,
        )


@dataclass(frozen=True)
class _Original:
    """An edited song's audio as it was decoded, read back from its lossless file, and the
    codec's window prefixes from its sidecar: an edit's audio then decodes only the windows
    from the first changed one (`Pipeline.redecode_frames`), the samples before it copied.
    `changed_from`: the first frame the edit changes."""

    path: Path
    wav: torch.Tensor
    prefixes: torch.Tensor
    changed_from: int


def _original_audio(
    given: Path, sidecar: Path, song: SongCodes, changed_from: int, sample_rate: int
) -> _Original | None:
    """The song's audio and prefixes for an edit of `song` that changes its frames from
    `changed_from` on (`given`: the SONG argument). None, said once on stderr, where they
    cannot be had: `given` is the sidecar, which keeps no prefixes (a streamed song, an older
    heartmula-rt's), or the audio is lossy (MP3, Ogg) or not the song of the codes."""
    import soundfile as sf
    import torch

    from heartmula_rt.model.codec.detokenize import num_output_samples
    from heartmula_rt.runtime.codes import SUFFIX

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
                return _Original(given, wav, song.prefixes, changed_from)
            why = f"{given.name} read as {list(wav.shape)} samples, not [2, {samples}]"
    except (sf.SoundFileError, OSError) as e:
        why = f"{given.name} cannot be read ({e})"
    print(f"note: {why}: decoding every window", file=sys.stderr)
    return None


SAVE_EVERY_S = 10.0  # at most this much of the LM's work is lost if the process dies


class _KeptFrames:
    """A song's frames as the LM makes them, saved as the sidecar beside `out` (ended
    `interrupted`) every `SAVE_EVERY_S`: if the process dies, `heartmula-rt resume` finishes
    the song from it. Its end overwrites that sidecar with the whole song's."""

    def __init__(self, pipe: Pipeline, out: Path, request: SongRequest) -> None:
        self.pipe, self.out, self.request = pipe, out, request
        self.parts: list[torch.Tensor] = []
        self.saved_at = time.monotonic()
        self.path: Path | None = None

    def add(self, new: torch.Tensor) -> None:
        import torch

        self.parts.append(new)
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            codes = torch.cat(self.parts, dim=1)
            self.path = _save_sidecar(self.pipe, self.out, codes, self.request, "interrupted")
            self.saved_at = time.monotonic()

    def drop(self) -> None:
        """The song's frames went elsewhere (a `.partial` file's sidecar): this one goes."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _decode_keeping_codes(
    pipe: Pipeline,
    frames: torch.Tensor,
    out: Path,
    request: SongRequest,
    ended: str,
    original: _Original | None = None,
) -> float | None:
    """As `_decode_and_write`, with the song's sidecar (codes.py, how its LM part `ended`)
    saved first beside `out` and kept: if the codec stage is interrupted (then None, said on
    stderr) or fails, the LM's work survives, and `heartmula-rt decode` finishes it. Once the
    audio is written, the sidecar is written again with the codec's window prefixes."""
    from heartmula_rt.runtime.codes import SongCodes

    song = SongCodes(frames, request, ended, pipe.fingerprint)
    kept = _save_sidecar(pipe, out, frames, request, ended)
    try:
        seconds, prefixes = _decode_and_write(
            pipe, frames, out, request.noise_seed, request.codec, original
        )
    except BaseException as e:
        what = f"the LM's {frames.shape[1]} frames are saved in {kept}"
        how = f"`heartmula-rt decode {kept} -o {out}` makes the song from them"
        _codec_stage_stopped(e, what, how)
        return None
    _add_prefixes(kept, song, prefixes)
    return seconds


def _codec_stage_stopped(e: BaseException, what: str, how: str) -> None:
    """The codec stage ended by `e`, the LM's frames kept (`what` says where, `how` how to
    finish): a Ctrl-C is said and returns; an error is raised again, with `what` said."""
    if isinstance(e, KeyboardInterrupt):
        print(f"interrupted during the codec: {what}; {how}", file=sys.stderr)
        return
    if isinstance(e, UserError):
        raise UserError(f"{e}; {what}") from None
    print(f"heartmula-rt: {what}; {how}", file=sys.stderr)
    raise e


def _decode_and_write(
    pipe: Pipeline,
    frames: torch.Tensor,
    out: Path,
    seed: int,
    params: CodecParams,
    original: _Original | None = None,
) -> tuple[float, torch.Tensor]:
    """Frames → waveform → file; returns the audio length in seconds and the codec's window
    prefixes. With `original` (an edit's song), only the windows from the first changed one
    are decoded, and how many is said."""
    _note_stray_ids(frames, pipe.codec_config.codebook_size)
    bar = tqdm(total=None, desc="codec", unit="window", leave=False, file=sys.stderr)
    decoded = 0

    def on_window(done: int, total: int) -> None:
        nonlocal decoded
        decoded = done
        bar.total = total
        bar.update(done - bar.n)

    try:
        if original is None:
            wav, prefixes = pipe.decode_frames(
                frames, params, seed=seed, on_window=on_window, return_prefixes=True
            )
        else:
            wav, prefixes = pipe.redecode_frames(
                frames,
                params,
                seed=seed,
                changed_from=original.changed_from,
                prefixes=original.prefixes,
                original=original.wav,
                on_window=on_window,
            )
    finally:
        bar.close()
    if original is not None:
        from heartmula_rt.model.codec.detokenize import HOP

        windows = prefixes.shape[0]
        kept = ""
        if decoded < windows:  # windows c − 1 … decoded: the audio before window c is copied
            copied = (windows - decoded + 1) * HOP * FRAME_MS / 1000
            kept = f"; the audio before {copied:g} s is {original.path.name}'s"
        print(f"codec: decoded {decoded} of {windows} windows{kept}", file=sys.stderr)
    return _write_song(pipe, wav, out), prefixes


def _write_song(pipe: Pipeline, wav: torch.Tensor, out: Path) -> float:
    """A waveform → `out`; returns the audio length in seconds."""
    from heartmula_rt.runtime.audio import write_audio

    clipped = write_audio(out, wav, pipe.sample_rate)
    if clipped:
        print(
            f"note: {clipped} samples in {out.name} were outside [-1, 1] and were clipped",
            file=sys.stderr,
        )
    return wav.shape[-1] / pipe.sample_rate


def _reader_gone(sink) -> bool:
    """Whether the pipe `sink` writes into has lost its reader: a pipe with room may accept a
    whole song before its reader goes (`| head -c 1000`), so no write ever fails."""
    try:
        poll = select.poll()
        poll.register(sink.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # not a file descriptor (a test's capture)
        return False


def _stream_and_write(pipe: Pipeline, out: Path | None, request: SongRequest) -> int:
    """Stream the song into `out` (None: stdout) as it is made; see audio.WavStream for the
    file's life: `<stem>.partial.wav` while it grows, renamed to `out` once complete."""
    from heartmula_rt.runtime.audio import WavStream, partial_path
    from heartmula_rt.runtime.codes import lm_end

    start = time.perf_counter()
    total = request.sampling.max_frames + 1
    bar = tqdm(total=total, desc="LM", unit="frame", file=sys.stderr)
    target = "stdout" if out is None else partial_path(out)
    try:
        sink = sys.stdout.buffer if out is None else open(target, "wb")  # noqa: SIM115
    except OSError as e:
        raise UserError(f"could not write {target} ({e.strerror})") from None
    try:
        wav = WavStream(sink, pipe.sample_rate)  # a pipe gets the header now
    except BrokenPipeError:
        bar.close()
        print(
            "broken pipe: the program reading stdout closed it before the song began",
            file=sys.stderr,
        )
        return EXIT_BROKEN_PIPE
    stream = pipe.stream(request, on_frame=lambda n: bar.update(n - bar.n))
    ended = None  # why the song stopped early, if it did
    try:
        for piece in stream:
            if stream.first_audio_s is not None and wav.data_bytes == 0:
                print(f"first audio after {stream.first_audio_s:.2f} s", file=sys.stderr)
            try:
                wav.write(piece)
            except BrokenPipeError:
                ended = "broken pipe: the program reading stdout closed it"
                stream.stop()
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no more output
                break
            except OSError as e:
                stream.stop()
                raise UserError(
                    f"could not write {target} ({e.strerror}); it holds the audio written so far"
                ) from None
    except KeyboardInterrupt:
        ended = "interrupted"
        bar.close()
        print("interrupted: decoding the frames made so far", file=sys.stderr)
        stream.stop()
        for piece in stream:  # the song to its (new) end; a second Ctrl-C stops at once
            wav.write(piece)
    finally:
        bar.close()
        if out is not None:
            sink.close()
    if wav.clipped:
        print(f"note: {wav.clipped} samples were outside [-1, 1] and were clipped", file=sys.stderr)
    if ended is None and stream.interrupted:
        ended = "interrupted"
    if ended is None and out is None and _reader_gone(sys.stdout):
        ended = "broken pipe: the program reading stdout closed it"
    if ended is not None and wav.data_bytes == 0 and out is not None:
        Path(target).unlink()
        print(f"{ended} before the first audio: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    if ended is not None:
        if out is not None and stream.frames is not None:  # the codes beside the partial file
            _save_sidecar(pipe, target, stream.frames, request, "interrupted")
        print(f"{ended}: wrote {target} ({wav.seconds:.1f} s of audio, partial)", file=sys.stderr)
        return EXIT_BROKEN_PIPE if ended.startswith("broken pipe") else EXIT_INTERRUPTED
    if out is not None:
        if stream.frames is not None:
            why = lm_end(stream.frames, request.sampling)
            _save_sidecar(pipe, out, stream.frames, request, why)
        os.replace(target, out)
    if stream.frames is not None:
        _note_stray_ids(stream.frames, pipe.codec_config.codebook_size)
    wall = time.perf_counter() - start
    print(
        f"wrote {out or 'stdout'}: {wav.seconds:.1f} s of audio in {wall:.1f} s "
        f"(RTF {wall / max(wav.seconds, 1e-9):.3f}; first audio after "
        f"{stream.first_audio_s:.2f} s)",
        file=sys.stderr,
    )
    return 0


def _print_loaded(pipe: Pipeline, seconds: float, what: str = "") -> None:
    """The line saying what `gen` loaded (and `what` it will make), and its plan if any."""
    config = pipe.config
    print(
        f"loaded {config.model_path} on {config.device} in {seconds:.1f} s (LM "
        f"{config.dtype}, quantization {config.quant}, codec {config.codec_dtype}, "
        f"{config.engine} engine, {config.threads} CPU threads){what}",
        file=sys.stderr,
    )
    if pipe.plan is not None:
        print(format_plan(pipe.plan), file=sys.stderr)


def _many_songs(args: argparse.Namespace) -> list[BatchSong] | None:
    """The songs of `--count N` (N takes of one prompt) or `--batch-file` (one per line), every
    output checked; None for one song. A song without its own seed gets `--seed` (random if
    not given) plus its index."""
    from heartmula_rt.runtime.audio import check_output_path
    from heartmula_rt.runtime.batch_file import BatchSong, read_batch_file

    if args.count is None and args.batch_file is None:
        if args.batch is not None:
            raise UserError("--batch sets songs at once for --count or --batch-file")
        return None
    if args.count is not None and args.batch_file is not None:
        raise UserError("give --count or --batch-file, not both")
    if args.stream or str(args.output) == "-":
        raise UserError("many songs are written to files: leave out --stream and -o -")
    if args.batch is not None:
        check_songs(args.batch)
    base = secrets.randbits(31) if args.seed is None else args.seed
    settings = {k: v for k, v in _song_settings(args).items() if k != "seed"}
    if args.batch_file is not None:
        if args.output is not None or args.tags or args.lyrics:
            raise UserError(
                "--batch-file songs carry their own tags, lyrics and output: leave out "
                "--tags, --lyrics and -o"
            )
        songs = read_batch_file(args.batch_file, settings)
    else:
        if args.count < 1:
            raise UserError(f"--count must be at least 1, not {args.count}")
        if args.output is None:
            raise UserError("--count needs -o/--output: takes are written as <stem>-1, <stem>-2, …")
        one = song_request(args).with_settings(seed=None)  # each take's seed is set below
        out = args.output
        songs = [
            BatchSong(one, out.with_name(f"{out.stem}-{i}{out.suffix}"), f"take {i}")
            for i in range(1, args.count + 1)
        ]
    writers: dict[Path, str] = {}
    for i, song in enumerate(songs):
        try:
            check_output_path(song.output)
        except UserError as e:
            raise UserError(f"{song.where}: {e}") from None
        key = song.output.resolve()
        if key in writers:
            raise UserError(f"{writers[key]} and {song.where} both write {song.output}")
        writers[key] = song.where
        if song.request.sampling.seed is None:
            songs[i] = replace(song, request=song.request.with_settings(seed=base + i))
    return songs


def _gen_many(args: argparse.Namespace, songs: list[BatchSong]) -> int:
    """Every song of `songs` in one batch of the LM, each through the codec as it ends (on the
    codec's thread: beside the LM with the codec on another device, else after it): each
    song's codes are saved beside its output as it ends (its sidecar, codes.py), and kept."""
    from heartmula_rt.runtime.decode import BatchInterrupted
    from heartmula_rt.runtime.pipeline import load_pipeline

    requests = [song.request for song in songs]
    at_once = min(len(songs), args.batch or DEFAULT_SONGS_AT_ONCE)
    longest = max(r.sampling.max_frames for r in requests)
    # Half a frame more, so that rounding cannot lose one (max_frames_for rounds down).
    plan_length = {"max_seconds": (longest + 0.5) * FRAME_MS / 1000}
    config = pipeline_config(args, engine=args.engine, vram=args.vram, songs=at_once, **plan_length)
    _fetch_weights(config.model_path, args.model_path)
    loading = time.perf_counter()
    pipe = load_pipeline(config)
    for song in songs:  # everything a song would be refused for, before the loaded line
        try:
            pipe.prompt(song.request)
        except UserError as e:
            raise UserError(f"{song.where}: {e}") from None
    rows = pipe.batch_rows(requests, args.batch)
    start = time.perf_counter()
    _print_loaded(pipe, start - loading, f"; {len(songs)} songs, {rows} LM rows at once")
    for song in songs:
        print(f"{song.where}: seed {song.request.sampling.seed} → {song.output}", file=sys.stderr)

    bar = tqdm(
        total=sum(r.sampling.max_frames + 1 for r in requests),
        desc="LM",
        unit="frame",
        file=sys.stderr,
    )
    made = [0] * len(songs)
    ended: dict[int, str] = {}  # how each song that ended did

    def on_frame(i: int, n: int) -> None:
        bar.update(n - made[i])
        made[i] = n

    codec = _CodecBeside(pipe, len(songs))  # each song's audio as soon as its LM part ends

    def on_end(i: int, codes: torch.Tensor, why: str) -> None:
        song = songs[i]
        _save_sidecar(pipe, song.output, codes, song.request, why)
        ended[i] = why
        codec.put(i, (song, codes, song.output, why))
        bar.total -= requests[i].sampling.max_frames + 1 - codes.shape[1]  # an early EOS
        bar.refresh()
        bar.write(
            f"{song.where}: {codes.shape[1]} frames ({'EOS' if why == 'eos' else 'its length'})",
            file=sys.stderr,
        )

    kept = [_KeptFrames(pipe, song.output, song.request) for song in songs]
    try:
        frames = pipe.generate_frames_batch(
            requests,
            rows=rows,
            on_frame=on_frame,
            on_end=on_end,
            on_codes=lambda i, new: kept[i].add(new),
        )
    except BaseException as e:
        bar.close()
        codec.stop()  # the songs that had ended are written, or kept in their sidecars
        if not isinstance(e, BatchInterrupted):
            raise
        for i, keeper in enumerate(kept):
            if i not in ended:  # its frames go to its .partial file's sidecar
                keeper.drop()
        return _decode_interrupted(pipe, songs, e.frames, ended, codec.written)
    bar.close()
    lm_s = time.perf_counter() - start
    print(
        f"LM: {sum(f.shape[1] for f in frames)} frames of {len(songs)} songs in {lm_s:.1f} s "
        f"({sum(f.shape[1] for f in frames) / lm_s:.1f} frames/s over all songs)",
        file=sys.stderr,
    )
    try:
        codec.finish()
    except KeyboardInterrupt as e:
        codec.error = e
    if codec.error is not None:  # a Ctrl-C is said; an error is said and raised again
        unwritten = [s.output for i, s in enumerate(songs) if i not in codec.written]
        _codec_stopped_for(codec.error, unwritten)
        return EXIT_INTERRUPTED
    seconds = sum(codec.written.values())
    wall = time.perf_counter() - start
    print(
        f"wrote {len(songs)} songs: {seconds:.1f} s of audio in {wall:.1f} s "
        f"(RTF {wall / max(seconds, 1e-9):.3f})",
        file=sys.stderr,
    )
    return 0


def _decode_many(
    pipe: Pipeline,
    songs: list[BatchSong],
    frames: list[torch.Tensor],
    outputs: list[Path],
    ends: list[str],
) -> float | None:
    """Decode each song's frames into its output, several songs at once; returns the seconds
    of audio written, or None if Ctrl-C stopped the codec. Each output's sidecar (saved as its
    LM part ended, how: `ends`) stays, written again with the codec's window prefixes once its
    audio is written; the songs not written are said, with how to finish them."""
    from heartmula_rt.model.codec import DECODE_SONGS

    bar = tqdm(total=len(songs), desc="codec", unit="song", leave=False, file=sys.stderr)
    done, seconds = 0, 0.0
    group = DECODE_SONGS  # a group's audio is written before the next starts
    try:
        for first in range(0, len(songs), group):
            part = range(first, min(first + group, len(songs)))
            written = _decode_group(
                pipe, [(songs[i], frames[i], outputs[i], ends[i]) for i in part], bar
            )
            seconds, done = seconds + sum(written), done + len(written)
    except BaseException as e:
        bar.close()
        _codec_stopped_for(e, outputs[done:])
        return None
    bar.close()
    return seconds


_Decodable = tuple["BatchSong", "torch.Tensor", Path, str]  # a song, its frames, output, end


def _decode_group(pipe: Pipeline, group: list[_Decodable], bar: tqdm) -> list[float]:
    """Songs decoded together (`decode_frames_batch`), each written to its output with the
    codec's window prefixes added to its sidecar; each one's seconds of audio."""
    from heartmula_rt.runtime.codes import SongCodes, sidecar_path

    for _, frames, _, _ in group:
        _note_stray_ids(frames, pipe.codec_config.codebook_size)
    decoded = pipe.decode_frames_batch(
        [frames for _, frames, _, _ in group],
        [song.request.codec for song, _, _, _ in group],
        seeds=[song.request.noise_seed for song, _, _, _ in group],
        return_prefixes=True,
    )
    seconds = []
    for (song, frames, out, ended), (wav, prefixes) in zip(group, decoded, strict=True):
        seconds.append(_write_song(pipe, wav, out))
        codes = SongCodes(frames, song.request, ended, pipe.fingerprint)
        _add_prefixes(sidecar_path(out), codes, prefixes)
        bar.update()
    return seconds


def _codec_stopped_for(e: BaseException, outputs: list[Path]) -> None:
    """`_codec_stage_stopped` for songs whose `outputs` were not written: their sidecars."""
    from heartmula_rt.runtime.codes import sidecar_path

    kept = [str(sidecar_path(out)) for out in outputs]
    what = f"the LM's frames of {len(kept)} songs are saved in {', '.join(kept)}"
    how = "`heartmula-rt decode FILE -o OUT` makes each song from its file"
    _codec_stage_stopped(e, what, how)


class _CodecBeside:
    """The codec's stage of `gen --count`/`--batch-file` on a thread of its own: each song is
    decoded and written as soon as its LM part ends, songs ended meanwhile together (up to
    `DECODE_SONGS`). With the codec on another device (`Pipeline.codec_lock`) that is while the
    LM goes on with the others; on the LM's device it waits for the LM's batch to end.

    `stop()` takes no more songs (the group being decoded is finished) and `finish()` waits for
    every song put; `written` maps each song written to its seconds of audio, and `error` holds
    what stopped the thread (then no song is decoded after it)."""

    def __init__(self, pipe: Pipeline, total: int) -> None:
        import queue
        import threading

        self.pipe = pipe
        self.written: dict[int, float] = {}
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._bar = tqdm(total=total, desc="codec", unit="song", leave=False, file=sys.stderr)
        self._thread = threading.Thread(target=self._run, name="heartmula-rt codec", daemon=True)
        self._thread.start()

    def put(self, i: int, song: _Decodable) -> None:
        self._queue.put((i, song))

    def _run(self) -> None:
        import queue

        from heartmula_rt.model.codec import DECODE_SONGS

        while (first := self._queue.get()) is not None:
            with self.pipe.codec_lock:  # the codec's turn: take what has ended meanwhile too
                if self._stopped.is_set():
                    return
                group, end = [first], False
                while len(group) < DECODE_SONGS:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        end = True
                        break
                    group.append(item)
                try:
                    seconds = _decode_group(self.pipe, [song for _, song in group], self._bar)
                except BaseException as e:  # noqa: BLE001 (said by finish(), with the sidecars)
                    self.error = e
                    return
                self.written.update(zip((i for i, _ in group), seconds, strict=True))
                if end:
                    return

    def stop(self) -> None:
        """Take no more songs; return once the group being decoded is written."""
        self._stopped.set()
        self._queue.put(None)
        self._thread.join()
        self._bar.close()

    def finish(self) -> None:
        """Return once every song put is written, or the thread has stopped on an error."""
        self._queue.put(None)
        try:
            self._thread.join()
        except BaseException:  # a Ctrl-C while waiting: no more songs after this one
            self._stopped.set()
            raise
        finally:
            self._bar.close()


def _decode_interrupted(
    pipe: Pipeline,
    songs: list[BatchSong],
    frames: list[torch.Tensor],
    ended: dict[int, str],
    written: dict[int, float],
) -> int:
    """Ctrl-C in the LM stage: songs that had ended are written to their outputs (but those
    the codec's thread has `written` already), songs cut short to `<stem>.partial<ext>` (each
    with its sidecar), songs not started are left out."""
    from heartmula_rt.runtime.audio import partial_path

    for i in written:
        print(f"wrote {songs[i].output} ({frames[i].shape[1]} frames)", file=sys.stderr)
    started = [i for i, f in enumerate(frames) if f.shape[1] and i not in written]
    for i in started:
        if i not in ended:  # an ended song's codes were saved as it ended
            partial = partial_path(songs[i].output)
            _save_sidecar(pipe, partial, frames[i], songs[i].request, "interrupted")
    if not started:
        if not written:
            print("interrupted before the first frame: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(
        f"interrupted: decoding the frames made so far ({len(ended)} of {len(songs)} songs "
        "complete)",
        file=sys.stderr,
    )
    outputs = [s.output if i in ended else partial_path(s.output) for i, s in enumerate(songs)]
    seconds = _decode_many(
        pipe,
        [songs[i] for i in started],
        [frames[i] for i in started],
        [outputs[i] for i in started],
        [ended.get(i, "interrupted") for i in started],
    )
    if seconds is not None:
        for i in started:
            partial = "" if i in ended else ", partial"
            print(f"wrote {outputs[i]} ({frames[i].shape[1]} frames{partial})", file=sys.stderr)
    return EXIT_INTERRUPTED


def cmd_gen(args: argparse.Namespace) -> int:
    from heartmula_rt.runtime.audio import check_output_path, partial_path
    from heartmula_rt.runtime.codes import lm_end
    from heartmula_rt.runtime.decode import GenerationInterrupted
    from heartmula_rt.runtime.pipeline import load_pipeline

    songs = _many_songs(args)
    if songs is not None:
        return _gen_many(args, songs)
    if args.output is None:
        raise UserError("gen needs -o/--output (or --batch-file, whose songs name their own)")
    to_stdout = str(args.output) == "-"
    out = None if to_stdout else check_output_path(args.output)
    if args.stream and not to_stdout and out.suffix.lower() != ".wav":
        raise UserError(f"--stream writes WAV: use a .wav output or - (stdout), not {out.name}")
    request = song_request(args)
    if request.sampling.seed is None:  # chosen here, so that it can be printed and kept
        request = request.with_settings(seed=secrets.randbits(31))
    plan_length = {} if args.max_seconds is None else {"max_seconds": args.max_seconds}
    config = pipeline_config(
        args, engine=args.engine, vram=args.vram, stream=args.stream or to_stdout, **plan_length
    )
    _fetch_weights(config.model_path, args.model_path)

    loading = time.perf_counter()
    pipe = load_pipeline(config)
    pipe.prompt(request)  # everything the song would be refused for, before the loaded line
    start = time.perf_counter()
    # After the last check, so that an error is the only line a failed run prints.
    _print_loaded(pipe, start - loading)
    seed = request.sampling.seed
    print(f"seed {seed}", file=sys.stderr)
    if args.stream or to_stdout:
        return _stream_and_write(pipe, out, request)

    bar = tqdm(total=request.sampling.max_frames + 1, desc="LM", unit="frame", file=sys.stderr)
    kept = _KeptFrames(pipe, out, request)
    try:
        frames = pipe.generate_frames(
            request, on_frame=lambda n: bar.update(n - bar.n), on_codes=kept.add
        )
    except GenerationInterrupted as stop:
        bar.close()
        kept.drop()
        if stop.frames.shape[-1] == 0:
            print("interrupted before the first frame: nothing written", file=sys.stderr)
            return EXIT_INTERRUPTED
        partial = partial_path(out)
        print(
            f"interrupted: decoding the {stop.frames.shape[-1]} frames made so far", file=sys.stderr
        )
        seconds = _decode_keeping_codes(pipe, stop.frames, partial, request, "interrupted")
        if seconds is None:
            return EXIT_INTERRUPTED
        print(f"wrote {partial} ({seconds:.1f} s of audio, partial)", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.total = bar.n  # ended on EOS before the frame budget: show it as complete
    bar.close()

    seconds = _decode_keeping_codes(pipe, frames, out, request, lm_end(frames, request.sampling))
    if seconds is None:
        return EXIT_INTERRUPTED
    wall = time.perf_counter() - start
    rtf = wall / max(seconds, 1e-9)
    print(f"wrote {out}: {seconds:.1f} s of audio in {wall:.1f} s (RTF {rtf:.3f})", file=sys.stderr)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """A song's audio from its sidecar (codes.py): its codes, seed and codec settings, checked
    against the checkpoint's fingerprint (unless --force) before any model loads."""
    from heartmula_rt.model import folder
    from heartmula_rt.runtime.audio import check_output_path
    from heartmula_rt.runtime.codes import SongCodes, find_sidecar, sidecar_path
    from heartmula_rt.runtime.pipeline import PipelineConfig, load_pipeline

    out = check_output_path(args.output)
    sidecar = find_sidecar(args.codes)
    song = SongCodes.load(sidecar)
    config = PipelineConfig(
        model_path=_model_path(args.model_path),
        device=args.device,
        codec_dtype=args.codec_dtype,
        engine="plain",
    )
    _fetch_weights(config.model_path, args.model_path)
    folder.check_model_path(config.model_path)
    song.check_model(folder.fingerprint(config.model_path), sidecar, force=args.force)
    # The LM is loaded too: a pipeline is both models.
    pipe = load_pipeline(config)
    seconds, prefixes = _decode_and_write(
        pipe, song.codes, out, song.request.noise_seed, song.request.codec
    )
    # The song's codes beside its audio (its own sidecar, or a copy beside another output),
    # with the codec's window prefixes of this audio.
    _add_prefixes(sidecar_path(out), song, prefixes)
    print(f"wrote {out}: {seconds:.1f} s of audio from {sidecar}", file=sys.stderr)
    return 0


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
    return seconds


def _edited_song(args: argparse.Namespace) -> tuple[Path, SongCodes, SongRequest]:
    """The song an edit starts from (its sidecar, checked), and its request with the texts the
    command line gives instead (`--tags`, `--lyrics`, read as gen reads them)."""
    from heartmula_rt.runtime.codes import SongCodes, find_sidecar

    if args.tags == "-" and args.lyrics == "-":
        raise UserError("only one of --tags and --lyrics can read stdin (-)")
    sidecar = find_sidecar(args.song)
    song = SongCodes.load(sidecar)
    texts = {
        name: getattr(song.request, name) if value is None else read_text_arg(value, f"--{name}")
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
    while out.exists():
        n += 1
        out = sidecar.with_name(f"{stem}-{what}-{n}{ext}")
    return check_output_path(out)


def _edit_pipeline(args: argparse.Namespace, song: SongCodes, sidecar: Path) -> Pipeline:
    """The pipeline an edit runs on, after the song's sidecar is checked against its
    checkpoint (unless --force)."""
    from heartmula_rt.model import folder
    from heartmula_rt.runtime.pipeline import load_pipeline

    config = pipeline_config(args, engine=args.engine)
    _fetch_weights(config.model_path, args.model_path)
    folder.check_model_path(config.model_path)
    song.check_model(folder.fingerprint(config.model_path), sidecar, force=args.force)
    return load_pipeline(config)


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
        more = max_frames_for(args.seconds)
        if more < 1:
            raise UserError(f"--seconds must add at least one 80 ms frame, not {args.seconds}")
        sampling = replace(sampling, max_frames=song.frames - 1 + more)
    request = replace(request, sampling=sampling)
    if args.seed is not None:
        # New draws from here on, the song's codec noise: its windows sound as they did.
        request = request.with_settings(seed=args.seed, noise_seed=song.request.noise_seed)
        sampling = request.sampling
    context = None if args.context_seconds is None else max_frames_for(args.context_seconds)
    out = _edit_output(args, sidecar, "resumed" if resume else "extended")
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
        return EXIT_INTERRUPTED
    print(
        f"wrote {out}: {seconds:.1f} s of audio, {frames.shape[1] - song.frames} frames after "
        f"the song's {song.frames} (seed {sampling.seed})",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED if ended == "interrupted" else 0


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
            return EXIT_INTERRUPTED
        print(f"wrote {out}: {seconds:.1f} s of audio (seed {seed})", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    two_gpus = args.codec_device == "gpu" or (args.codec_device is None and "," in args.vram)
    apart = args.codec_device is not None or two_gpus
    budget, codec_budget = device_budgets(args.vram, codec_apart=apart, codec_on_gpu=two_gpus)
    codec_device = "cpu" if apart and not two_gpus else "cuda"
    sampling = SamplingParams(cfg_scale=args.cfg_scale, max_frames=max_frames_for(args.max_seconds))
    if args.model_path is None:
        lm_config, codec_config = preset_configs()
    else:
        lm_config, codec_config = checkpoint_configs(args.model_path)
    plan = plan_memory(  # a plan is for a GPU, whatever this machine has: its defaults
        budget,
        lm_config,
        codec_config,
        max_frames=sampling.max_frames,
        cfg_rows=sampling.cfg_rows,
        songs=args.songs,
        lm_dtype=args.dtype or default_dtype("cuda"),
        codec_dtype=CODEC_PRECISIONS[args.codec_dtype or default_codec_dtype(codec_device)][0],
        codec_apart=apart,
        codec_budget_bytes=codec_budget,
    )
    print(format_plan(plan))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from heartmula_rt.model import folder

    root = args.model_path or default_model_path()
    folder.download(root)
    folder.check_model_path(root)
    print(f"weights are in {root}")
    return 0


def _add_model_options(
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


def _add_song_options(p: argparse.ArgumentParser) -> None:
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


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="measure LM frames/s, codec time and real-time factor of the engines"
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--synthetic",
        choices=list(LM_PRESETS),
        default="3B",
        help="random weights of this size, made on the device (default 3B, full codec)",
    )
    model.add_argument("--model-path", type=Path, default=None, help="a checkpoint folder instead")
    p.add_argument(
        "--engines",
        default=None,
        help=f"comma list of {','.join(ENGINES)} (default: plain,graph on GPU, plain on CPU)",
    )
    _add_model_options(
        p,
        codec_help="the codec's precision (default: mixed on GPU, else float32)",
        quant_list=True,
    )
    _add_song_options(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every run (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="counted LM runs per engine (3)")
    p.add_argument("--warmup", type=int, default=1, help="LM runs per engine not counted (1)")
    p.add_argument("--codec-repeats", type=int, default=1, help="counted codec runs (1)")
    p.add_argument("--no-codec", action="store_true", help="time the LM only")
    p.add_argument(
        "--greedy-frames",
        type=int,
        default=0,
        help="also compare N top-1 frames of each engine with the plain engine's (default 0: no)",
    )
    p.add_argument(
        "--batch",
        default=None,
        help="comma list of songs at once (1,2,4,8): each engine's one song and then each "
        "batch of songs, side by side (aggregate and per-song frames/s, speed-up over one)",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help=f"prompt tokens of a synthetic run (default {DEFAULT_PROMPT_LEN})",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("benchmarks/results"),
        help="where the results JSON goes (default benchmarks/results)",
    )
    p.add_argument("--name", default=None, help="last part of the results file name")
    p.add_argument(
        "--vram",
        default=None,
        help="comma list of GPU budgets (4G,6G,8G,12G,16G,24G): one results file per budget, "
        "models placed as planned and the budget enforced",
    )
    p.add_argument(
        "--plot",
        nargs="+",
        type=Path,
        metavar="PATH",
        default=None,
        help="only draw: --plot OUT.png RESULTS.json [RESULTS.json ...]",
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from heartmula_rt.bench import plot_results, run_bench

    if args.plot is not None:
        png, *files = args.plot
        if not files:
            raise UserError("--plot needs the PNG to write, then at least one results file")
        plot_results(files, png)
        print(f"wrote {png}")
        return 0
    return run_bench(bench_config(args))


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="an HTTP API and web page: songs from many clients, heard while made"
    )
    p.add_argument("--model-path", type=Path, default=None, help="checkpoint folder (as for gen)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"required on every route but /health (default: ${API_KEY_ENV}); needed to bind "
        "anything but a loopback address",
    )
    p.add_argument(
        "--folder",
        type=Path,
        default=Path("heartmula-rt-songs"),
        help="where the job database and every song's files go (./heartmula-rt-songs)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"the longest song a request may ask for ({DEFAULT_MAX_SECONDS:g})",
    )
    p.add_argument(
        "--max-queue", type=int, default=32, help="songs waiting beyond those running (32)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"songs made at once (default {DEFAULT_SONGS_AT_ONCE}; with --vram what the plan "
        "holds)",
    )
    p.add_argument("--engine", choices=ENGINES, default=None, help="LM decode loop (as for gen)")
    p.add_argument("--vram", default=None, help="GPU memory budget(s) such as 12G (as for gen)")
    _add_model_options(p, codec_help="as for gen")
    ray = p.add_argument_group("scale out on Ray Serve (pip install 'heartmula-rt[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve with model replicas on Ray Serve")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (1; or min/max below)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling's least")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling's most")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs a replica takes (1)")
    ray.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="GPUs a replica takes (default: its pipeline's, 1 on a GPU, 2 with --codec-device on "
        "another, else 0)",
    )
    ray.add_argument("--ray-address", default=None, help="a Ray cluster's (default: start one)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from heartmula_rt.serve.server import ServerConfig, check_server, run_server
    from heartmula_rt.serve.service import ServiceConfig

    server = ServerConfig(
        ServiceConfig(args.folder, args.batch, args.max_queue, args.max_seconds),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
    )
    check_server(server)
    songs = {} if args.batch is None else {"songs": args.batch}
    config = pipeline_config(
        args, engine=args.engine, vram=args.vram, max_seconds=args.max_seconds, **songs
    )
    _fetch_weights(config.model_path, args.model_path)
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
        from heartmula_rt.serve.ray_app import ScaleConfig, run_ray_server
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
        pipeline_config,
        args,
        engine=args.engine,
        vram=args.vram,
        max_seconds=args.max_seconds,
        **songs,
    )
    return run_ray_server(factory, server, scale, args.ray_address)


def _add_edit_parsers(subparsers: argparse._SubParsersAction) -> None:
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
        p.add_argument("-o", "--output", type=Path, default=None, help="default: beside SONG")
        p.add_argument("--force", action="store_true", help="use codes of another checkpoint")
        p.add_argument("--model-path", type=Path, default=None, help="checkpoint folder")
        p.add_argument("--engine", choices=ENGINES, default=None, help="as for gen")
        _add_model_options(p, codec_help="as for gen")
        p.set_defaults(func=cmd_regen if name == "regen" else cmd_extend)
        if name == "resume":
            p.set_defaults(tags=None, lyrics=None, seconds=None, context_seconds=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="heartmula-rt", description="Fast HeartMuLa music generation.")
    parser.add_argument("--version", action="version", version=f"heartmula-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("gen", help="make a song from tags and lyrics")
    gen.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help=f"checkpoint folder (default: {default_model_path()}, downloaded on first use)",
    )
    gen.add_argument(
        "--tags",
        default="",
        help="comma-separated tags, a text file of them, or - to read them from stdin",
    )
    gen.add_argument(
        "--lyrics", default="", help="lyrics, a text file of them, or - to read them from stdin"
    )
    _add_song_options(gen)
    gen.add_argument("--seed", type=int, default=None, help="default: random, printed")
    gen.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="LM decode loop: plain (eager PyTorch), graph (one CUDA graph per frame) or "
        "compile (torch.compile, then graphs); default: graph on GPU, plain on CPU",
    )
    _add_model_options(
        gen,
        codec_help="mixed: the DiT in bfloat16, the rest float32 (default on GPU); float32 "
        "(default on CPU); bfloat16: everything, lower quality",
    )
    gen.add_argument(
        "--vram",
        default=None,
        help="GPU memory budget such as 12G: the planner then chooses quantization and "
        "placement (see `heartmula-rt plan`); with --codec-device on a second GPU, each one's, "
        "or two such as 12G,8G: the LM's GPU's, then the codec's",
    )
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output file: .wav .flac .ogg or .mp3; - streams WAV to stdout (for a player)",
    )
    gen.add_argument(
        "--count",
        type=int,
        default=None,
        help="make N takes of the song in one batch: seeds seed … seed+N-1, files "
        "<stem>-1 … <stem>-N",
    )
    gen.add_argument(
        "--batch-file",
        type=Path,
        default=None,
        help="make one song per line of a JSON-lines file (tags, lyrics, output, and any of "
        "seconds, seed, topk, temperature, cfg_scale, num_steps, guidance_scale; the flags "
        "give what a line leaves out)",
    )
    gen.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"songs the LM makes at once with --count or --batch-file (default: all, at most "
        f"{DEFAULT_SONGS_AT_ONCE}; with --vram at most what the plan holds)",
    )
    gen.add_argument(
        "--stream",
        action="store_true",
        help="write the .wav while the song is made (as <stem>.partial.wav, renamed when done); "
        "prints the time to first audio",
    )
    gen.set_defaults(func=cmd_gen)

    plan = sub.add_parser(
        "plan", help="print the memory plan and predicted peak of a --vram budget (no weights)"
    )
    plan.add_argument(
        "--vram",
        required=True,
        help="GPU memory budget, such as 6G or 12GiB; two, such as 12G,8G: the LM's GPU and the "
        "codec's GPU",
    )
    plan.add_argument(
        "--codec-device",
        choices=("cpu", "gpu"),
        default=None,
        help="the codec on another device than the LM's GPU: cpu (not planned) or gpu (a second "
        "GPU, with the same budget unless --vram gives two); two budgets imply gpu",
    )
    plan.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"longest song ({DEFAULT_MAX_SECONDS:g})",
    )
    plan.add_argument(
        "--cfg-scale",
        type=float,
        default=SamplingParams.cfg_scale,
        help=f"≤ 1 plans one LM row, no guidance ({SamplingParams.cfg_scale})",
    )
    plan.add_argument(
        "--songs",
        type=int,
        default=1,
        help="songs made at once, each with its own KV cache rows (1); the plan also says how "
        "many its layout holds",
    )
    plan.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="a checkpoint folder (configs and headers only); default: the 3B model's sizes",
    )
    plan.add_argument(
        "--dtype", choices=LM_DTYPES, default=None, help="LM (default: the GPU's, bfloat16)"
    )
    plan.add_argument(
        "--codec-dtype",
        choices=list(CODEC_PRECISIONS),
        default=None,
        help="codec (default: the GPU's, mixed)",
    )
    plan.set_defaults(func=cmd_plan)

    dec = sub.add_parser(
        "decode", help="a song's audio again from its codes (the .codes.safetensors beside it)"
    )
    dec.add_argument(
        "codes",
        type=Path,
        help="a song's <stem>.codes.safetensors sidecar, or its audio file (the sidecar beside "
        "it is read)",
    )
    dec.add_argument(
        "--force",
        action="store_true",
        help="decode codes made with another checkpoint than --model-path's",
    )
    dec.add_argument("--model-path", type=Path, default=None, help="checkpoint folder (as for gen)")
    dec.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    dec.add_argument(
        "--codec-dtype", choices=list(CODEC_PRECISIONS), default=None, help="as for gen"
    )
    dec.add_argument("-o", "--output", type=Path, required=True, help="output audio file")
    dec.set_defaults(func=cmd_decode)

    dl = sub.add_parser("download", help="fetch the official weights from the Hugging Face hub")
    dl.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help=f"where to put them (default: {default_model_path()})",
    )
    dl.set_defaults(func=cmd_download)

    _add_bench_parser(sub)
    _add_serve_parser(sub)
    _add_edit_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"heartmula-rt: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
