"""HeartCodec's decoding path (SPEC §5): codes [8, T] → stereo 48 kHz waveform.

Song editing: `detokenize(..., return_prefixes=True)` also returns each window's in-context
prefix for the next one; given them and the original waveform, `HeartCodec.redecode` decodes an
edited song's changed windows only, with the original's samples before them.

`HeartCodec` mirrors the official state-dict layout (minus unused tensors, weight norm folded into
plain `.weight`), so it can be built on the meta device and loaded with `assign=True`.

Precision (`CODEC_DTYPES`, applied by `set_precision`): `float32`; `mixed`, the GPU default:
the DiT's blocks in bfloat16 with float32 residual streams, norm statistics, RoPE tables and ODE
state, and the small per-window or per-step ends (codebook lookup, conditioning projection,
`proj_out`) and the scalar decoder in float32; `bfloat16`, everything in bfloat16, measured beside
it but not recommended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from heartmula_rt.config import CODEC_PRECISIONS, CodecConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.codec import detokenize as _windows
from heartmula_rt.model.codec.detokenize import (
    PREFIX,
    WindowDecoder,
    check_codes,
    first_window_with,
    num_output_samples,
    plan_windows,
    sanitize_codes,
)
from heartmula_rt.model.codec.dit import DecodeCancelled, FlowMatching
from heartmula_rt.model.codec.graphed import FAST_PATHS, GraphedEstimator
from heartmula_rt.model.codec.scalar import DECODE_CHUNK, ScalarModel
from heartmula_rt.model.side_stream import SideStream
from heartmula_rt.request import DEFAULT_CODEC, CodecParams

__all__ = [
    "CODEC_DTYPES",
    "DECODE_SONGS",
    "DecodeCancelled",
    "HeartCodec",
    "WindowDecoder",
    "sanitize_codes",
]

log = logging.getLogger(__name__)

# name → (weight dtype of the DiT's blocks, of everything else)
CODEC_DTYPES = {
    name: (getattr(torch, blocks), getattr(torch, rest))
    for name, (blocks, rest) in CODEC_PRECISIONS.items()
}


def check_codec_dtype(name: str) -> str:
    if name not in CODEC_DTYPES:
        raise UserError(f"unknown codec dtype {name!r}; use one of {', '.join(CODEC_DTYPES)}")
    return name


# Songs whose windows `detokenize_many` decodes together by default. The CPU: 4 one-window
# songs decoded 11–20% faster 4 at a time than one at a time (benchmarks/codec_batch.py). A
# GPU: the same by design (a batch gives every launch more rows), not measured yet.
DECODE_SONGS = 4

# Cheap (once per window or per ODE step) but their rounding goes straight into the conditioning,
# the ODE state or the audio: float32 in `mixed`. The scalar decoder's input is rounded to
# multiples of 1/9, so it amplifies small errors.
FLOAT32_PARTS = (
    "flow_matching.vq_embed",
    "flow_matching.cond_feature_emb",
    "flow_matching.estimator.proj_out",
    "scalar_model",
)


def codec_noise(seed: int | None) -> torch.Generator | None:
    """The codec's noise for a song's seed: a CPU generator, so a seed means the same noise on
    any device (None: fresh random noise)."""
    return None if seed is None else torch.Generator().manual_seed(seed)


class HeartCodec(nn.Module):
    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.flow_matching = FlowMatching(config)
        self.scalar_model = ScalarModel(config)
        # Where it decodes beside the LM (stream.py), reused by every song.
        self.side_stream = SideStream()

    def set_precision(self, name: str) -> HeartCodec:
        """Cast the weights in place for the codec dtype `name` (one of CODEC_DTYPES): the DiT
        blocks to the mode's first dtype, `FLOAT32_PARTS` to its second.

        Load the DiT at the blocks' dtype, so its tensors are converted once on the host;
        `checkpoint.load_codec` loads `FLOAT32_PARTS` in float32, so in `mixed` they keep the
        checkpoint's values exactly.
        """
        blocks, rest = CODEC_DTYPES[check_codec_dtype(name)]
        self.flow_matching.estimator.to(blocks)
        for part in self.float32_parts():
            part.to(rest)
        return self

    def float32_parts(self) -> list[nn.Module]:
        """The modules of `FLOAT32_PARTS`."""
        return [self.get_submodule(name) for name in FLOAT32_PARTS]

    def use_fast_path(self, name: str | None, *, compile_backend: str = "inductor") -> None:
        """Replay the estimator as a CUDA graph (`graph`), compiled first (`compile`), or not
        (None). On the CPU only `compile` works, without graphs (for tests)."""
        if name is None:
            self.flow_matching.fast_estimator = None
            return
        if name not in FAST_PATHS:
            raise UserError(f"unknown codec fast path {name!r}; use one of {', '.join(FAST_PATHS)}")
        graphs = self.flow_matching.cond_feature_emb.weight.device.type == "cuda"
        if name == "graph" and not graphs:
            raise UserError("the codec's graph fast path needs a CUDA GPU")
        self.flow_matching.fast_estimator = GraphedEstimator(
            self.flow_matching.estimator,
            compile=name == "compile",
            compile_backend=compile_backend,
            graphs=graphs,
        )

    def window_decoder(self, params: CodecParams = DEFAULT_CODEC, **options: Any) -> WindowDecoder:
        """An incremental decoder: `push(codes)` as they come, then `finish()` (see
        WindowDecoder, whose keyword `options` these are: `generator`, `on_window`, `chunk`,
        `keep_prefixes`, `resume`, `prefix` and `stop`). Call its methods under torch.no_grad()
        or torch.inference_mode()."""
        return WindowDecoder(self.flow_matching, self.scalar_model, self.config, params, **options)

    @torch.inference_mode()
    def detokenize(
        self,
        codes: torch.Tensor,
        params: CodecParams = DEFAULT_CODEC,
        *,
        generator: torch.Generator | None = None,
        on_window: Callable[[int, int], None] | None = None,
        chunk: int = DECODE_CHUNK,
        return_prefixes: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """codes [8, T] → float32 waveform [2, int(T/12.5·48000)] on the CPU.

        `generator` (CPU) supplies each window's initial noise; None uses a fresh random one.
        Stray ids are replaced (see sanitize_codes). A `WindowDecoder` given every code at once
        decodes the windows one at a time; `on_window(done, total)` is called after each. The
        scalar decoder runs `chunk` latent frames at a time. `detokenize_many` of one song.

        `return_prefixes=True` returns (waveform, prefixes): prefixes float32 [W, 104, 256] on
        the CPU, for each of the W windows the in-context prefix it hands to the next (its final
        latents' last 104 frames, exactly; the last window's too), what `redecode` needs.
        """
        return self.detokenize_many(
            [codes],
            params,
            generators=[generator],
            songs=1,
            on_window=None if on_window is None else lambda _, done, total: on_window(done, total),
            chunk=chunk,
            return_prefixes=return_prefixes,
        )[0]

    @torch.inference_mode()
    def detokenize_many(
        self,
        codes: Sequence[torch.Tensor],
        params: CodecParams | Sequence[CodecParams] = DEFAULT_CODEC,
        *,
        generators: Sequence[torch.Generator | None] | None = None,
        songs: int | None = None,
        on_window: Callable[[int, int, int], None] | None = None,
        chunk: int = DECODE_CHUNK,
        return_prefixes: bool = False,
    ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        """Several songs' codes [8, T_i] → their float32 waveforms [2, int(T_i/12.5·48000)] on
        the CPU, in order, each what `detokenize` gives that song alone: bit for bit on this
        project's CPU (tests/test_codec_batch.py, `float32` and `mixed`); a GPU's kernels may
        round another batch size differently in the last bits (not measured yet).

        `params` is one `CodecParams` for every song or one per song; `generators` one CPU
        generator per song (None, or a None entry: fresh random noise), from which the song
        draws its windows' noise in its own window order, whatever the other songs. Each round
        decodes the next window of the first `songs` songs that have one left (a song's window
        needs its previous one's latents) in one batch of the DiT's rows (songs of one
        `num_steps` share a sample call); the scalar decoder takes them one at a time. `songs`
        defaults to `DECODE_SONGS`. Every input is checked before
        anything is decoded. `on_window(song, done, total)` is called after each window
        of a song. `return_prefixes=True`: each song's (waveform, prefixes), as `detokenize`.
        """
        cfg = self.config
        if isinstance(codes, torch.Tensor):
            raise UserError("codes must be a list of [8, T] tensors, one per song")
        codes = [check_codes(c, cfg.codebook_size, cfg.num_quantizers) for c in codes]
        if isinstance(params, CodecParams):
            params = [params] * len(codes)
        generators = [None] * len(codes) if generators is None else list(generators)
        for name, values in (("CodecParams", params), ("generators", generators)):
            if len(values) != len(codes):
                raise UserError(f"{len(values)} {name} for {len(codes)} songs: give one per song")
        if songs is None:
            songs = DECODE_SONGS
        if isinstance(songs, bool) or not isinstance(songs, int) or songs < 1:
            raise UserError(f"songs must be a whole number of at least 1, not {songs!r}")
        decoders = []
        for song, (c, p, g) in enumerate(zip(codes, params, generators, strict=True)):
            total = len(plan_windows(c.shape[1])[1])
            report = (
                None
                if on_window is None
                else lambda done, song=song, total=total: on_window(song, done, total)
            )
            decoder = self.window_decoder(
                p, generator=g, on_window=report, chunk=chunk, keep_prefixes=return_prefixes
            )
            decoder.add(c)
            decoder.close()
            decoders.append(decoder)
        pieces = WindowDecoder.decode_rounds(decoders, songs)
        wavs = [torch.cat(p + d.rest(), dim=1).cpu() for p, d in zip(pieces, decoders, strict=True)]
        if return_prefixes:
            return [(w, d.prefixes()) for w, d in zip(wavs, decoders, strict=True)]
        return wavs

    @torch.inference_mode()
    def redecode(
        self,
        codes: torch.Tensor,
        params: CodecParams,
        *,
        generator: torch.Generator,
        changed_from: int,
        prefixes: torch.Tensor,
        original: torch.Tensor,
        on_window: Callable[[int, int], None] | None = None,
        chunk: int = DECODE_CHUNK,
        return_prefixes: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """An edited song's waveform, decoding only the windows its edit changed: what
        `detokenize(codes, params, generator=...)` returns, sample for sample, where the
        decoding is deterministic (this project's CPU at one thread count: tests/
        test_codec_redecode.py).

        `codes` [8, T'] is the new song, whose first `changed_from` codes (0 ≤ changed_from ≤
        T') equal the original song's (T' may differ from the original's length T; the codes
        from `changed_from` on are new, and changed_from = T' is a song cut there). `params`
        are the original's codec params and `generator` a fresh CPU generator seeded as the
        original's noise was. `prefixes` float32 [W, 104, 256] and `original` float32 [2, N]
        are what `detokenize(..., return_prefixes=True)` returned for the original song.

        Let c be the first window whose codes include code `changed_from` (windows before it
        hold the same codes in both songs; a changed length changes only windows that reach
        past `changed_from`, whose padding tiles the codes anew). Window c − 1 is decoded again,
        from window c − 2's stored prefix (none for window 0) with the generator advanced past
        c − 1 windows' noise (drawn and dropped): it comes out identical to the original's (a
        difference is logged as a warning) and is decoded only for its tail, which window c
        crossfades with. Then windows c, c+1, … of the new song are decoded, windows(T') −
        (c − 1) in all; `on_window(done, total)` counts them. The result is the original's
        samples [0, c·hop), hop = 320 codes' worth, copied, then the new ones, trimmed to T'
        codes' worth: the audio before window c's region is the original's, sample for sample.
        If c = 0 (a change within the first window, or a codebook whose first `changed_from`
        ids are all stray, so that their replacement comes from later codes) this is
        `detokenize`. `return_prefixes=True` returns (waveform, the new song's prefixes [W',
        104, 256]: the original's for windows before c − 1, the decoded ones after).
        """
        cfg = self.config
        codes = check_codes(codes, cfg.codebook_size, cfg.num_quantizers)
        num_codes = codes.shape[1]
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise UserError("generator must be a CPU torch.Generator seeded as the original's")
        if (
            isinstance(changed_from, bool)
            or not isinstance(changed_from, int)
            or not 0 <= changed_from <= num_codes
        ):
            raise UserError(
                f"changed_from must be a code index in [0, {num_codes}] (the new song has "
                f"{num_codes} codes), not {changed_from!r}"
            )
        width = self.flow_matching.latent_channels
        if (
            not isinstance(prefixes, torch.Tensor)
            or prefixes.dtype != torch.float32
            or prefixes.dim() != 3
            or prefixes.shape[0] == 0
            or list(prefixes.shape[1:]) != [PREFIX, width]
        ):
            raise UserError(
                f"prefixes must be float32 [W, {PREFIX}, {width}], one per window of the original "
                f"song as detokenize(..., return_prefixes=True) returns them, not "
                f"{_described(prefixes)}"
            )
        streams = cfg.out_channels // cfg.latent_hidden_dim
        per_code = num_output_samples(1, cfg.sample_rate)
        if (
            not isinstance(original, torch.Tensor)
            or original.dtype != torch.float32
            or original.dim() != 2
            or original.shape[0] != streams
        ):
            raise UserError(
                f"original must be the original song's float32 waveform [{streams}, N] as "
                f"detokenize returned it, not {_described(original)}"
            )
        old_codes, extra = divmod(original.shape[1], per_code)
        old_windows = len(plan_windows(old_codes)[1]) if old_codes else 0
        if extra or old_windows != prefixes.shape[0]:
            raise UserError(
                f"original's {original.shape[1]} samples are not the song of the "
                f"{prefixes.shape[0]} windows' prefixes given (a song of T codes has T·{per_code} "
                "samples): give the waveform and prefixes detokenize returned for one song"
            )
        if changed_from > old_codes:
            raise UserError(
                f"changed_from {changed_from} is past the original song's end ({old_codes} codes):"
                " only codes the original has can be kept"
            )
        first = changed_from
        if first and not bool((codes[:, :first] < cfg.codebook_size).any(dim=1).all()):
            first = 0  # stray ids replaced from later, changed codes (see sanitize_codes)
        changed = first_window_with(first)
        if changed == 0:
            return self.detokenize(
                codes,
                params,
                generator=generator,
                on_window=on_window,
                chunk=chunk,
                return_prefixes=return_prefixes,
            )
        start = changed - 1  # decoded again, for the crossfade into window `changed`
        total = len(plan_windows(num_codes)[1]) - start
        decoder = self.window_decoder(
            params,
            generator=generator,
            on_window=None if on_window is None else lambda done: on_window(done - start, total),
            chunk=chunk,
            keep_prefixes=True,
            resume=start,
            prefix=prefixes[start - 1] if start else None,
        )
        decoder.add(codes)
        decoder.close()
        pieces = WindowDecoder.decode_rounds([decoder], 1)[0] + decoder.rest()
        kept = original[:, : changed * decoder.hop].cpu()
        wav = torch.cat([kept, *(p.cpu() for p in pieces)], dim=1)
        new = decoder.prefixes()
        old = prefixes[start].cpu()
        if not torch.equal(new[0], old):
            log.warning(
                "window %d decoded again differs from the original's by up to %.3g in its "
                "latents: were the codec params, the seed or the thread count different?",
                start,
                float((new[0] - old).abs().max()),
            )
        if return_prefixes:
            return wav, torch.cat([prefixes[:start].cpu(), new])
        return wav

    @torch.inference_mode()
    def window_latents(
        self,
        codes: torch.Tensor,
        params: CodecParams = DEFAULT_CODEC,
        *,
        generator: torch.Generator,
    ) -> Iterator[torch.Tensor]:
        """Each window's final latents [1, 744, 256] float32, before the decoder's rounding."""
        codes, _ = sanitize_codes(codes, self.config.codebook_size, self.config.num_quantizers)
        yield from _windows.window_latents(self.flow_matching, codes, params, generator)

    @torch.inference_mode()
    def decode_window(self, latents: torch.Tensor, chunk: int = DECODE_CHUNK) -> torch.Tensor:
        """One window's latents [1, F, 256] → float32 [2, F·1920] on the latents' device."""
        streams = self.config.out_channels // self.config.latent_hidden_dim
        return _windows.decode_window(self.scalar_model, latents, streams, chunk)


def _described(value: object) -> str:
    """A tensor's dtype and shape, or what else the value is, for a refusal."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__
