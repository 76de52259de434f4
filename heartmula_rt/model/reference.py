"""A reference clip → the 512-d MuQ-MuLan embedding that fills the prompt's SLOT (SPEC §2).

The audio is read with soundfile (the library runtime/audio.py writes with; this module sits
below the runtime, so it reads for itself), only the chosen part of it (default the first 30 s),
mixed to mono and resampled to MuQ-MuLan's 24 kHz with soxr. MuQ-MuLan (`OpenMuQ/MuQ-MuLan-large`
through the `muq` package, the optional extra `.[ref]`) embeds it in 10 s clips, each
L2-normalised, and averages them; the average is normalised again, since the LM's slot was
trained on single MuLan embeddings, which all have norm 1 (a mean of several is shorter), so
`strength` stays the one knob on its scale.

Every bad input is one sentence (UserError) before any model work: not audio, silent, shorter
than 1 s, longer than LONGEST_FILE_SECONDS (refused from the header, before decoding), a range
outside the file; an embedding file of the wrong size, or holding NaN or infinities.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor, nn

from heartmula_rt.errors import UserError
from heartmula_rt.request import REFERENCE_DIM, Reference

REPO = "OpenMuQ/MuQ-MuLan-large"
# What `MuQMuLan.from_pretrained(REPO)` downloads: its own checkpoint, and the two towers its
# constructor loads before that checkpoint overwrites them.
DOWNLOADS = (REPO, "OpenMuQ/MuQ-large-msd-iter", "xlm-roberta-base")
SAMPLE_RATE = 24000  # MuQ-MuLan's
CLIP_SECONDS = 10.0  # MuQ-MuLan embeds 10 s clips and averages them
DEFAULT_SECONDS = (0.0, 30.0)
SHORTEST_SECONDS = 1.0
LONGEST_FILE_SECONDS = 3600.0  # a longer file is refused before decoding: cut the part first
SILENT_PEAK = 1e-4  # -80 dBFS: nothing MuLan could hear
INSTALL = "pip install 'heartmula-rt[ref]'"
LICENCE = (
    f"note: reference audio is embedded with MuQ-MuLan ({REPO}), whose weights are licensed "
    "CC BY-NC 4.0 (non-commercial use only); downloading them now (about 5 GB with the two "
    "towers its constructor loads, once)"
)


def missing_extra(what: str) -> UserError:
    return UserError(f"reference audio needs {what}, which is not installed: {INSTALL}")


def parse_seconds(text: str) -> tuple[float, float]:
    """`--ref-seconds A-B` → (A, B) in seconds, 0 ≤ A < B."""
    start, sep, end = str(text).partition("-")
    try:
        if not sep:
            raise ValueError
        a, b = float(start), float(end)
    except ValueError:
        raise UserError(f"a reference range is A-B in seconds (like 30-60), not {text!r}") from None
    return check_seconds((a, b))


def check_seconds(seconds: tuple[float, float]) -> tuple[float, float]:
    a, b = (float(s) for s in seconds)
    if not (math.isfinite(a) and math.isfinite(b) and 0 <= a < b):
        raise UserError(f"a reference range must be A-B seconds with 0 <= A < B, not {a:g}-{b:g}")
    if b - a < SHORTEST_SECONDS:
        raise UserError(
            f"a reference range must be at least {SHORTEST_SECONDS:g} s long, not {b - a:g} s"
        )
    return a, b


def resample(wav: np.ndarray, rate: int, to: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples [n] from `rate` to `to` Hz with soxr (its high quality)."""
    if rate == to:
        return wav.astype(np.float32, copy=False)
    try:
        import soxr
    except ImportError:
        raise missing_extra("soxr (the resampler)") from None
    return soxr.resample(wav, rate, to, quality="HQ").astype(np.float32, copy=False)


