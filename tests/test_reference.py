"""Reference audio (SPEC §2): the prompt's SLOT from a MuQ-MuLan embedding, the embedding from
audio, and every bad input as one sentence.

The embedder runs the real `muq` package on random weights, built offline from a small config:
its constructor downloads its audio tower (MuQ) and text tower (XLM-R), so those two loaders
are replaced by the package's own MuQ class and transformers' XLM-R class on small configs.
Where torchaudio cannot be imported (this machine's torch has no matching torchaudio build),
a stand-in of the two transforms MuQ's forward uses (a mel spectrogram in dB) takes its place
for these tests only; the rest is the package's code. muq 0.1.0 needs transformers 4: with
transformers 5 those tests skip.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import struct
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import Tokenizer
from torch import nn

from heartmula_rt.config import GenConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model import reference as ref
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import REFERENCE_DIM, Reference, SongRequest


def _embedding(seed: int = 0) -> np.ndarray:
    e = np.random.default_rng(seed).standard_normal(REFERENCE_DIM).astype(np.float32)
    return e / np.linalg.norm(e)


# -- the slot -----------------------------------------------------------------------------


def _rows(lm: HeartMuLa, tokenizer: Tokenizer, gen: GenConfig, reference, rows: int = 2):
    prompt = build_prompt(tokenizer, gen, "rock", "la la", reference)
    with torch.inference_mode():
        return prompt, lm.embed_prompt(prompt.ids, prompt.slot_index, rows, prompt.reference)


@pytest.mark.parametrize("strength", [1.0, 0.35])
def test_the_slot_is_muq_linear_of_the_scaled_embedding(tiny_lm, tokenizer, gen, strength):
    e = _embedding()
    prompt, rows = _rows(tiny_lm, tokenizer, gen, Reference(e, strength))
    # Worked out apart, in float64: W · (s·e) + b.
    w = tiny_lm.muq_linear.weight.detach().double()
    b = tiny_lm.muq_linear.bias.detach().double()
    expected = w @ (torch.from_numpy(e).double() * strength) + b
    torch.testing.assert_close(rows[0, prompt.slot_index].double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(rows[0, prompt.slot_index], tiny_lm.muq_linear.bias)


def test_only_the_conditional_slot_row_changes(tiny_lm, tokenizer, gen):
    _, plain = _rows(tiny_lm, tokenizer, gen, None)
    prompt, given = _rows(tiny_lm, tokenizer, gen, Reference(_embedding(), 0.8))
    changed = (plain != given).any(dim=-1)  # [rows, P]
    assert changed[0].nonzero().flatten().tolist() == [prompt.slot_index]
    assert torch.equal(given[1], plain[1])  # the unconditional row, SLOT included


def test_strength_zero_is_no_reference_bit_for_bit(tiny_lm, tokenizer, gen):
    plain_prompt, plain = _rows(tiny_lm, tokenizer, gen, None)
    zero_prompt, zero = _rows(tiny_lm, tokenizer, gen, Reference(_embedding(), 0.0))
    assert zero_prompt.reference is None and plain_prompt.reference is None
    assert torch.equal(zero, plain)
    assert torch.equal(plain[0, plain_prompt.slot_index], tiny_lm.muq_linear.bias)  # as before


def test_each_song_of_a_batch_keeps_its_own_reference(tiny_lm, tokenizer, gen):
    a, b = Reference(_embedding(1)), Reference(_embedding(2), 0.5)
    pa, ra = _rows(tiny_lm, tokenizer, gen, a, rows=1)
    pb, rb = _rows(tiny_lm, tokenizer, gen, b, rows=1)
    assert not torch.equal(ra[0, pa.slot_index], rb[0, pb.slot_index])
    torch.testing.assert_close(pb.reference, torch.from_numpy(_embedding(2)) * 0.5)


def test_a_reference_of_the_wrong_size_for_the_lm_is_one_sentence(tiny_lm, tokenizer, gen):
    prompt = build_prompt(tokenizer, gen, "rock", "la")
    with pytest.raises(UserError, match="reference slot takes 512"):
        tiny_lm.embed_prompt(prompt.ids, prompt.slot_index, 1, torch.ones(7))


# -- the request --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "embedding, strength, message",
    [
        (np.zeros(511), 1.0, "512 numbers"),
        (np.zeros((2, 512)), 1.0, "512 numbers"),
        ("abc", 1.0, "512 numbers"),
        (3.0, 1.0, "512 numbers"),
        ([float("nan")] + [0.0] * 511, 1.0, "number 1 is nan"),
        ([0.0] * 511 + [math.inf], 1.0, "number 512 is inf"),
        (["x"] * 512, 1.0, "only numbers"),
        ([True] * 512, 1.0, "only numbers"),
        (np.zeros(512), 1.5, "from 0 to 1"),
        (np.zeros(512), -0.1, "from 0 to 1"),
        (np.zeros(512), float("nan"), "from 0 to 1"),
        (np.zeros(512), "1", "must be a number"),
    ],
)
def test_bad_references_are_one_sentence(embedding, strength, message):
    with pytest.raises(UserError, match=message):
        Reference(embedding, strength)


def test_a_reference_rides_the_request_and_its_record():
    r = Reference(torch.from_numpy(_embedding()), 0.25)
    assert isinstance(r.embedding, tuple) and len(r.embedding) == REFERENCE_DIM
    request = SongRequest.of("rock", "la", reference=r, max_seconds=10, seed=3)
    assert request.reference == r and request.with_settings(topk=5).reference == r
    assert Reference.of_record(r.record()) == r
    with pytest.raises(UserError, match="a Reference"):
        SongRequest("rock", "la", reference={"embedding": [0.0] * 512})
    with pytest.raises(UserError, match="needs its embedding"):
        Reference.of_record({"strength": 1.0})


# -- embedding files ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_embedding_files_round_trip(tmp_path, suffix):
    e = _embedding(3)
    path = ref.write_embedding(tmp_path / f"ref{suffix}", e, source="song.wav", seconds="0-30")
    assert np.array_equal(ref.read_embedding(path), e)
    assert ref.reference_of_file(path, 0.5) == Reference(e, 0.5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_bad_embedding_files_are_one_sentence(tmp_path):
    from safetensors.numpy import save_file

    np.save(tmp_path / "short.npy", np.zeros(100, np.float32))
    np.save(tmp_path / "nan.npy", np.full(512, np.nan, np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    two = {"a": np.zeros(512, np.float32), "b": np.zeros(3, np.float32)}
    save_file(two, tmp_path / "two.safetensors")
    save_file({"x": np.zeros((4, 128), np.float32)}, tmp_path / "shape.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        "short.npy": "shape \\[100\\]",
        "nan.npy": "NaN",
        "objects.npy": "not a readable embedding",  # never unpickled
        "two.safetensors": "none named 'embedding'",
        "shape.safetensors": "shape \\[4, 128\\]",
        "junk.safetensors": "not a readable embedding",
        "missing.npy": "does not exist",
        "ref.pt": "ends in .safetensors or .npy",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            ref.read_embedding(tmp_path / name)
    with pytest.raises(UserError, match="folder .* does not exist"):
        ref.write_embedding(tmp_path / "nowhere" / "ref.npy", _embedding())


# -- reading the audio --------------------------------------------------------------------

needs_soxr = pytest.mark.skipif(
    importlib.util.find_spec("soxr") is None, reason="soxr, the resampler of .[ref], is missing"
)


def _tone(seconds: float, rate: int, channels: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    left = 0.5 * np.sin(2 * np.pi * freq * t)
    right = 0.25 * np.sin(2 * np.pi * freq * t)  # another level, so mono is their mean
    return np.stack([left, right][:channels], axis=1).astype(np.float32)


@needs_soxr
def test_a_stereo_48k_file_becomes_24k_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, _tone(3.0, 48000, 2), 48000, subtype="FLOAT")
    wav = ref.read_reference_audio(path)
    assert wav.dtype == torch.float32 and wav.shape == (3 * 24000,)
    # A 440 Hz tone at (0.5 + 0.25) / 2 amplitude: the mean of the channels, resampled.
    t = np.arange(3 * 24000) / 24000
    expected = 0.375 * np.sin(2 * np.pi * 440.0 * t)
    middle = slice(2400, -2400)  # away from the resampler's edges
    assert np.abs(wav.numpy()[middle] - expected[middle]).max() < 1e-3
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    assert abs(np.argmax(spectrum) * 24000 / wav.shape[0] - 440.0) < 1.0


@needs_soxr
def test_only_the_chosen_part_is_read(tmp_path):
    path = tmp_path / "long.flac"
    rate = 16000
    quiet, loud = _tone(4.0, rate, 1) * 0.1, _tone(4.0, rate, 1)
    sf.write(path, np.concatenate([quiet, loud]), rate)
    part = ref.read_reference_audio(path, ref.parse_seconds("5-7"))
    assert part.shape == (2 * 24000,)
    assert 0.45 < float(part.abs().max()) < 0.55  # the loud half only
    tail = ref.read_reference_audio(path, (6.5, 30.0))  # the end is cut to the file's
    assert tail.shape == (int(1.5 * 24000),)
    default = ref.read_reference_audio(path)  # 0-30 s of an 8 s file: all of it
    assert default.shape == (8 * 24000,)


def test_bad_audio_is_one_sentence(tmp_path, monkeypatch):
    rate = 24000
    sf.write(tmp_path / "silent.wav", np.zeros((3 * rate, 2), np.float32), rate)
    sf.write(tmp_path / "short.wav", _tone(0.5, rate, 1), rate)
    sf.write(tmp_path / "ok.wav", _tone(3.0, rate, 1), rate)
    nan = _tone(2.0, rate, 1)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, rate, subtype="FLOAT")
    (tmp_path / "text.wav").write_text("not audio at all")
    cases = [
        ("text.wav", ref.DEFAULT_SECONDS, "not an audio file"),
        ("missing.wav", ref.DEFAULT_SECONDS, "does not exist"),
        ("silent.wav", ref.DEFAULT_SECONDS, "silent"),
        ("short.wav", ref.DEFAULT_SECONDS, "0.50 s long"),
        ("ok.wav", (2.5, 10.0), "0.50 s long"),
        ("ok.wav", (5.0, 9.0), "starts past the end"),
        ("nan.wav", ref.DEFAULT_SECONDS, "not finite"),
    ]
    for name, seconds, message in cases:
        with pytest.raises(UserError, match=message):
            ref.read_reference_audio(tmp_path / name, seconds)
    for text, message in [("10", "A-B"), ("a-b", "A-B"), ("5-2", "0 <= A < B"),
                          ("3-3.5", "at least 1 s"), ("nan-4", "0 <= A < B")]:
        with pytest.raises(UserError, match=message):
            ref.parse_seconds(text)


def test_a_three_hour_file_is_refused_from_its_header(tmp_path, monkeypatch):
    # A sparse file (no disk used) whose WAV header says 3 hours at 8 kHz: the refusal must
    # come from the header, before anything is decoded.
    path = tmp_path / "three-hours.wav"
    frames, rate = 3 * 3600 * 8000, 8000
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 2 * frames, b"WAVE", b"fmt ", 16,
                         1, 1, rate, 2 * rate, 2, 16, b"data", 2 * frames)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + 2 * frames)
    assert sf.info(str(path)).frames == frames
    decoded = []

    def read(*args: object, **kwargs: object) -> None:
        decoded.append(args)
        raise AssertionError("decoded")

    monkeypatch.setattr(ref.sf, "read", read)
    with pytest.raises(UserError, match="180 minutes long"):
        ref.read_reference_audio(path)
    assert decoded == []


# -- the embedder: the real muq package on random weights ---------------------------------


class _MelSpectrogram(nn.Module):
    """Stand-in for torchaudio.transforms.MelSpectrogram's defaults (power 2, centred reflect
    padding, Hann window, HTK mel scale, no filter norm), for these tests only."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop_length: int | None = None,
                 n_mels: int = 128, **_: object) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop_length or n_fft // 2
        self.register_buffer("window", torch.hann_window(n_fft))
        mel = torch.linspace(0, 2595.0 * math.log10(1 + sample_rate / 2 / 700), n_mels + 2)
        hz = (700.0 * (10 ** (mel.double() / 2595.0) - 1))[:, None]
        freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)[None]
        rising = (freqs - hz[:-2]) / (hz[1:-1] - hz[:-2])
        falling = (hz[2:] - freqs) / (hz[2:] - hz[1:-1])
        self.register_buffer("filters", rising.minimum(falling).clamp(min=0).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True).abs() ** 2
        return self.filters @ spec


