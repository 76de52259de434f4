"""LoRA adapters wired through the runtime (#32): `--lora` on the commands and `lora=` in
`load_pipeline`, merged before quantization or run per song in one batch through the song
runner on the plain and static engines, recorded in each song's sidecar and checked again by
the edits. The adapter files are made by PEFT itself, as in tests/test_lora.py."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from heartmula_rt import cli, load_pipeline
from heartmula_rt.errors import UserError
from heartmula_rt.model.lm import HeartMuLa
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SongRequest
from heartmula_rt.runtime.codes import LoraRecord, SongCodes
from heartmula_rt.runtime.decode import generate_frames
from heartmula_rt.runtime.engine import StaticEngine

peft = pytest.importorskip("peft", reason="the adapters are made by PEFT itself (.[test])")

TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "projection"]
ROWS = 4  # every batch comparison keeps this row count (decode.py's seed contract)


def _make_adapter(lm: HeartMuLa, folder: Path, *, r: int, alpha: float, seed: int) -> Path:
    """A PEFT folder over this runtime's own HeartMuLa, with random A and B."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(lm), config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    wrapped.save_pretrained(str(folder))
    return folder


def _merged_by_hand(lm: HeartMuLa, folder: Path, scaling: float, scale: float) -> HeartMuLa:
    """`lm` with W + scale · alpha/r · B @ A added to each adapted weight, by the test itself."""
    state = load_file(str(folder / "adapter_model.safetensors"))
    model = copy.deepcopy(lm)
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            b = state[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            weight = model.get_submodule(name).weight
            weight += scale * scaling * (b @ a)
    return model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_lm: HeartMuLa) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "x": _make_adapter(tiny_lm, root / "x", r=4, alpha=8, seed=1),  # scaling 2
        "y": _make_adapter(tiny_lm, root / "y", r=2, alpha=2, seed=2),  # scaling 1
    }


def run_cli(args: list, capfd) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in args])
    return code, capfd.readouterr().err.strip().splitlines()


GEN = ["--tags", "piano,calm", "--lyrics", "[verse] one two", "--topk", "1", "--seed", "3"]


# -- merged ---------------------------------------------------------------------------------


def test_gen_with_lora_merged_gives_the_hand_merged_models_frames(
    tiny_ckpt: Path, tiny_lm: HeartMuLa, adapters, tokenizer, gen, tmp_path: Path, capfd
) -> None:
    out = tmp_path / "song.wav"
    args = ["gen", "--model-path", tiny_ckpt, *GEN, "--max-seconds", "0.8"]
    code, err = run_cli([*args, "--lora", f"{adapters['x']}:0.8", "-o", out], capfd)
    assert code == 0, err
    assert any("LoRA adapters, merged: x (0.8)" in line for line in err), err
    song = SongCodes.load(tmp_path / "song.codes.safetensors")
    request = SongRequest.of("piano,calm", "[verse] one two", topk=1, seed=3, max_seconds=0.8)
    prompt = build_prompt(tokenizer, gen, request.tags, request.lyrics)
    by_hand = _merged_by_hand(tiny_lm, adapters["x"], 2.0, 0.8)
    assert torch.equal(song.codes, generate_frames(by_hand, prompt, gen, request.sampling))
    assert not torch.equal(song.codes, generate_frames(tiny_lm, prompt, gen, request.sampling))
    # The sidecar names the adapter: its name, file, contents and strength.
    (record,) = song.lora
    assert (record.name, Path(record.path), record.scale) == ("x", adapters["x"].resolve(), 0.8)
    assert len(record.fingerprint) == 64


def test_a_zero_scale_adapter_is_the_base_model_exactly(tiny_ckpt: Path, adapters) -> None:
    base = load_pipeline(tiny_ckpt, device="cpu")
    zero = load_pipeline(tiny_ckpt, device="cpu", lora=[f"{adapters['x']}:0"])
    assert [a.scale for a in zero.adapters] == [0.0]
    for key, weight in base.lm.state_dict().items():
        assert torch.equal(zero.lm.state_dict()[key], weight), key
    request = SongRequest.of("rock", "la la", topk=5, seed=11, max_frames=6)
    assert torch.equal(zero.generate_frames(request), base.generate_frames(request))


