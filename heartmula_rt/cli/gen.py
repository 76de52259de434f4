"""`heartmula-rt gen`: one song, `--count` takes or a `--batch-file` of songs, each written to
its file through the song runner (runtime/runner.py), or one song streamed as it is made."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import select
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from heartmula_rt.cli import common, reference
from heartmula_rt.config import DEFAULT_SONGS_AT_ONCE, ENGINES, default_model_path
from heartmula_rt.errors import UserError
from heartmula_rt.request import FRAME_MS, SongRequest, check_songs
from heartmula_rt.runtime.events import SongEvents

if TYPE_CHECKING:
    import torch

    from heartmula_rt.runtime.batch_file import BatchSong
    from heartmula_rt.runtime.pipeline import Pipeline
    from heartmula_rt.runtime.runner import Song, SongsInterrupted


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("gen", help="make a song from tags and lyrics")
    common.add_model_path(
        gen, f"checkpoint folder (default: {default_model_path()}, downloaded on first use)"
    )
    gen.add_argument(
        "--tags",
        default="",
        help="comma-separated tags, a text file of them, or - to read them from stdin",
    )
    gen.add_argument(
        "--lyrics", default="", help="lyrics, a text file of them, or - to read them from stdin"
    )
    common.add_song_options(gen)
    gen.add_argument("--seed", type=int, default=None, help="default: random, printed")
    gen.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="LM decode loop: plain (eager PyTorch), graph (one CUDA graph per frame) or "
        "compile (torch.compile, then graphs); default: graph on GPU, plain on CPU",
    )
    common.add_model_options(
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
    reference.add_reference_options(gen)
    gen.add_argument(
        "--stream",
        action="store_true",
        help="write the .wav while the song is made (as <stem>.partial.wav, renamed when done); "
        "prints the time to first audio",
    )
    gen.set_defaults(func=cmd_gen)



def cmd_gen(args: argparse.Namespace) -> int:
    from heartmula_rt.runtime.audio import check_output_path
    from heartmula_rt.runtime.batch_file import BatchSong

    reference.check_reference_args(args)
    songs = _many_songs(args)
    if songs is None:
        if args.output is None:
            raise UserError("gen needs -o/--output (or --batch-file, whose songs name their own)")
        to_stdout = str(args.output) == "-"
        out = None if to_stdout else check_output_path(args.output)
        if args.stream and not to_stdout and out.suffix.lower() != ".wav":
            raise UserError(
                f"--stream writes WAV: use a .wav output or - (stdout), not {out.name}"
            )
        request = common.song_request(args)
        if request.sampling.seed is None:  # chosen here, so that it can be printed and kept
            request = request.with_settings(seed=secrets.randbits(31))
        # The reference's embedding (its embedder loaded, run and freed) before the LM loads.
        request = replace(request, reference=reference.reference_of_args(args))
        if args.stream or to_stdout:
            return _gen_stream(args, out, request)
        songs = [BatchSong(request, out, "")]
    else:
        ref = reference.reference_of_args(args)  # every song's, made once
        if ref is not None:
            songs = [replace(s, request=replace(s.request, reference=ref)) for s in songs]
    return _gen_songs(args, songs, many=songs[0].where != "")


def _gen_stream(args: argparse.Namespace, out: Path | None, request: SongRequest) -> int:
    from heartmula_rt.runtime.loader import load_pipeline

    plan_length = {} if args.max_seconds is None else {"max_seconds": args.max_seconds}
    config = common.pipeline_config(
        args, engine=args.engine, vram=args.vram, stream=True, **plan_length
    )
    common.fetch_weights(config.model_path, args.model_path)
    loading = time.perf_counter()
    pipe = load_pipeline(config)
    pipe.prompt(request)  # everything the song would be refused for, before the loaded line
    common.print_loaded(pipe, time.perf_counter() - loading)
    print(f"seed {request.sampling.seed}", file=sys.stderr)
    return _stream_and_write(pipe, out, request)


def _gen_songs(args: argparse.Namespace, batch: list[BatchSong], *, many: bool) -> int:
    """Songs made in one batch of the LM through the song runner, each written to its output
    (its codes kept beside it as made, and as soon as its LM part ends)."""
    from heartmula_rt.runtime.loader import load_pipeline
    from heartmula_rt.runtime.runner import CodecStopped, Song, SongRunner, SongsInterrupted
    from heartmula_rt.runtime.scheduler import SongRun

    requests = [song.request for song in batch]
    plan = {}
    if many:
        longest = max(r.sampling.max_frames for r in requests)
        # Half a frame more, so that rounding cannot lose one (max_frames_for rounds down).
        plan = {"max_seconds": (longest + 0.5) * FRAME_MS / 1000}
        plan["songs"] = min(len(batch), args.batch or DEFAULT_SONGS_AT_ONCE)
    elif args.max_seconds is not None:
        plan = {"max_seconds": args.max_seconds}
    config = common.pipeline_config(args, engine=args.engine, vram=args.vram, **plan)
    common.fetch_weights(config.model_path, args.model_path)
    loading = time.perf_counter()
    pipe = load_pipeline(config)
    prompts = []
    for song in batch:  # everything a song would be refused for, before the loaded line
        try:
            prompts.append(pipe.prompt(song.request))
        except UserError as e:
            raise UserError(f"{song.where}: {e}" if many else str(e)) from None
    rows = pipe.batch_rows(requests, args.batch) if many else requests[0].sampling.cfg_rows
    start = time.perf_counter()
    # After the last check, so that an error is the only line a failed run prints.
    common.print_loaded(
        pipe, start - loading, f"; {len(batch)} songs, {rows} LM rows at once" * many
    )
    if not many:
        print(f"seed {requests[0].sampling.seed}", file=sys.stderr)
    for song in batch if many else ():
        print(f"{song.where}: seed {song.request.sampling.seed} → {song.output}", file=sys.stderr)
    songs = [
        Song(b.request, SongRun(p, b.request.sampling), output=b.output, label=b.where)
        for b, p in zip(batch, prompts, strict=True)
    ]
    progress = _Progress(pipe, songs, many=many)
    positions = max(s.run.positions for s in songs)
    runner = SongRunner(pipe, rows=rows, positions=positions, events=progress, one_song=not many)
    for song in songs:
        runner.submit(song)
    try:
        runner.run()
    except SongsInterrupted as stop:
        progress.close()
        return _interrupted(stop, many=many)
    except CodecStopped as stop:
        progress.close()
        _codec_stopped(stop, many=many)
        return common.EXIT_INTERRUPTED
    progress.close()
    seconds = sum(s.seconds for s in songs)
    wall = time.perf_counter() - start
    rtf = f"RTF {wall / max(seconds, 1e-9):.3f}"
    if many:
        print(f"wrote {len(songs)} songs: {seconds:.1f} s of audio in {wall:.1f} s ({rtf})",
              file=sys.stderr)
    else:
        print(f"wrote {songs[0].output}: {seconds:.1f} s of audio in {wall:.1f} s ({rtf})",
              file=sys.stderr)
    return 0


class _Progress(SongEvents):
    """What gen shows of its songs: the LM's bar (frames of all songs), a line as each song's
    LM part ends (many songs), the codec's bar (windows of one song, or songs)."""

    def __init__(self, pipe: Pipeline, songs: list[Song], *, many: bool) -> None:
        self.pipe, self.songs, self.many = pipe, songs, many
        total = sum(s.request.sampling.max_frames + 1 for s in songs)
        self.bar = tqdm(total=total, desc="LM", unit="frame", file=sys.stderr)
        self.codec_bar: tqdm | None = None
        self.started = time.perf_counter()

    def frames(self, song: Song, new: torch.Tensor) -> None:
        self.bar.update(new.shape[1])

    def lm_ended(self, song: Song) -> None:
        made = song.codes.shape[1]
        self.bar.total -= song.request.sampling.max_frames + 1 - made  # an early EOS
        self.bar.refresh()
        if made:
            common.note_stray_ids(song.codes, self.pipe.codec_config.codebook_size)
        if song.note:  # its codes could not go to its sidecar (a full disk)
            self.bar.write(f"note: {song.note}", file=sys.stderr)
        if self.many:
            how = "EOS" if song.ended == "eos" else "its length"
            self.bar.write(f"{song.label}: {made} frames ({how})", file=sys.stderr)

    def lm_finished(self) -> None:
        self.bar.close()
        if self.many:
            lm_s = time.perf_counter() - self.started
            made = sum(s.made for s in self.songs)
            print(
                f"LM: {made} frames of {len(self.songs)} songs in {lm_s:.1f} s "
                f"({made / lm_s:.1f} frames/s over all songs)",
                file=sys.stderr,
            )

    def window(self, song: Song, done: int, total: int) -> None:
        if self.many:
            return
        if self.codec_bar is None:
            self.codec_bar = tqdm(total=None, desc="codec", unit="window", leave=False,
                                  file=sys.stderr)
        self.codec_bar.total = total
        self.codec_bar.update(done - self.codec_bar.n)

    def written(self, song: Song) -> None:
        if self.many:
            if self.codec_bar is None:
                self.codec_bar = tqdm(total=len(self.songs), desc="codec", unit="song",
                                      leave=False, file=sys.stderr)
            self.codec_bar.update()
        if song.clipped:
            print(
                f"note: {song.clipped} samples in {song.output.name} were outside [-1, 1] and "
                "were clipped",
                file=sys.stderr,
            )
        if song.error:  # the window prefixes could not be added to its sidecar
            print(f"note: {song.error}", file=sys.stderr)

    def interrupted(self, started: list[Song]) -> None:
        self.bar.close()
        for song in self.songs:
            if song.written:
                print(f"wrote {song.output} ({song.made} frames)", file=sys.stderr)
        if self.many:
            complete = sum(s.ended in ("eos", "length") for s in self.songs)
            print(
                f"interrupted: decoding the frames made so far ({complete} of "
                f"{len(self.songs)} songs complete)",
                file=sys.stderr,
            )
        else:
            print(f"interrupted: decoding the {started[0].made} frames made so far",
                  file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.codec_bar is not None:
            self.codec_bar.close()


def _interrupted(stop: SongsInterrupted, *, many: bool) -> int:
    """Ctrl-C in the LM stage: what was kept, said (the runner wrote it)."""
    started = [s for s in stop.songs if s.made and s.codes is not None]
    if not any(s.written for s in stop.songs) and not started:
        print("interrupted before the first frame: nothing written", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    if stop.codec is not None:
        _codec_stopped(stop.codec, many=many)
        return common.EXIT_INTERRUPTED
    for song in started:
        partial = ", partial" if song.ended == "interrupted" else ""
        if many:
            print(f"wrote {song.output} ({song.made} frames{partial})", file=sys.stderr)
        else:
            print(f"wrote {song.output} ({song.seconds:.1f} s of audio{partial})",
                  file=sys.stderr)
    cut = [str(s.output) for s in started if s.ended == "interrupted"]
    if cut:  # resume writes each one's <stem><ext>: the song as if never interrupted
        print(f"`heartmula-rt resume {' '.join(cut)}` finishes "
              f"{'it' if len(cut) == 1 else 'each one (one at a time)'}", file=sys.stderr)
    return common.EXIT_INTERRUPTED


def _codec_stopped(stop: object, *, many: bool) -> None:
    """The codec stage stopped: each unwritten song's sidecar named, with how to finish it."""
    for song in stop.unwritten:
        if song.sidecar is None:  # its codes could be written nowhere (save_codes says)
            print(f"heartmula-rt: {song.label or song.output}: {song.note}", file=sys.stderr)
    kept = [str(s.sidecar) for s in stop.unwritten if s.sidecar is not None]
    if not kept:
        how = "make the songs again with the same seeds and settings"
        common.codec_stage_stopped(stop.cause, "nothing of the LM's work could be saved", how)
        return
    if many or len(stop.unwritten) != 1:
        what = f"the LM's frames of {len(kept)} songs are saved in {', '.join(kept)}"
        how = "`heartmula-rt decode FILE -o OUT` makes each song from its file"
    else:
        song = stop.unwritten[0]
        what = f"the LM's {song.codes.shape[1]} frames are saved in {song.sidecar}"
        how = f"`heartmula-rt decode {song.sidecar} -o {song.output}` makes the song from them"
    common.codec_stage_stopped(stop.cause, what, how)


def _many_songs(args: argparse.Namespace) -> list[BatchSong] | None:
    """The songs of `--count N` (N takes of one prompt) or `--batch-file` (one per line), every
    output checked; None for one song. A song without its own seed gets `--seed` (random if
    not given) plus its index."""
    from heartmula_rt.runtime.audio import check_output_path
    from heartmula_rt.runtime.batch_file import BatchSong, read_batch_file
    from heartmula_rt.runtime.codes import sidecar_path

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
    settings = {k: v for k, v in common.song_settings(args).items() if k != "seed"}
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
        one = common.song_request(args).with_settings(seed=None)  # each take's seed is set below
        out = args.output
        songs = [
            BatchSong(one, out.with_name(f"{out.stem}-{i}{out.suffix}"), f"take {i}")
            for i in range(1, args.count + 1)
        ]
    writers: dict[Path, str] = {}
    sidecars: dict[Path, tuple[str, Path]] = {}  # x.wav and x.flac share x.codes.safetensors
    for i, song in enumerate(songs):
        try:
            check_output_path(song.output)
        except UserError as e:
            raise UserError(f"{song.where}: {e}") from None
        key = song.output.resolve()
        if key in writers:
            raise UserError(f"{writers[key]} and {song.where} both write {song.output}")
        writers[key] = song.where
        codes = sidecar_path(key)
        if codes in sidecars:
            where, other = sidecars[codes]
            raise UserError(
                f"{where} ({other.name}) and {song.where} ({song.output.name}) would both keep "
                f"their codes in {sidecar_path(song.output)}: give them different names"
            )
        sidecars[codes] = (song.where, song.output)
        if song.request.sampling.seed is None:
            songs[i] = replace(song, request=song.request.with_settings(seed=base + i))
    return songs


def _reader_gone(sink) -> bool:
    """Whether the pipe `sink` writes into has lost its reader: a pipe with room may accept a
    whole song before its reader goes (`| head -c 1000`), so no write ever fails."""
    try:
        poll = select.poll()
        poll.register(sink.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # not a file descriptor (a test's capture)
        return False


def _why(e: OSError) -> str:
    return (e.strerror or str(e)).lower()  # "no space left on device"


def _drop_stdout(out: Path | None) -> None:
    """After a failed write to stdout: what is buffered goes nowhere (no second error when
    Python flushes stdout at exit)."""
    if out is None:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _keep_stream_codes(pipe: Pipeline, request: SongRequest, stream, out: Path | None) -> str:
    """A streamed song whose audio could not be written: its frames so far kept in a sidecar
    (beside `out`'s partial file; for stdout, which has no path, `heartmula-<seed>.codes.
    safetensors` in the current folder), and the sentence saying where and how to finish."""
    from heartmula_rt.runtime.audio import partial_path
    from heartmula_rt.runtime.codes import SUFFIX, lm_end
    from heartmula_rt.runtime.runner import Song, save_codes

    frames = stream.frames
    if frames is None or frames.shape[1] == 0:
        return "no frame was made"
    ended = "interrupted" if stream.interrupted else lm_end(frames, request.sampling)
    if out is not None:
        song = Song(request, output=partial_path(out))
    else:
        name, n = f"heartmula-{request.sampling.seed}", 1
        while Path(f"{name}{'' if n == 1 else f'-{n}'}{SUFFIX}").exists():
            n += 1
        song = Song(request, sidecar=Path(f"{name}{'' if n == 1 else f'-{n}'}{SUFFIX}"))
    save_codes(pipe, song, frames, ended)
    if song.sidecar is None:
        return song.note
    if ended == "interrupted":
        how = f"`heartmula-rt resume {song.sidecar}` finishes the song"
    else:
        how = f"`heartmula-rt decode {song.sidecar} -o OUT` makes the song from them"
    return f"its {frames.shape[1]} frames are kept in {song.sidecar} ({how})"


def _stream_and_write(pipe: Pipeline, out: Path | None, request: SongRequest) -> int:
    """Stream the song into `out` (None: stdout) as it is made; see audio.WavStream for the
    file's life: `<stem>.partial.wav` while it grows, renamed to `out` once complete."""
    from heartmula_rt.runtime.audio import WavStream, partial_path
    from heartmula_rt.runtime.codes import lm_end
    from heartmula_rt.runtime.runner import Song, save_codes

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
        return common.EXIT_BROKEN_PIPE
    except OSError as e:  # stdout on a full disk (`-o - > /dev/full`): nothing made yet
        bar.close()
        _drop_stdout(out)
        raise UserError(f"could not write {target}: {_why(e)}; nothing was made") from None
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
            except OSError as e:  # a full disk, a file size limit: an error, the codes kept
                stream.stop()
                bar.close()
                _drop_stdout(out)
                kept = _keep_stream_codes(pipe, request, stream, out)
                what = "" if out is None else f"; {target} holds the audio written so far"
                raise UserError(f"could not write {target}: {_why(e)}{what}; {kept}") from None
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
        return common.EXIT_INTERRUPTED
    if ended is not None:
        if out is not None and stream.frames is not None:  # the codes beside the partial file
            save_codes(pipe, Song(request, output=target), stream.frames, "interrupted")
        print(f"{ended}: wrote {target} ({wav.seconds:.1f} s of audio, partial)", file=sys.stderr)
        return (
            common.EXIT_BROKEN_PIPE if ended.startswith("broken pipe") else common.EXIT_INTERRUPTED
        )
    if out is not None:
        if stream.frames is not None:
            why = lm_end(stream.frames, request.sampling)
            save_codes(pipe, Song(request, output=out), stream.frames, why)
        os.replace(target, out)
    if stream.frames is not None:
        common.note_stray_ids(stream.frames, pipe.codec_config.codebook_size)
    wall = time.perf_counter() - start
    print(
        f"wrote {out or 'stdout'}: {wav.seconds:.1f} s of audio in {wall:.1f} s "
        f"(RTF {wall / max(wav.seconds, 1e-9):.3f}; first audio after "
        f"{stream.first_audio_s:.2f} s)",
        file=sys.stderr,
    )
    return 0