class _AmplitudeToDB(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(x.clamp(min=1e-10))


class _NotUsed(nn.Module):  # training-time augmentations, built but never run in eval
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()


def _stand_ins() -> dict[str, types.ModuleType]:
    """What sys.modules needs for `import muq` here: torchaudio's two transforms if torchaudio
    cannot load, and x_clip without its package __init__ (which imports torchvision for
    image augmentations; muq takes only its text tokenizer)."""
    found = {}
    try:
        import torchaudio  # noqa: F401
    except Exception:  # missing, or a build for another torch that fails to load
        audio = types.ModuleType("torchaudio")
        transforms = types.ModuleType("torchaudio.transforms")
        for module in (audio, transforms):
            module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        transforms.MelSpectrogram, transforms.AmplitudeToDB = _MelSpectrogram, _AmplitudeToDB
        for name in ("Spectrogram", "TimeStretch", "FrequencyMasking", "TimeMasking"):
            setattr(transforms, name, _NotUsed)
        audio.transforms = transforms
        found |= {"torchaudio": audio, "torchaudio.transforms": transforms}
    spec = importlib.util.find_spec("x_clip")
    if spec is not None and importlib.util.find_spec("torchvision") is None:
        package = types.ModuleType("x_clip")
        package.__spec__, package.__path__ = spec, list(spec.submodule_search_locations)
        found["x_clip"] = package
    return found


SMALL_MULAN = {
    "mulan": {"sr": 24000, "clip_secs": 10, "dim_latent": 512,
              "decoupled_contrastive_learning": True, "hierarchical_contrastive_loss": False,
              "hierarchical_contrastive_loss_layers": None, "sigmoid_contrastive_loss": False,
              "rank_contrast": True},
    "audio_model": {"name": "OpenMuQ/MuQ-large-msd-iter", "model_dim": 32, "use_layer_idx": -1},
    "text_model": {"name": "xlm-roberta-base", "model_dim": None, "use_layer_idx": -1},
    # tf_depth 0 as in MuQ-MuLan-large's own config: MuQ's last layer → proj → mean → latent.
    "audio_transformer": {"dim": 24, "tf_depth": 0, "heads": 2, "dim_head": 8,
                          "attn_dropout": 0, "ff_dropout": 0, "ff_mult": 4},
    "text_transformer": {"dim": 16, "tf_depth": 1, "max_seq_len": 64, "dim_head": 8, "heads": 2,
                         "attn_dropout": 0, "ff_dropout": 0, "ff_mult": 4},
}


def _cannot_run(why: str) -> None:
    """Skip, or fail where .ci/run's second pytest asks for these tests
    (HEARTMULA_RT_MUQ_TESTS=1, with muq and transformers 4 first on the path)."""
    if os.environ.get("HEARTMULA_RT_MUQ_TESTS"):
        pytest.fail(f"HEARTMULA_RT_MUQ_TESTS is set but {why}")
    pytest.skip(f"{why} (.ci/run runs these with transformers 4 in a folder of their own)")


@pytest.fixture(scope="module")
def muq_package():
    if importlib.util.find_spec("muq") is None:
        _cannot_run("the muq package (.[ref]) is not installed")
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        _cannot_run(f"muq 0.1.0 needs transformers 4, not {transformers.__version__}")
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        for name, module in _stand_ins().items():
            mp.setitem(sys.modules, name, module)
        import muq

        yield muq
    for name in set(sys.modules) - before:  # muq was built on the stand-ins: forget it all
        if name.split(".")[0] in ("muq", "x_clip"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def small_mulan(muq_package):
    from muq.muq_mulan.models import audio, text
    from transformers import Wav2Vec2ConformerConfig, XLMRobertaConfig, XLMRobertaModel

    conformer = Wav2Vec2ConformerConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64,
        conv_depthwise_kernel_size=7, position_embeddings_type="rotary",
    ).to_dict()
    muq_config = {
        "encoder_dim": 32, "encoder_depth": 2, "conv_dim": 4, "codebook_size": 16,
        "stat": {"melspec_2048_mean": 6.77, "melspec_2048_std": 19.0},
        # EasyDict, which MuQ wraps this in, takes no int keys (id2label): leave the dicts out.
        "w2v2_config": {k: v for k, v in conformer.items() if not isinstance(v, dict)},
    }

    def muq_tower(self, name):  # instead of MuQ.from_pretrained(name)
        self.model = muq_package.MuQ(muq_package.MuQConfig(**muq_config))

    def text_tower(self):  # instead of XLMRobertaModel.from_pretrained("xlm-roberta-base")
        return XLMRobertaModel(XLMRobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audio.AudioSpectrogramTransformerPretrained, "_init_pretrained_model", muq_tower)
        mp.setattr(text.TextTransformerPretrained, "_init_pretrained_model", text_tower)
        torch.manual_seed(0)
        return muq_package.MuQMuLan(SMALL_MULAN)


@needs_soxr
def test_the_embedder_gives_a_unit_512_vector_deterministically(small_mulan, tmp_path):
    embedder = ref.embedder_of(small_mulan)
    assert small_mulan.mulan.text is None  # the text tower is freed
    path = tmp_path / "clip.wav"
    rng = np.random.default_rng(5)
    sf.write(path, (0.3 * rng.standard_normal((12 * 48000, 2))).astype(np.float32), 48000)
    first = embedder.embed_file(path)
    assert first.shape == (REFERENCE_DIM,) and first.dtype == torch.float32
    assert abs(float(first.norm()) - 1.0) < 1e-5
    assert torch.equal(embedder.embed_file(path), first)
    # Two 10 s clips (the second wraps around), averaged by the package, then normalised.
    wav = ref.read_reference_audio(path)
    with torch.inference_mode():
        clips = torch.stack([wav[:240000], torch.cat([wav[240000:], wav[: 480000 - wav.shape[0]]])])
        each = small_mulan.mulan.get_audio_latents(clips)
    assert torch.allclose(each.norm(dim=-1), torch.ones(2), atol=1e-5)  # MuLan's l2norm
    mean = each.mean(0)
    torch.testing.assert_close(first, mean / mean.norm(), rtol=0, atol=1e-5)
    other = tmp_path / "other.wav"
    sf.write(other, (0.3 * rng.standard_normal((11 * 24000, 1))).astype(np.float32), 24000)
    assert not torch.equal(embedder.embed_file(other), first)


@needs_soxr
def test_an_embedded_clip_fills_the_slot(small_mulan, tmp_path, tiny_lm, tokenizer, gen):
    embedder = ref.embedder_of(small_mulan)
    path = tmp_path / "clip.flac"
    sf.write(path, _tone(2.0, 44100, 2), 44100)
    reference = ref.reference_of_audio(embedder, path, (0, 2), strength=0.5)
    saved = ref.write_embedding(tmp_path / "ref.safetensors", torch.tensor(reference.embedding))
    assert ref.reference_of_file(saved, 0.5) == reference
    prompt, rows = _rows(tiny_lm, tokenizer, gen, reference)
    expected = tiny_lm.muq_linear(torch.tensor(reference.embedding) * 0.5)
    torch.testing.assert_close(rows[0, prompt.slot_index], expected)


def test_loading_says_the_licence_on_first_download_and_hints_offline(
    muq_package, small_mulan, monkeypatch, capsys
):
    calls = []

    def offline(repo, cache_dir=None):
        calls.append(repo)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(muq_package.MuQMuLan, "from_pretrained", offline)
    monkeypatch.setattr(ref, "_cached", lambda repo: False)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1.*--ref-embedding") as error:
        ref.load_embedder()
    assert "\n" not in str(error.value) and calls == [ref.REPO]
    assert "CC BY-NC 4.0" in capsys.readouterr().err
    monkeypatch.setattr(
        muq_package.MuQMuLan, "from_pretrained", lambda repo, cache_dir=None: small_mulan
    )
    monkeypatch.setattr(ref, "_cached", lambda repo: True)
    assert ref.load_embedder().embed(torch.randn(24000)).shape == (REFERENCE_DIM,)
    assert capsys.readouterr().err == ""  # cached: no licence again


def test_a_missing_extra_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "muq", None)  # import muq → ImportError
    with pytest.raises(UserError, match=r"pip install 'heartmula-rt\[ref\]'"):
        ref.load_embedder()
    monkeypatch.setitem(sys.modules, "soxr", None)
    with pytest.raises(UserError, match=r"pip install 'heartmula-rt\[ref\]'"):
        ref.resample(np.zeros(48000, np.float32), 48000)


