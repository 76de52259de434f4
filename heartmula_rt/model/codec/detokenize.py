"""Codes [8, T] → stereo waveform (SPEC §5.1–5.4, §5.7): input guard, windows, in-context
chaining of the flow-matching latents, scalar decoding and crossfade stitching.

Windows are 372 codes (744 latent frames) with a hop of 320; each window after the first takes
the previous window's last 104 latent frames as its in-context prefix. The reference's tail-drop
quirk is fixed: the codes are always padded to a whole number of hops plus the overlap, so every
code is decoded.

`WindowDecoder` is the one implementation: `detokenize` gives it every code at once, streaming
(runtime/stream.py) gives it codes as the LM makes them, and both get the same samples.
`WindowDecoder.decode_rounds` decodes several songs' windows together (`detokenize_many`), each
song getting the samples it gets alone.

Re-decoding an edited song (`HeartCodec.redecode`): a decoder made with `keep_prefixes=True`
records the in-context prefix each window hands to the next; one made with `resume=k` and
window k−1's recorded prefix picks the song up at window k, drawing and dropping the k windows'
noise before it, and hands out audio from window k+1's region on (window k is decoded again only
for the crossfade into window k+1).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from heartmula_rt.config import LATENTS_PER_CODE, WINDOW, CodecConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.codec.dit import DecodeCancelled, FlowMatching
from heartmula_rt.model.codec.scalar import DECODE_CHUNK, ScalarModel
from heartmula_rt.request import CodecParams

log = logging.getLogger(__name__)

HOP = 320  # codes between window starts
OVERLAP = WINDOW - HOP  # 52 codes shared by neighbouring windows
PREFIX = LATENTS_PER_CODE * OVERLAP  # 104 latent frames a window hands to the next


def check_codes(codes: torch.Tensor, codebook_size: int, num_quantizers: int = 8) -> torch.Tensor:
    """Validate codes [num_quantizers, T ≥ 1] of non-negative integer ids; returns them as int64."""
    if not isinstance(codes, torch.Tensor):
        raise UserError(f"codes must be a torch.Tensor, not {type(codes).__name__}")
    if codes.dim() != 2 or codes.shape[0] != num_quantizers or codes.shape[1] == 0:
        raise UserError(
            f"codes must have shape [{num_quantizers}, T] with T ≥ 1, not {list(codes.shape)}"
        )
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise UserError(f"codes must be an integer tensor, not {codes.dtype}")
    codes = codes.long()
    if bool((codes < 0).any()):
        raise UserError(f"codes must be ids in [0, {codebook_size}); got a negative id")
    return codes


def sanitize_codes(
    codes: torch.Tensor, codebook_size: int, num_quantizers: int = 8
) -> tuple[torch.Tensor, int]:
    """Validate codes [num_quantizers, T] and replace stray ids ≥ codebook_size.

    The LM can emit ids in [codebook_size, audio_eos_id) that index past the codebook. Each is
    replaced by the same codebook's id from the nearest earlier valid frame, else the nearest
    later one, else 0. Returns (int64 codes, number of ids replaced); the input is not modified.
    """
    codes = check_codes(codes, codebook_size, num_quantizers)
    valid = codes < codebook_size
    n_stray = int((~valid).sum())
    if n_stray == 0:
        return codes, 0
    T = codes.shape[1]
    t = torch.arange(T, device=codes.device).expand_as(codes)
    prev = torch.where(valid, t, -1).cummax(dim=1).values  # last valid frame at or before t
    nxt = torch.where(valid, t, T).flip(1).cummin(dim=1).values.flip(1)  # first at or after t
    src = torch.where(prev >= 0, prev, nxt)
    fixed = codes.gather(1, src.clamp(max=T - 1))
    return torch.where(src < T, fixed, 0), n_stray


def plan_windows(num_codes: int) -> tuple[int, list[int]]:
    """(padded length in codes, window starts) for T = num_codes.

    Short inputs are padded to one window; then the length is padded to a whole number of hops
    plus the overlap, ceil((L − 52)/320)·320 + 52, so that the windows at 0, 320, 640, … cover
    every code. (The reference skips this padding when (L − 104) mod 320 = 0 and so drops the
    last 52 codes; here that case is padded like any other.)
    """
    length = max(num_codes, WINDOW)
    length = math.ceil((length - OVERLAP) / HOP) * HOP + OVERLAP
    return length, list(range(0, length - HOP + 1, HOP))


def extend_codes(codes: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat codes [Q, T] periodically (tile) and cut to `length` frames."""
    reps = math.ceil(length / codes.shape[1])
    return codes.repeat(1, reps)[:, :length]


