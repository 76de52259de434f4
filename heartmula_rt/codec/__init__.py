"""HeartCodec's decoding path (SPEC §5): codes [8, T] → stereo 48 kHz waveform.

`HeartCodec` mirrors the official state-dict layout (minus unused tensors, weight norm folded into
plain `.weight`), so it can be built on the meta device and loaded with `assign=True`.

Precision (`CODEC_DTYPES`, applied by `set_precision`): `float32`; `mixed`, the GPU default:
the DiT's blocks in bfloat16 with float32 residual streams, norm statistics, RoPE tables and ODE
state, and the small per-window or per-step ends (codebook lookup, conditioning projection,
`proj_out`) and the scalar decoder in float32; `bfloat16`, everything in bfloat16, measured beside
it but not recommended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import CODEC_PRECISIONS, CodecConfig
from ..errors import UserError
from ..request import DEFAULT_CODEC, CodecParams
from ..side_stream import SideStream
from . import detokenize as _windows
from .detokenize import WindowDecoder, check_codes, plan_windows, sanitize_codes
from .dit import FlowMatching
from .graphed import FAST_PATHS, GraphedEstimator
from .scalar import DECODE_CHUNK, ScalarModel

__all__ = ["CODEC_DTYPES", "DECODE_SONGS", "HeartCodec", "WindowDecoder", "sanitize_codes"]

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

    def window_decoder(
        self,
        params: CodecParams = DEFAULT_CODEC,
        *,
        generator: torch.Generator | None = None,
        on_window: Callable[[int], None] | None = None,
        chunk: int = DECODE_CHUNK,
    ) -> WindowDecoder:
        """An incremental decoder: `push(codes)` as they come, then `finish()` (see
        WindowDecoder). Call its methods under torch.no_grad() or torch.inference_mode()."""
        return WindowDecoder(
            self.flow_matching,
            self.scalar_model,
            self.config,
            params,
            generator=generator,
            on_window=on_window,
            chunk=chunk,
        )

    @torch.inference_mode()
    def detokenize(
        self,
        codes: torch.Tensor,
        params: CodecParams = DEFAULT_CODEC,
        *,
        generator: torch.Generator | None = None,
        on_window: Callable[[int, int], None] | None = None,
        chunk: int = DECODE_CHUNK,
    ) -> torch.Tensor:
        """codes [8, T] → float32 waveform [2, int(T/12.5·48000)] on the CPU.

        `generator` (CPU) supplies each window's initial noise; None uses a fresh random one.
        Stray ids are replaced (see sanitize_codes). A `WindowDecoder` given every code at once
        decodes the windows one at a time; `on_window(done, total)` is called after each. The
        scalar decoder runs `chunk` latent frames at a time. `detokenize_many` of one song.
        """
        return self.detokenize_many(
            [codes],
            params,
            generators=[generator],
            songs=1,
            on_window=None if on_window is None else lambda _, done, total: on_window(done, total),
            chunk=chunk,
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
    ) -> list[torch.Tensor]:
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
        of a song.
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
            decoder = self.window_decoder(p, generator=g, on_window=report, chunk=chunk)
            decoder.add(c)
            decoder.close()
            decoders.append(decoder)
        pieces = WindowDecoder.decode_rounds(decoders, songs)
        return [torch.cat(p + d.rest(), dim=1).cpu() for p, d in zip(pieces, decoders, strict=True)]

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