def test_the_planner_counts_the_embedder_where_it_runs():
    from heartmula_rt.memory.footprint import embedder_sizes
    from heartmula_rt.memory.report import embedder_bytes, format_embedder

    sizes = embedder_sizes()
    assert sizes.load_peak > sizes.running > sizes.weights > 0
    assert embedder_bytes() == {"cpu": sizes.load_peak}  # the default: nothing on a GPU
    assert embedder_bytes("cuda:0") == {"cpu": sizes.load_peak, "gpu": sizes.running}
    assert "gpu" in format_embedder("cuda") and "gpu" not in format_embedder()


@needs_soxr
def test_the_embed_command_runs_the_real_package(small_mulan, tmp_path, monkeypatch, capsys):
    from heartmula_rt import cli
    from heartmula_rt.cli import reference as cli_reference

    # cli/reference.py's test hook: the small random MuQ-MuLan instead of the published one.
    monkeypatch.setattr(cli_reference, "LOAD_EMBEDDER", lambda d: ref.embedder_of(small_mulan, d))
    path = tmp_path / "clip.wav"
    sf.write(path, _tone(3.0, 48000, 2), 48000)
    out = tmp_path / "ref.safetensors"
    assert cli.main([str(a) for a in ("embed", path, "-o", out, "--ref-seconds", "0.5-3")]) == 0
    expected = ref.embedder_of(small_mulan).embed_file(path, (0.5, 3.0))
    np.testing.assert_allclose(ref.read_embedding(out), expected.numpy(), rtol=0, atol=1e-6)