def first_window_with(code: int) -> int:
    """The first window whose codes [w·320, w·320 + 372) include code index `code` ≥ 0 (of the
    codes as padded by plan_windows); every window before it lies in codes [0, code)."""
    return 0 if code < WINDOW else (code - WINDOW) // HOP + 1


def num_output_samples(num_codes: int, sample_rate: int) -> int:
    """T codes' worth of audio, T · sample_rate / 12.5, in exact integer arithmetic.

    The reference's float product int(T / 12.5 · sample_rate) loses a sample for some T
    (e.g. 29); at 48 kHz this is exactly T · 3840.
    """
    return num_codes * sample_rate * 2 // 25


class LatentChain:
    """One song's side of the flow-matching half of windowed decoding: window after window, its
    noise draw and the in-context prefix taken from its previous window's latents.
    `sample_windows` runs the next window of several songs' chains at once.

    Noise contract: exactly one CPU `torch.randn((1, 744, C), generator=generator)` per window,
    in the song's window order, then moved to the model's device; nothing else draws from the
    generator, so a song's noise does not depend on the songs decoded beside it. `skip(k)`
    draws and drops k windows' noise, for a chain picked up at window k.

    With `keep_prefixes`, `prefixes` lists the in-context prefix each window hands to the next
    (its final latents' last 104 frames, float32 [104, C], on the model's device), in order.
    """

    def __init__(
        self,
        flow: FlowMatching,
        params: CodecParams,
        generator: torch.Generator,
        *,
        keep_prefixes: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.flow, self.params, self.generator = flow, params, generator
        self.stop = stop  # asked between ODE steps: True gives the window up (DecodeCancelled)
        # The last window's latents [1, 744, C] (or, picked up at a window, the prefix it starts
        # from, [1, 104, C]): the next window's in-context prefix is its last 104 frames.
        self.previous: torch.Tensor | None = None
        self.prefixes: list[torch.Tensor] | None = [] if keep_prefixes else None

    def skip(self, windows: int) -> None:
        """Draw and drop `windows` windows' noise, as decoding them would have."""
        for _ in range(windows):
            torch.randn(noise_shape(self.flow), generator=self.generator, dtype=torch.float32)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """One window's valid codes [Q, 372] → its final latents [1, 744, C] float32 (before
        the decoder's rounding), on the model's device."""
        return sample_windows([self], [codes])


def noise_shape(flow: FlowMatching) -> tuple[int, int, int]:
    """One window's noise draw: (1, 744, C)."""
    return (1, LATENTS_PER_CODE * WINDOW, flow.latent_channels)


def sample_windows(chains: Sequence[LatentChain], codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """The next window of several songs at once: chain i (all of one flow model) gets window
    codes[i] [Q, 372] (valid ids). Returns the final latents [len(chains), 744, C] float32,
    row i chain i's, on the model's device.

    The rows of each `num_steps` share one `FlowMatching.sample` call (one ODE time grid), each
    with its own noise, in-context prefix and guidance scale; a row's latents are those its
    song gets alone (the conditioning, the estimator and the ODE compute each row alike
    whatever the others hold).
    """
    flow = chains[0].flow
    device = flow.cond_feature_emb.weight.device
    mu = flow.condition(torch.stack(list(codes)).to(device))
    prefix, shape = PREFIX, noise_shape(flow)
    noise = torch.cat(
        [torch.randn(shape, generator=c.generator, dtype=torch.float32) for c in chains]
    ).to(device)
    ic = torch.zeros_like(noise)  # window 0 of a song has no in-context prefix
    prefixes = []
    for row, chain in enumerate(chains):
        if chain.previous is not None:
            ic[row, :prefix] = chain.previous[0, -prefix:]
        prefixes.append(0 if chain.previous is None else prefix)
    latents = torch.empty_like(noise)
    # On a GPU the graphed estimator (graphed.py) captures a graph per batch size: a group of
    # another size than the last call's is captured anew, and replayed while the size holds.
    stops = [c.stop for c in chains]  # the rows are given up only if every song's says so
    stop = None if None in stops else lambda: all(s() for s in stops)
    for num_steps in dict.fromkeys(c.params.num_steps for c in chains):
        rows = [i for i, c in enumerate(chains) if c.params.num_steps == num_steps]
        latents[rows] = flow.sample(
            mu[rows],
            noise[rows],
            ic[rows],
            [prefixes[i] for i in rows],
            num_steps=num_steps,
            guidance_scale=[chains[i].params.guidance_scale for i in rows],
            stop=stop,
        )
    for row, chain in enumerate(chains):
        chain.previous = latents[row : row + 1]
        if chain.prefixes is not None:  # a copy: a view would keep the whole window alive
            chain.prefixes.append(latents[row, -prefix:].clone())
    return latents


def window_latents(
    flow: FlowMatching, codes: torch.Tensor, params: CodecParams, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Each window's final latents [1, 744, C] float32 (before the decoder's rounding), in order.

    `codes` [Q, T] must hold valid ids (see sanitize_codes); noise as `LatentChain` draws it.
    """
    length, starts = plan_windows(codes.shape[1])
    codes = extend_codes(codes, length)
    chain = LatentChain(flow, params, generator)
    for start in starts:
        yield chain(codes[:, start : start + WINDOW])


def decode_window(
    scalar: ScalarModel, latents: torch.Tensor, streams: int, chunk: int = DECODE_CHUNK
) -> torch.Tensor:
    """Latents [1, F, streams·c] → float32 [streams, samples]; stream s gets dims [s·c, (s+1)·c).
    The decoder runs `chunk` latent frames at a time (see ScalarModel.decode_chunked)."""
    x = latents[0].transpose(0, 1).reshape(streams, -1, latents.shape[1])
    return scalar.decode_chunked(x, chunk)


class WindowDecoder:
    """Codes in, audio out, window by window: the one implementation of SPEC §5.1–5.7 that
    `detokenize` and `detokenize_many` (all codes at once) and streaming (codes as the LM makes
    them) all drive.

    `push` takes the next codes and decodes every window that lies entirely inside codes whose
    final value is known: such a window is in the final plan whatever the song's length. A stray
    id with no valid id before it in its codebook takes the first valid one after it, so nothing
    is decoded while a codebook holds only strays. `finish` plans the tail windows (codes padded
    by tiling) and decodes them. Both return the audio that became final as float32
    [streams, n] pieces on the model's device (nothing waits for the device, so a stream can
    copy them back while the LM runs): everything up to the next window's crossfade, and at the
    end the rest, trimmed to T codes' worth. The pieces concatenate to exactly what `detokenize`
    returns.

    `push` is `add` then `decode_rounds` of this decoder alone, `finish` is `close`, the same,
    then `rest`; `decode_rounds` over several decoders decodes several songs' windows together.

    `keep_prefixes=True` records each decoded window's in-context prefix for the next window
    (`prefixes()`). `resume=k` picks the song up at window k (for `HeartCodec.redecode`): the
    decoder draws and drops k windows' noise, starts window k from `prefix` (window k−1's
    recorded prefix, float32 [104, C]; None for k = 0) and still takes the song's codes from
    the first, but decodes windows k, k+1, … only, and its audio starts at sample (k+1)·hop, the
    start of window k+1's region: window k is decoded only for its tail, which window k+1
    crossfades with (its own first samples would need window k−1's tail). `on_window(done)`
    counts the song's windows, the skipped ones included. `stop()` (None: never), asked between
    ODE steps, gives the window being decoded up (`DecodeCancelled`): a cancelled song's codec
    work ends within one step; the decoder is then spent.
    """

    def __init__(
        self,
        flow: FlowMatching,
        scalar: ScalarModel,
        config: CodecConfig,
        params: CodecParams,
        *,
        generator: torch.Generator | None = None,
        on_window: Callable[[int], None] | None = None,
        chunk: int = DECODE_CHUNK,
        keep_prefixes: bool = False,
        resume: int | None = None,
        prefix: torch.Tensor | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh, non-deterministic; the global RNG is left alone
        self.scalar, self.config, self.on_window, self.chunk = scalar, config, on_window, chunk
        self.chain = LatentChain(flow, params, generator, keep_prefixes=keep_prefixes, stop=stop)
        self.streams = config.out_channels // config.latent_hidden_dim
        samples_per_code = LATENTS_PER_CODE * scalar.samples_per_frame
        self.window_len, self.hop, self.overlap = (
            n * samples_per_code for n in (WINDOW, HOP, OVERLAP)
        )
        device = flow.cond_feature_emb.weight.device
        self.ramp = torch.linspace(0, 1, self.overlap, device=device)
        self.codes = torch.zeros(config.num_quantizers, 0, dtype=torch.long)  # as received
        self.pending: deque[torch.Tensor] = deque()  # planned windows' codes, not yet decoded
        self.windows = 0  # windows decoded so far (a resumed decoder: of the song)
        self.tail: torch.Tensor | None = None  # the last window's overlap, not yet crossfaded
        self.left: int | None = None  # samples still to emit, once the length is known
        self.mute = False  # the next window is decoded for its tail only (resume)
        if resume is not None:
            self._resume(resume, prefix, device)
        elif prefix is not None:
            raise UserError("an in-context prefix is given only with resume=<window>")

    def _resume(self, window: int, prefix: torch.Tensor | None, device: torch.device) -> None:
        """Pick the song up at `window`, starting it from `prefix` (see the class)."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise UserError(f"resume must be a window index ≥ 0, not {window!r}")
        want = [PREFIX, self.chain.flow.latent_channels]
        if window == 0 and prefix is not None:
            raise UserError("window 0 has no in-context prefix: give prefix=None with resume=0")
        if window > 0 and (
            not isinstance(prefix, torch.Tensor)
            or prefix.dtype != torch.float32
            or list(prefix.shape) != want
        ):
            got = "None" if prefix is None else f"{prefix.dtype} {list(prefix.shape)}"
            raise UserError(
                f"resume={window} needs window {window - 1}'s in-context prefix, "
                f"float32 {want}, not {got}"
            )
        self.chain.skip(window)
        if prefix is not None:
            self.chain.previous = prefix.to(device)[None]
        self.windows, self.mute = window, True

    def prefixes(self) -> torch.Tensor:
        """The in-context prefix each window decoded so far hands to the next (its final
        latents' last 104 frames), float32 [windows, 104, C] on the CPU, in window order; a
        resumed decoder's start at its resume window. Needs `keep_prefixes=True`. On a GPU, call
        it on the stream the decoder ran on."""
        kept = self.chain.prefixes
        if kept is None:
            raise UserError("this decoder keeps no prefixes: make it with keep_prefixes=True")
        if not kept:
            return torch.empty(0, PREFIX, self.chain.flow.latent_channels)
        return torch.stack(kept).cpu()

    def push(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Add codes [Q, n] (stray ids allowed); decode the windows that became certain."""
        self.add(codes)
        return self.decode_rounds([self], 1)[0]

    def finish(self) -> list[torch.Tensor]:
        """No more codes: decode the remaining windows and return the rest of the audio."""
        self.close()
        return self.decode_rounds([self], 1)[0] + self.rest()

    def add(self, codes: torch.Tensor) -> None:
        """Add codes [Q, n] (stray ids allowed); plan the windows that became certain."""
        cfg = self.config
        codes = check_codes(codes, cfg.codebook_size, cfg.num_quantizers)
        self.codes = torch.cat([self.codes, codes.cpu()], dim=1)
        if self._next_end() > self.codes.shape[1]:
            return
        if not bool((self.codes < cfg.codebook_size).any(dim=1).all()):
            return  # a codebook with only stray ids so far: their replacement is unknown
        fixed, _ = sanitize_codes(self.codes, cfg.codebook_size, cfg.num_quantizers)
        ends = range(self._next_end(), fixed.shape[1] + 1, HOP)
        self.pending.extend(fixed[:, end - WINDOW : end] for end in ends)

    def close(self) -> None:
        """No more codes: plan the remaining windows; the song's length is now known."""
        cfg = self.config
        fixed, n_stray = sanitize_codes(self.codes, cfg.codebook_size, cfg.num_quantizers)
        if n_stray:
            log.debug(  # the CLI says it once per song (cli.note_stray_ids)
                "replaced %d codec ids ≥ %d by a neighbouring frame's", n_stray, cfg.codebook_size
            )
        num_codes = fixed.shape[1]
        length, starts = plan_windows(num_codes)
        fixed = extend_codes(fixed, length)
        self.left = num_output_samples(num_codes, cfg.sample_rate) - self.windows * self.hop
        planned = self.windows + len(self.pending)
        self.pending.extend(fixed[:, start : start + WINDOW] for start in starts[planned:])

    def rest(self) -> list[torch.Tensor]:
        """After `close` and its windows: the audio after the last window's crossfade."""
        return self._emit(self.tail)

    @staticmethod
    def decode_rounds(decoders: Sequence[WindowDecoder], songs: int) -> list[list[torch.Tensor]]:
        """Decode the planned windows of several decoders (of one codec): each round takes the
        next window of the first `songs` decoders that have one and samples their latents
        together (`sample_windows`); the scalar decoder then takes them one window at a time.
        Returns each decoder's audio pieces, in order; a song's pieces are those it gets alone.
        """
        # The scalar decoder is not batched: on the CPU a batch of windows decodes slower than
        # its windows in turn (benchmarks/codec_batch.py), and one window's activations are
        # what the memory planner makes room for.
        pieces: list[list[torch.Tensor]] = [[] for _ in decoders]
        while batch := [i for i, d in enumerate(decoders) if d.pending][:songs]:
            try:
                latents = sample_windows(
                    [decoders[i].chain for i in batch],
                    [decoders[i].pending.popleft() for i in batch],
                )
            except DecodeCancelled as e:  # the windows finished before are kept
                e.pieces = pieces
                raise
            for i, window in zip(batch, latents, strict=True):
                d = decoders[i]
                wav = decode_window(d.scalar, window[None], d.streams, d.chunk)
                pieces[i] += d._stitch(wav)
        return pieces

    def _next_end(self) -> int:
        """One past the last code of the next window to plan."""
        return (self.windows + len(self.pending)) * HOP + WINDOW

    def _stitch(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """The next window's audio [streams, samples] in: crossfaded with the last window's
        overlap; the piece that became final out."""
        wav = wav[:, : self.window_len]
        if self.tail is not None:  # linear crossfade over the overlap: old × (1 − r) + new × r
            old, new = self.tail, wav[:, : self.overlap]
            wav[:, : self.overlap] = old * (1 - self.ramp) + new * self.ramp
        self.windows += 1
        self.tail = wav[:, self.hop :]
        if self.on_window is not None:
            self.on_window(self.windows)
        piece = self._emit(wav[:, : self.hop])
        if self.mute:  # a resumed decoder's first window: its tail only (see the class)
            self.mute = False
            return []
        return piece

    def _emit(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """The piece to hand out: cut at the song's end once that is known, never empty."""
        if self.left is not None:
            wav = wav[:, : max(self.left, 0)]
            self.left -= wav.shape[1]
        return [wav] if wav.shape[1] else []
