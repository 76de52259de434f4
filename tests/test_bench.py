"""`heartmula-rt bench` on the CPU: the results file, the byte count, greedy agreement, plotting and
the inputs it refuses. Timings are never asserted."""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from heartmula_rt import bench as bench_module
from heartmula_rt.bench import BenchConfig, run_bench
from heartmula_rt.cli import build_parser
from heartmula_rt.errors import UserError
from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.folder import LM_DIR
from heartmula_rt.model.lm import merge_projections
from heartmula_rt.model.synthetic import synthetic_models
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.loader import PipelineConfig, load_pipeline
from heartmula_rt.runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_checkpoint import make_checkpoint  # noqa: E402

RUN_FIELDS = {
    "name", "engine", "quant", "dtype", "codec_dtype", "cfg_rows", "cfg_scale", "topk",
    "temperature", "max_seconds", "frames", "prompt_len", "prefill_ms", "lm_frames_per_s",
    "ms_per_frame", "bytes_per_frame", "achieved_gbps", "copy_gbps", "floor_ms_per_frame",
    "codec_s", "e2e_s", "e2e_rtf", "ttfa_s", "stream_s", "peak_vram_gib", "vram_budget_gib",
    "greedy_agreement", "greedy_first_mismatch", "raw_decode_s", "raw_prefill_s", "raw_codec_s",
    "songs", "rows", "song_frames_per_s", "batch_speedup", "device_type", "floor_ratio",
    "launches_per_frame",
}  # fmt: skip
POSITIVE = (
    "prefill_ms", "lm_frames_per_s", "ms_per_frame", "bytes_per_frame", "achieved_gbps",
    "copy_gbps", "floor_ms_per_frame", "codec_s", "e2e_s", "e2e_rtf", "ttfa_s", "stream_s",
)  # fmt: skip


def bench(*args: str) -> int:
    """`heartmula-rt bench ARGS`, with user errors raised rather than printed."""
    ns = build_parser().parse_args(["bench", *args])
    return ns.func(ns)


def tiny_args(out: Path, *extra: str) -> list[str]:
    return [
        "--synthetic", "tiny", "--device", "cpu", "--engines", "plain", "--max-seconds", "2",
        "--repeats", "1", "--warmup", "0", "--codec-repeats", "1", "--out-dir", str(out), *extra,
    ]  # fmt: skip