def read_reference_audio(path: Path, seconds: tuple[float, float] = DEFAULT_SECONDS) -> Tensor:
    """The part `seconds` (start, end; the end is cut to the file's length) of the audio file
    `path` as float32 [n] mono at 24 kHz. Only that part is decoded."""
    path = Path(path)
    start_s, end_s = check_seconds(seconds)
    if not path.is_file():
        raise UserError(f"reference audio {path} does not exist")
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, OSError, RuntimeError):
        raise UserError(
            f"{path} is not an audio file soundfile can read (WAV, FLAC, Ogg, MP3)"
        ) from None
    rate = int(info.samplerate)
    if rate <= 0 or info.channels <= 0:
        raise UserError(f"{path} is not an audio file (no sample rate or channels)")
    # libsndfile reports the length from the header without decoding; a header that does not
    # know it reports 0 or a huge count, and only the range asked for is read either way.
    duration = info.frames / rate if info.frames > 0 else math.inf
    if math.isfinite(duration) and duration > LONGEST_FILE_SECONDS:
        raise UserError(
            f"{path} is {duration / 60:.0f} minutes long; a reference file may be at most "
            f"{LONGEST_FILE_SECONDS / 60:.0f} minutes: cut the part you want first"
        )
    if start_s >= duration:
        raise UserError(
            f"the reference range {start_s:g}-{end_s:g} s starts past the end of {path.name} "
            f"({duration:g} s)"
        )
    first, last = int(round(start_s * rate)), int(round(min(end_s, duration) * rate))
    try:
        data, _ = sf.read(str(path), start=first, stop=last, dtype="float32", always_2d=True)
    except (sf.SoundFileError, OSError, RuntimeError) as e:
        raise UserError(f"{path} cannot be decoded ({e})") from None
    if data.shape[0] / rate < SHORTEST_SECONDS:
        raise UserError(
            f"the reference audio is {data.shape[0] / rate:.2f} s long "
            f"({path.name}, {start_s:g}-{end_s:g} s); it must be at least {SHORTEST_SECONDS:g} s"
        )
    if not np.isfinite(data).all():
        raise UserError(f"{path} holds samples that are not finite numbers (NaN or infinity)")
    mono = data.mean(axis=1)
    if float(np.abs(mono).max()) < SILENT_PEAK:
        raise UserError(f"the reference audio is silent ({path.name}, {start_s:g}-{end_s:g} s)")
    return torch.from_numpy(np.ascontiguousarray(resample(mono, rate)))


@dataclass
class Embedder:
    """MuQ-MuLan's audio side on `device` (float32: the model card warns that half precision
    can give NaN). `mulan` is a `muq.MuQMuLan`, whose call `mulan(wavs=[1, n])` cuts 10 s clips,
    embeds each and averages them."""

    mulan: nn.Module
    device: torch.device

    def embed(self, wav: Tensor) -> Tensor:
        """float32 [512] on the CPU, norm 1, of mono 24 kHz samples [n]."""
        with torch.inference_mode():
            latents = self.mulan(wavs=wav.to(self.device, torch.float32)[None])
        embedding = latents[0].detach().to("cpu", torch.float32)
        if embedding.shape != (REFERENCE_DIM,):
            raise UserError(
                f"the embedder made {list(embedding.shape)} numbers, not the {REFERENCE_DIM} "
                "the LM's reference slot takes"
            )
        norm = embedding.norm()
        if not torch.isfinite(embedding).all() or norm == 0:
            raise UserError("the embedder made no usable embedding (NaN or zero) of this audio")
        return embedding / norm

    def embed_file(self, path: Path, seconds: tuple[float, float] = DEFAULT_SECONDS) -> Tensor:
        return self.embed(read_reference_audio(path, seconds))


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def load_embedder(device: str | torch.device = "cpu", *, cache_dir: str | None = None) -> Embedder:
    """MuQ-MuLan from the Hugging Face cache, downloaded there on first use (its licence said
    once then, on stderr). Its text tower is dropped once loaded: only audio is embedded."""
    try:
        import transformers
        from muq import MuQMuLan
    except ImportError:
        raise missing_extra("the muq package (MuQ-MuLan)") from None
    # muq 0.1.0 calls the conformer encoder of transformers 4 directly; transformers 5 returns
    # no hidden states from it (and wants an attention setting muq's config lacks).
    if int(transformers.__version__.split(".")[0]) >= 5:
        raise UserError(
            f"muq (MuQ-MuLan) works with transformers 4, not {transformers.__version__}: "
            "pip install 'transformers>=4.40,<5'"
        )
    if cache_dir is None and not _cached(REPO):
        print(LICENCE, file=sys.stderr)
    try:
        mulan = MuQMuLan.from_pretrained(REPO, cache_dir=cache_dir)
    except Exception as e:  # network, cache and hub errors alike: one sentence, with the way out
        why = (str(e).splitlines() or [""])[0]
        raise UserError(
            f"could not load MuQ-MuLan ({type(e).__name__}: {why}); without a network, download "
            f"{', '.join(DOWNLOADS)} elsewhere with `huggingface-cli download`, copy the Hugging "
            "Face cache (HF_HOME) here and set HF_HUB_OFFLINE=1, or embed elsewhere with "
            "`heartmula-rt embed FILE -o ref.safetensors` and pass --ref-embedding"
        ) from None
    return embedder_of(mulan, device)