def test_bad_adapter_files_are_one_line_exit_2_and_nothing_loaded(
    tiny_ckpt: Path, adapters, tmp_path: Path, capfd, monkeypatch
) -> None:
    from heartmula_rt.model import checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the adapters were checked")

    monkeypatch.setattr(checkpoint, "load_lm", no_weights)
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(b"not a safetensors file at all")
    out = tmp_path / "song.wav"
    base = ["gen", "--model-path", tiny_ckpt, *GEN, "--max-seconds", "0.4", "-o", out]
    for given, said in [
        (tmp_path / "missing.safetensors", "does not exist"),
        (wrong, "not a readable safetensors file"),
        (f"{adapters['x']}:1e", "not a number"),
    ]:
        # A good adapter beside the bad one: neither is used.
        code, err = run_cli([*base, "--lora", adapters["y"], "--lora", given], capfd)
        assert code == 2 and len(err) == 1 and said in err[0], err
        assert not out.exists()
    with pytest.raises(UserError, match="two LoRAs are named"):
        load_pipeline(tiny_ckpt, device="cpu", lora=[adapters["x"], f"x={adapters['y']}"])


# -- per song, in one batch ------------------------------------------------------------------


def _songs() -> dict[str, SongRequest]:
    """Greedy songs (frames comparable across engines and adapters' rounding), 5 rows' worth
    for 4 rows: "d" waits and is admitted into the rows "c" leaves."""
    return {
        "a": SongRequest.of("piano", "[verse] hello", topk=1, cfg_scale=1.5, seed=1, max_frames=7),
        "b": SongRequest.of("rock", "[verse] la la", topk=1, cfg_scale=1.0, seed=2, max_frames=8),
        "c": SongRequest.of("jazz", "[chorus] night", topk=1, cfg_scale=1.0, seed=3, max_frames=3),
        "d": SongRequest.of("metal", "[verse] fire", topk=1, cfg_scale=1.0, seed=4, max_frames=6),
    }


@pytest.mark.parametrize("kind", ["plain", "static"])
def test_per_song_adapters_in_one_batch_equal_each_alone_merged(
    kind: str, tiny_ckpt: Path, adapters
) -> None:
    from dataclasses import replace

    def engine_for(pipe):
        if kind == "static":  # its capture-free step on the CPU, as tests/test_batching.py
            pipe.engine = StaticEngine(pipe.lm, pipe.gen_config, graphs=False, bucket=16)
        return pipe

    served = engine_for(
        load_pipeline(
            tiny_ckpt,
            device="cpu",
            lora=[f"x={adapters['x']}", f"y={adapters['y']}:0.5"],
            lora_per_song=True,
        )
    )
    assert served.lora_names == ["x", "y"]
    songs = _songs()
    chosen = {"a": ("x", 1.0), "b": ("y", 1.0), "c": (None, 1.0), "d": ("x", 0.5)}
    requests = [replace(songs[n], lora=lora, lora_scale=s) for n, (lora, s) in chosen.items()]
    together = served.generate_frames_batch(requests, rows=ROWS)

    merged = {
        ("x", 1.0): [f"{adapters['x']}"],
        ("y", 1.0): [f"{adapters['y']}:0.5"],  # the served adapter's own strength
        (None, 1.0): [],
        ("x", 0.5): [f"{adapters['x']}:0.5"],
    }
    for (name, (lora, s)), frames in zip(chosen.items(), together, strict=True):
        pipe = engine_for(load_pipeline(tiny_ckpt, device="cpu", lora=merged[(lora, s)]))
        (alone,) = pipe.generate_frames_batch([songs[name]], rows=ROWS)
        assert torch.equal(frames, alone), name
    # Every row is back to no adapter once the batch is done.
    assert served.lm.lora_rows.index.tolist() == [-1] * ROWS
    # And the adapters do change the songs.
    base = engine_for(load_pipeline(tiny_ckpt, device="cpu"))
    (plain_a,) = base.generate_frames_batch([songs["a"]], rows=ROWS)
    assert not torch.equal(together[0], plain_a)