def only_result(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bench run of the tiny preset with the plain engine; its results file."""
    out = tmp_path_factory.mktemp("results")
    assert bench(*tiny_args(out)) == 0
    (path,) = out.glob("*.json")
    return path


def tiny_bytes_per_frame(kv_positions: float, rows: int) -> float:
    """LM_PRESETS["tiny"] in float32, counted by hand: backbone 2 layers of width 64 (4 heads,
    2 kv heads of 16, MLP 160), decoder 2 layers of width 64 (2 heads, 1 kv head of 32, MLP
    128), audio vocabulary 1029, 8 codebooks."""

    def layer(dim: int, kv_dim: int, hidden: int) -> int:  # q, o, k, v, w1-3, two norms
        return 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim

    backbone = 2 * layer(64, 32, 160) + 64
    decoder = 2 * layer(64, 32, 128) + 64
    projection, c0_head, audio_head = 64 * 64, 64 * 1029, 7 * 64 * 1029
    weights = backbone + 8 * 64 + c0_head + 7 * (decoder + projection) + audio_head
    # k and v per row; the decoder's 7 steps read 2 + 3 + ... + 8 = 35 positions.
    kv = 2 * rows * (2 * 2 * 16 * kv_positions + 2 * 1 * 32 * 35)
    return 4 * (weights + kv)


def test_results_file(tiny_results: Path, capsys) -> None:
    result = json.loads(tiny_results.read_text())
    assert tiny_results.name.endswith("_synthetic-tiny.json")
    assert {"device", "torch", "triton", "commit", "command", "model", "date"} <= result.keys()
    assert result["model"] == "synthetic tiny" and result["torch"] == torch.__version__
    (run,) = result["runs"]
    assert run.keys() == RUN_FIELDS
    assert run["engine"] == "plain" and run["quant"] == "none" and run["dtype"] == "float32"
    assert run["cfg_rows"] == 2 and run["cfg_scale"] == 1.5 and run["topk"] == 50
    assert run["frames"] == 25 + 1  # 2 s = 25 frames after frame 0, EOS never stops a run
    assert run["prompt_len"] == 256
    for key in POSITIVE:
        assert math.isfinite(run[key]) and run[key] > 0, key
    for key in ("peak_vram_gib", "vram_budget_gib", "greedy_agreement"):
        assert run[key] is None, key
    assert run["codec_dtype"] == "float32" and run["ttfa_s"] <= run["stream_s"]
    codec = result["codec"]
    assert codec["dtypes"].keys() == {"float32", "mixed", "bfloat16"}
    assert codec["dtypes"]["float32"]["snr_db"] is None
    assert codec["dtypes"]["mixed"]["snr_db"] > codec["dtypes"]["bfloat16"]["snr_db"] > 0
    assert run["raw_codec_s"] == codec["dtypes"]["float32"]["raw_codec_s"]
    largest = codec["scalar_largest_activation_bytes"]
    assert 0 < largest < codec["scalar_largest_activation_bytes_unchunked"]
    assert [len(run[k]) for k in ("raw_decode_s", "raw_prefill_s", "raw_codec_s")] == [1, 1, 1]
    # The mean over the song: backbone positions 257 (first decode step) to 281 (last).
    assert run["bytes_per_frame"] == tiny_bytes_per_frame((257 + 281) / 2, rows=2)
    assert run["e2e_s"] == pytest.approx(
        run["prefill_ms"] / 1000 + 25 / run["lm_frames_per_s"] + run["codec_s"]
    )


def test_quantized_run(tmp_path: Path) -> None:
    assert bench(*tiny_args(tmp_path, "--no-codec", "--quant", "int8")) == 0
    (run,) = only_result(tmp_path)["runs"]
    assert run["quant"] == "int8" and run["name"] == "plain-float32-int8"
    # int8 weights: about a quarter of float32's bytes, scales and unquantized rows aside.
    assert run["bytes_per_frame"] < 0.4 * tiny_bytes_per_frame(257, rows=2)


def test_quant_modes_side_by_side_in_one_file(tmp_path: Path) -> None:
    """One file, one run per mode and engine; each mode quantizes the same random weights, so
    int8 reads about a quarter of float32's bytes."""
    args = tiny_args(tmp_path, "--no-codec", "--quant", "none,int8")
    assert bench(*args) == 0
    runs = only_result(tmp_path)["runs"]
    assert [(r["quant"], r["name"]) for r in runs] == [
        ("none", "plain-float32"),
        ("int8", "plain-float32-int8"),
    ]
    assert runs[1]["bytes_per_frame"] < 0.4 * runs[0]["bytes_per_frame"]


def test_greedy_agreement_of_plain_with_itself(tmp_path: Path) -> None:
    args = tiny_args(tmp_path, "--no-codec", "--greedy-frames", "8", "--cfg-scale", "1")
    assert bench(*args, "--name", "greedy") == 0
    (run,) = only_result(tmp_path)["runs"]
    assert run["greedy_agreement"] == 1.0 and run["greedy_first_mismatch"] is None
    assert run["cfg_rows"] == 1 and run["codec_s"] is None and run["e2e_rtf"] is None


def test_batch_sizes_side_by_side(tmp_path: Path) -> None:
    """`--batch 1,2`: the one-song run, then 2 songs at once, each run's figures derived from
    its own timings; a frame of both songs reads the whole cache of 4 rows."""
    assert bench(*tiny_args(tmp_path, "--no-codec", "--batch", "1,2")) == 0
    one, two = only_result(tmp_path)["runs"]
    assert one.keys() == two.keys() == RUN_FIELDS
    assert (one["name"], one["songs"], one["rows"], one["batch_speedup"]) == (
        "plain-float32",
        1,
        2,
        1.0,
    )
    assert (two["name"], two["songs"], two["rows"]) == ("plain-float32-x2", 2, 4)
    assert two["lm_frames_per_s"] == pytest.approx(2 * 25 / two["raw_decode_s"][0])
    assert two["song_frames_per_s"] == pytest.approx(two["lm_frames_per_s"] / 2)
    assert two["ms_per_frame"] == pytest.approx(1000 / two["song_frames_per_s"])
    assert two["batch_speedup"] == pytest.approx(two["lm_frames_per_s"] / one["lm_frames_per_s"])
    assert two["bytes_per_frame"] == tiny_bytes_per_frame(256 + 25, rows=4)
    assert two["achieved_gbps"] == pytest.approx(
        two["bytes_per_frame"] * two["song_frames_per_s"] / 1e9
    )
    assert two["codec_s"] is None and two["prefill_ms"] > 0


def test_results_are_never_overwritten(tiny_results: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_results, tmp_path / tiny_results.name)
    assert bench(*tiny_args(tmp_path, "--no-codec", "--max-seconds", "0.2")) == 0
    assert {p.name for p in tmp_path.glob("*.json")} == {
        tiny_results.name,
        tiny_results.name.replace(".json", "-2.json"),
    }


def test_plot(tiny_results: Path, tmp_path: Path, capsys) -> None:
    second = tmp_path / "other.json"
    shutil.copy(tiny_results, second)
    png = tmp_path / "plot.png"
    assert bench("--plot", str(png), str(tiny_results), str(second)) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert str(png) in capsys.readouterr().err  # stdout carries only the product


def test_synthetic_lm_is_make_checkpoints(tmp_path: Path) -> None:
    """One rule set for random weights: made on the device or written to files, the same LM."""
    root = make_checkpoint(tmp_path / "ckpt", lm="tiny", codec="tiny", seed=5)
    written = load_lm(root / LM_DIR)[0].state_dict()
    made = synthetic_models("tiny", torch.device("cpu"), torch.float32, seed=5).lm.state_dict()
    assert written.keys() == made.keys()
    for key, tensor in written.items():
        assert torch.equal(tensor, made[key]), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engines", "plain,turbo"], "unknown engine 'turbo'"),
        (["--engines", "graph"], "needs a CUDA GPU"),
        (["--engines", ","], "names no engine"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--max-seconds", "0.05"], "one frame"),
        (["--prompt-len", "0"], "prompt length"),
        (["--topk", "0"], "topk"),
        (["--quant", "none,int3"], "unknown quantization mode 'int3'"),
        (["--quant", "int8,int8"], "names a mode twice"),
        (["--quant", ","], "at least one mode"),
        (["--batch", "1,0"], "song counts of 1 or more"),
        (["--batch", "two"], "song counts of 1 or more"),
    ],
)
def test_bad_inputs(tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        bench(*tiny_args(tmp_path, "--no-codec"), *args)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["missing.json"], "does not exist"),
        (["not-results.json"], "not a results file"),
        ([], "at least one results file"),
    ],
)
def test_bad_plot_inputs(tmp_path: Path, files: list[str], message: str) -> None:
    (tmp_path / "not-results.json").write_text('{"runs": 3}')
    with pytest.raises(UserError, match=message):
        bench("--plot", str(tmp_path / "plot.png"), *(str(tmp_path / f) for f in files))
    assert not (tmp_path / "plot.png").exists()