def embedder_of(mulan: nn.Module, device: str | torch.device = "cpu") -> Embedder:
    """An `Embedder` of a built `muq.MuQMuLan` (loaded, or random for tests): its text tower
    freed, the rest float32 on `device`, in eval mode."""
    inner = getattr(mulan, "mulan", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "text"):
        inner.text = None  # XLM-R and its transformer: about 1.3 GB that audio never uses
    device = torch.device(device)
    mulan.to(device=device, dtype=torch.float32).eval()
    return Embedder(mulan, device)


# -- embedding files ------------------------------------------------------------------------

EMBEDDING_KEY = "embedding"
EMBEDDING_SUFFIXES = (".safetensors", ".npy")


def _check_embedding(values: np.ndarray, path: Path) -> np.ndarray:
    if values.dtype.kind not in "fiu":
        raise UserError(f"{path} holds {values.dtype} values, not numbers")
    flat = values.reshape(-1) if values.ndim == 2 and values.shape[0] == 1 else values
    if flat.shape != (REFERENCE_DIM,):
        raise UserError(
            f"{path} holds an array of shape {list(values.shape)}; a reference embedding is "
            f"{REFERENCE_DIM} numbers"
        )
    flat = flat.astype(np.float32)
    if not np.isfinite(flat).all():
        raise UserError(f"{path} holds NaN or infinite numbers; it is no embedding")
    return flat


def read_embedding(path: Path) -> np.ndarray:
    """A reference embedding file (`.safetensors` with one tensor or an `embedding` key, as
    `write_embedding` makes; or `.npy`) → float32 [512]. Never unpickles."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise UserError(
            f"a reference embedding file ends in {' or '.join(EMBEDDING_SUFFIXES)}, not {path.name}"
        )
    if not path.is_file():
        raise UserError(f"reference embedding {path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if EMBEDDING_KEY in tensors:
                values = tensors[EMBEDDING_KEY]
            elif len(tensors) == 1:
                values = next(iter(tensors.values()))
            else:
                raise UserError(
                    f"{path} holds {len(tensors)} tensors and none named {EMBEDDING_KEY!r}"
                )
    except UserError:
        raise
    except Exception as e:  # a corrupt or foreign file: numpy and safetensors raise many kinds
        raise UserError(f"{path} is not a readable embedding file ({e})") from None
    return _check_embedding(np.asarray(values), path)


def write_embedding(path: Path, embedding: Tensor | np.ndarray, **metadata: Any) -> Path:
    """Write float32 [512] as `.safetensors` (key `embedding`, `metadata` as text) or `.npy`,
    through a temporary file renamed into place: never half written."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise UserError(
            f"an embedding is written as {' or '.join(EMBEDDING_SUFFIXES)}, not {path.name}"
        )
    if not path.parent.is_dir():
        raise UserError(f"output folder {path.parent} does not exist")
    values = _check_embedding(np.asarray(embedding, dtype=np.float32), path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        if path.suffix.lower() == ".npy":
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
                np.save(f, values)
        else:
            from safetensors.numpy import save_file

            info = {"model": REPO, **{k: str(v) for k, v in metadata.items()}}
            save_file({EMBEDDING_KEY: values}, tmp, metadata=info)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path} ({e})") from None
        raise
    return path


def reference_of_file(path: Path, strength: float = 1.0) -> Reference:
    """`--ref-embedding FILE [--ref-strength S]` → the request's Reference."""
    return Reference(tuple(read_embedding(path).tolist()), strength)


def reference_of_audio(
    embedder: Embedder,
    path: Path,
    seconds: tuple[float, float] = DEFAULT_SECONDS,
    strength: float = 1.0,
) -> Reference:
    """`--ref-audio FILE [--ref-seconds A-B] [--ref-strength S]` → the request's Reference."""
    return Reference(tuple(embedder.embed_file(path, seconds).tolist()), strength)