def test_a_song_chooses_only_a_served_adapter(tiny_ckpt: Path, adapters) -> None:
    served = load_pipeline(tiny_ckpt, device="cpu", lora=[f"x={adapters['x']}"], lora_per_song=True)
    with pytest.raises(UserError, match=r"no LoRA named 'z' is loaded \(loaded: x\)"):
        served.generate_frames(SongRequest.of("rock", "la", max_frames=2, lora="z"))
    merged = load_pipeline(tiny_ckpt, device="cpu", lora=[adapters["x"]])
    with pytest.raises(UserError, match="merged for every song"):
        merged.generate_frames(SongRequest.of("rock", "la", max_frames=2, lora="x"))
    with pytest.raises(UserError, match="lora_scale must be from 0 to 2"):
        SongRequest.of("rock", "la", lora="x", lora_scale=float("nan"))
    # What a song's sidecar names: its own adapter, at its strength times the adapter's.
    (record,) = served.lora_records(SongRequest.of("rock", "la", lora="x", lora_scale=0.5))
    assert (record.name, record.scale) == ("x", 0.5)
    assert served.lora_records(SongRequest.of("rock", "la")) == ()


def test_per_song_adapters_over_an_int8_base_within_its_quantization_error(
    tiny_ckpt: Path, adapters
) -> None:
    float_merged = load_pipeline(tiny_ckpt, device="cpu", lora=[adapters["x"]])
    int8_merged = load_pipeline(tiny_ckpt, device="cpu", quant="int8", lora=[adapters["x"]])
    int8_rows = load_pipeline(
        tiny_ckpt, device="cpu", quant="int8", lora=[f"x={adapters['x']}"], lora_per_song=True
    )
    int8_rows.lm.lora_rows.assign(0, 1, "x")
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))

    def logits(pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe.lm.backbone_step(x, 0, pipe.lm.new_cache(1, 8))[1]

    want = logits(float_merged)
    quant_error = float((logits(int8_merged) - want).norm() / want.norm())
    rows_error = float((logits(int8_rows) - want).norm() / want.norm())
    assert 0 < quant_error < 0.05
    assert rows_error < 2 * quant_error + 1e-4, (rows_error, quant_error)


# -- sidecars and edits ----------------------------------------------------------------------


def test_edits_load_the_songs_adapters_again_and_refuse_a_changed_one(
    tiny_ckpt: Path, adapters, tmp_path: Path, capfd
) -> None:
    mine = shutil.copytree(adapters["x"], tmp_path / "mine")
    out = tmp_path / "song.wav"
    args = ["gen", "--model-path", tiny_ckpt, *GEN, "--max-seconds", "0.8", "-o", out]
    code, err = run_cli([*args, "--lora", f"{mine}:0.7"], capfd)
    assert code == 0, err
    (made,) = SongCodes.load(tmp_path / "song.codes.safetensors").lora

    # Unchanged: extend loads it again, merged at its strength, and its sidecar names it.
    extend = ["extend", out, "--model-path", tiny_ckpt, "--seconds", "0.4"]
    code, err = run_cli(extend, capfd)
    assert code == 0, err
    extended = SongCodes.load(tmp_path / "song-extended.codes.safetensors")
    assert extended.lora == (made,)

    # Changed contents: refused in one line, unless --force.
    shutil.copy(adapters["y"] / "adapter_model.safetensors", mine / "adapter_model.safetensors")
    shutil.copy(adapters["y"] / "adapter_config.json", mine / "adapter_config.json")
    code, err = run_cli(extend, capfd)
    assert code == 2 and len(err) == 1 and "has changed since the song was made" in err[0], err
    code, err = run_cli([*extend, "--force"], capfd)
    assert code == 0, err

    # Gone: refused, unless given with --lora (checked against the record) or --force.
    shutil.rmtree(mine)
    regen = ["regen", out, "--model-path", tiny_ckpt, "--from", "0.2", "--seed", "1"]
    code, err = run_cli(regen, capfd)
    assert code == 2 and len(err) == 1 and "cannot be loaded again" in err[0], err
    code, err = run_cli([*regen, "--lora", adapters["y"]], capfd)  # not the song's
    assert code == 2 and len(err) == 1 and "no --lora given has its contents" in err[0], err
    code, err = run_cli([*regen, "--lora", f"{adapters['x']}:0.7"], capfd)
    assert code == 0, err
    code, err = run_cli([*regen, "--force"], capfd)
    assert code == 0, err
    assert any("leaving out LoRA 'mine'" in line for line in err), err


def test_sidecar_lora_records_round_trip_and_older_sidecars_have_none(tmp_path: Path) -> None:
    request = SongRequest.of("rock", "la", seed=1, max_frames=3)
    record = LoraRecord("x", "/a/x", "ab" * 32, 0.5)
    SongCodes(torch.zeros(8, 4, dtype=torch.long), request, "length", "m", lora=(record,)).save(
        tmp_path / "a.codes.safetensors"
    )
    assert SongCodes.load(tmp_path / "a.codes.safetensors").lora == (record,)
    SongCodes(torch.zeros(8, 4, dtype=torch.long), request, "length", "m").save(
        tmp_path / "b.codes.safetensors"
    )
    from safetensors import safe_open

    with safe_open(tmp_path / "b.codes.safetensors", "pt") as f:
        assert "lora" not in f.metadata()  # as an older heartmula-rt wrote it
    assert SongCodes.load(tmp_path / "b.codes.safetensors").lora == ()


# -- the server ------------------------------------------------------------------------------


def test_the_server_serves_two_adapters_per_song_over_http(
    tiny_ckpt: Path, adapters, tmp_path: Path
) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from serving import ServerProcess, wait_for

    folder = tmp_path / "songs"
    lora = ["--lora", f"x={adapters['x']}", "--lora", f"y={adapters['y']}:0.5"]
    server = ServerProcess(tiny_ckpt, folder, "--batch", "4", "--max-seconds", "4", *lora)
    with server, httpx.Client(base_url=server.url, timeout=120) as client:
        info = client.get("/v1/info").json()
        assert info["lora"] == [{"name": "x", "scale": 1.0}, {"name": "y", "scale": 0.5}]
        assert 'id="lora-row"' in client.get("/").text  # the page's picker and strength
        song = {"tags": "piano", "lyrics": "[verse] la", "seconds": 1, "seed": 5, "topk": 1}
        song["format"] = "wav"
        bodies = [
            {**song, "lora": "x"},
            {**song, "lora": "y", "lora_scale": 1.5},
            song,
        ]
        ids = [client.post("/v1/songs", json=b).json()["id"] for b in bodies]
        jobs = [wait_for(client, i, ("done", "failed")) for i in ids]
        assert [j["state"] for j in jobs] == ["done"] * 3, jobs
        assert jobs[0]["request"]["lora"] == "x" and "lora" not in jobs[2]["request"]
        kept = [SongCodes.load(folder / f"{i}.codes.safetensors") for i in ids]
        assert [[(r.name, r.scale) for r in k.lora] for k in kept] == [
            [("x", 1.0)],
            [("y", 0.75)],  # the song's strength times the adapter's own
            [],
        ]
        assert not torch.equal(kept[0].codes, kept[2].codes)  # the adapter changed the song
        # An edit of a song goes on with its adapter.
        extended = client.post(f"/v1/songs/{ids[0]}/extend", json={"seconds": 1}).json()
        done = wait_for(client, extended["id"], ("done", "failed"))
        assert done["state"] == "done" and done["request"]["lora"] == "x"
        # Adapters the server does not serve, and bad strengths: refused in one sentence.
        for bad, said in [
            ({**song, "lora": "z"}, "no LoRA named 'z'"),
            ({**song, "lora": "x", "lora_scale": 3}, "lora_scale must be from 0 to 2"),
            ({**song, "lora": "../etc"}, "is not an adapter's name"),
        ]:
            answer = client.post("/v1/songs", json=bad)
            assert answer.status_code in (400, 422) and said in answer.json()["detail"], answer.text
    assert not server.running()