def test_bench_measures_what_load_pipeline_makes(tmp_path: Path, monkeypatch) -> None:
    """No second assembly path: each quantization mode's models are a pipeline that
    `load_pipeline` made from a `PipelineConfig`, as the product makes them."""
    made: list[PipelineConfig] = []

    def spy(config: PipelineConfig) -> Pipeline:
        made.append(config)
        return load_pipeline(config)

    monkeypatch.setattr(bench_module, "load_pipeline", spy)
    assert bench(*tiny_args(tmp_path, "--no-codec", "--quant", "none,int8")) == 0
    assert [(c.synthetic, c.device, c.quant, c.engine) for c in made] == [
        ("tiny", "cpu", "none", "plain"),
        ("tiny", "cpu", "int8", "plain"),
    ]


def test_bench_runs_from_a_config_object(tmp_path: Path) -> None:
    config = BenchConfig(
        pipeline=PipelineConfig(synthetic="tiny", device="cpu"),
        engines=("plain",),
        sampling=SamplingParams(max_frames=5, seed=1, stop_at_eos=False),
        repeats=1,
        warmup=0,
        codec=False,
        out_dir=tmp_path,
        name="api",
    )
    assert run_bench(config) == 0
    (run,) = only_result(tmp_path)["runs"]
    assert run["frames"] == 6 and run["quant"] == "none"
    with pytest.raises(UserError, match="--repeats must be at least 1"):
        replace(config, repeats=0)
    with pytest.raises(UserError, match="needs a seed"):
        replace(config, sampling=SamplingParams(max_frames=5))


def test_a_synthetic_pipeline_sings(tmp_path: Path) -> None:
    """Random weights with a tokenizer: the whole product path, text to audio, no checkpoint."""
    pipe = load_pipeline(PipelineConfig(synthetic="tiny", device="cpu"))
    wav = pipe.generate("piano", "la la", max_seconds=0.5, seed=0, num_steps=1)
    assert wav.shape[0] == 2 and wav.shape[1] > 0 and torch.isfinite(wav).all()
    made = synthetic_models("tiny", torch.device("cpu"), torch.float32).lm
    made = merge_projections(made).state_dict()  # as the pipeline loads it
    for key, tensor in pipe.lm.state_dict().items():
        assert torch.equal(tensor, made[key]), key
