"""LoRA adapters (model/lora.py): files made by PEFT itself on the tiny LM, in SimpleTuner's
HF-Llama names and in torchtune's, either A/B orientation, as folders, safetensors and `.pt`
dicts; merged into the weights (by hand as the reference, and PEFT's own merge), through the
quantized cache, and per LM row in one batch over float and quantized bases."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from heartmula_rt.quant import quantize_model
from heartmula_rt.quant.cache import cache_path, load_quantized_lm
from heartmula_rt.quant.formats import quantized_linears
from safetensors.torch import load_file, save_file
from torch import nn

from heartmula_rt.errors import UserError
from heartmula_rt.model.folder import LM_DIR
from heartmula_rt.model.lm import HeartMuLa, merge_projections
from heartmula_rt.model.lora import (
    LoraSpec,
    load_lora,
    load_loras,
    lora_targets,
    merge_lora,
    parse_lora_spec,
)
from heartmula_rt.model.lora_rows import apply_lora_rows, lora_rows_bytes
from heartmula_rt.model.prompt import build_prompt
from heartmula_rt.request import SamplingParams
from heartmula_rt.runtime.decode import generate_frames, run_batch, run_one
from heartmula_rt.runtime.scheduler import SongRun

peft = pytest.importorskip("peft", reason="the adapters are made by PEFT itself (.[test])")
transformers = pytest.importorskip("transformers")

# The torchtune name of each HF-Llama leaf, written out here apart from the loader's table.
HF_LEAVES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.output_proj",
    "mlp.gate_proj": "mlp.w1",
    "mlp.up_proj": "mlp.w3",
    "mlp.down_proj": "mlp.w2",
}
SIMPLETUNER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _torchtune_name(peft_key: str) -> str:
    """A PEFT key's module under this runtime's names (the test's own mapping)."""
    name = peft_key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    for hf, tt in HF_LEAVES.items():
        name = name.replace(hf, tt)
    return name


class SimpleTunerSkeleton(nn.Module):
    """The module tree SimpleTuner trains HeartMuLa as (its modeling_heartmula.py): transformers'
    LlamaModel as backbone and decoder, plus the projection and codebook 0's head."""

    def __init__(self, lm: HeartMuLa, embed_dim: int | None = None) -> None:
        super().__init__()
        cfg = lm.config

        def llama(f) -> transformers.LlamaConfig:
            dim = embed_dim or f.embed_dim
            return transformers.LlamaConfig(
                vocab_size=cfg.text_vocab_size,
                hidden_size=dim,
                intermediate_size=f.intermediate_dim,
                num_hidden_layers=f.num_layers,
                num_attention_heads=f.num_heads,
                num_key_value_heads=f.num_kv_heads,
            )

        self.backbone = transformers.LlamaModel(llama(cfg.backbone))
        self.decoder = transformers.LlamaModel(llama(cfg.decoder))
        dim = embed_dim or cfg.backbone.embed_dim
        self.projection = nn.Linear(dim, embed_dim or cfg.decoder.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(dim, cfg.audio_vocab_size, bias=False)


def _peft(model: nn.Module, r: int, alpha: float, targets: list[str], seed: int):
    """`model` wrapped by PEFT with random A and B (B scaled to a fine-tune's size)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    return wrapped


class Made:
    """The adapter files of one session, and the A, B and alpha/r each one holds."""

    def __init__(self, root: Path, tiny_lm: HeartMuLa) -> None:
        # torchtune names: PEFT over this runtime's own HeartMuLa (r 4, alpha 8).
        tt = _peft(
            copy.deepcopy(tiny_lm),
            4,
            8,
            ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "projection"],
            seed=1,
        )
        self.tt = root / "tt"
        tt.save_pretrained(str(self.tt))
        self.tt_state = load_file(str(self.tt / "adapter_model.safetensors"))
        self.tt_scaling = 8 / 4
        self.peft_merged = {k: v.clone() for k, v in tt.merge_and_unload().state_dict().items()}
        # SimpleTuner: PEFT over its HF-Llama tree, its default targets and codebook 0's head,
        # saved as its save_lora_weights does (PeftModel.save_pretrained, safetensors).
        st = _peft(SimpleTunerSkeleton(tiny_lm), 2, 2, [*SIMPLETUNER_TARGETS, "codebook0_head"], 2)
        self.st = root / "st"
        st.save_pretrained(str(self.st), safe_serialization=True)
        self.st_state = load_file(str(self.st / "adapter_model.safetensors"))
        self.st_scaling = 2 / 2
        # The torchtune adapter transposed ([in, r], [r, out]) with per-module alpha tensors,
        # and as a .pt dict {module: {lora_A, lora_B, rank, alpha}}.
        transposed, nested = {}, {}
        for key, t in self.tt_state.items():
            short = key.removeprefix("base_model.model.")
            transposed[short] = t.T.contiguous()
            module, _, kind = short.removesuffix(".weight").rpartition(".")
            transposed[f"{module}.alpha"] = torch.tensor(8.0)
            nested.setdefault(module, {"rank": 4, "alpha": 8.0})[kind] = t.clone()
        self.transposed = root / "tt_transposed.safetensors"
        save_file(transposed, str(self.transposed))
        self.pt = root / "tt_dict.pt"
        torch.save(nested, self.pt)

    def reference(self, which: str) -> dict[str, torch.Tensor]:
        """Each adapted module's delta, merged by hand: alpha/r · B @ A."""
        state, scaling = (
            (self.tt_state, self.tt_scaling) if which == "tt" else (self.st_state, self.st_scaling)
        )
        deltas = {}
        for key, a in state.items():
            if ".lora_A." in key:
                b = state[key.replace(".lora_A.", ".lora_B.")]
                deltas[_torchtune_name(key)] = scaling * (b @ a)
        return deltas


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory, tiny_lm: HeartMuLa) -> Made:
    return Made(tmp_path_factory.mktemp("loras"), tiny_lm)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("source", "which"),
    [("tt", "tt"), ("st", "st"), ("transposed", "tt"), ("pt", "tt")],
)
def test_merged_weights_equal_a_merge_by_hand(
    made: Made, tiny_lm: HeartMuLa, source: str, which: str
) -> None:
    adapter = load_lora(getattr(made, source), tiny_lm.config)
    merged = merge_lora(copy.deepcopy(tiny_lm), [adapter])
    deltas = made.reference(which)
    assert set(adapter.modules) == set(deltas)
    base, after = tiny_lm.state_dict(), merged.state_dict()
    for key, weight in base.items():
        delta = deltas.get(key.removesuffix(".weight"))
        if delta is None:
            assert torch.equal(after[key], weight), key  # untouched modules stay bit for bit
        else:
            torch.testing.assert_close(after[key], weight + delta, atol=1e-6, rtol=1e-6)


def test_merged_weights_equal_peft_merge(made: Made, tiny_lm: HeartMuLa) -> None:
    merged = merge_lora(copy.deepcopy(tiny_lm), [load_lora(made.tt, tiny_lm.config)])
    for key, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, made.peft_merged[key], atol=1e-6, rtol=1e-6)


def test_simpletuner_keys_map_onto_every_linear_of_both_stacks(
    made: Made, tiny_lm: HeartMuLa
) -> None:
    adapter = load_lora(made.st, tiny_lm.config)
    layers = [n for n in quantized_linears(tiny_lm) if ".layers." in n]
    assert set(adapter.modules) == {*layers, "codebook0_head"}
    assert {m.rank for m in adapter.modules.values()} == {2}
    assert adapter.name == "st"


def test_targets_are_the_quantized_linears_and_the_reference_projection(
    tiny_lm: HeartMuLa,
) -> None:
    targets = lora_targets(tiny_lm.config)
    assert set(targets) == {*quantized_linears(tiny_lm), "muq_linear"}
    for name, shape in targets.items():
        assert tuple(tiny_lm.get_submodule(name).weight.shape) == shape


@pytest.fixture(scope="module")
def prompt(tokenizer, gen):
    return build_prompt(tokenizer, gen, "piano, calm", "[verse] one two three")


def _greedy(model: HeartMuLa, prompt, gen, lora: str | None = None) -> torch.Tensor:
    """A greedy song alone in its rows; `lora`: the per-row adapter it chooses (the engine
    assigns its rows when it is admitted)."""
    if lora is None:
        return generate_frames(model, prompt, gen, SamplingParams(max_frames=6, topk=1, seed=3))
    song = SongRun(prompt, SamplingParams(max_frames=6, topk=1, seed=3), lora=lora)
    return run_one(lambda s: run_batch(model, gen, s), model, song)


def test_a_zero_scale_adapter_gives_the_base_models_greedy_frames(
    made: Made, tiny_lm: HeartMuLa, prompt, gen
) -> None:
    base = _greedy(tiny_lm, prompt, gen)
    zero = merge_lora(copy.deepcopy(tiny_lm), [load_lora(f"{made.tt}:0", tiny_lm.config)])
    assert torch.equal(_greedy(zero, prompt, gen), base)
    for key, weight in tiny_lm.state_dict().items():
        assert torch.equal(zero.state_dict()[key], weight), key
    full = merge_lora(copy.deepcopy(tiny_lm), [load_lora(made.tt, tiny_lm.config)])
    assert not torch.equal(_greedy(full, prompt, gen), base)  # the adapter does change songs


def _steps(model: HeartMuLa, x: torch.Tensor) -> list[torch.Tensor]:
    """A backbone step over rows x [B, T, D] (its last hidden and codebook 0's logits) and a
    decoder step over them: every adapted kind of layer, the heads included."""
    cache = model.new_cache(x.shape[0], 16)
    last, logits = model.backbone_step(x, 0, cache)
    return [last, logits, model.decoder_step(x[:, :2], 0, cache, 1)]


def _mixed(made: Made, tiny_lm: HeartMuLa, quant: str = "none"):
    """Rows X (tt), Y (st) and none of one batch over one shared base, and each row's
    reference: the float model with its adapter merged, alone."""
    x_adapter = load_lora(made.tt, tiny_lm.config)
    y_adapter = load_lora(f"{made.st}:0.7", tiny_lm.config)
    model = quantize_model(copy.deepcopy(tiny_lm), quant)
    rows = apply_lora_rows(model, [x_adapter, y_adapter], rows=3)
    rows.assign(0, 1, "tt")
    rows.assign(1, 1, "st")  # row 2: none (-1)
    refs = [
        merge_lora(copy.deepcopy(tiny_lm), [x_adapter]),
        merge_lora(copy.deepcopy(tiny_lm), [y_adapter]),
        tiny_lm,
    ]
    return model, rows, refs


def _rows_input(t: int = 5) -> torch.Tensor:
    return torch.randn(3, t, 64, generator=torch.Generator().manual_seed(7))


def test_per_row_adapters_in_one_batch_equal_each_alone_merged(
    made: Made, tiny_lm: HeartMuLa
) -> None:
    model, rows, refs = _mixed(made, tiny_lm)
    x = _rows_input()
    with torch.no_grad():
        batch = _steps(model, x)
        for i, ref in enumerate(refs):
            for got, want in zip(batch, _steps(ref, x[i : i + 1]), strict=True):
                torch.testing.assert_close(got[i : i + 1], want, atol=2e-5, rtol=1e-4)
        # A song's prefill in its own rows of the batch (rows 1..2): the same rows' results.
        with rows.at(1):
            part = _steps(model, x[1:])
        for got, want in zip(part, batch, strict=True):
            torch.testing.assert_close(got, want[1:], atol=2e-5, rtol=1e-4)
    # The mix changes in place: the same tensor, now row 0 without an adapter.
    index = rows.index
    rows.assign(0, 1, None)
    assert rows.index is index and rows.index.tolist() == [-1, 1, -1]


def test_per_row_greedy_song_equals_the_merged_models(
    made: Made, tiny_lm: HeartMuLa, prompt, gen
) -> None:
    adapter = load_lora(made.tt, tiny_lm.config)
    model = copy.deepcopy(tiny_lm)
    rows = apply_lora_rows(model, [adapter], rows=1)
    merged = merge_lora(copy.deepcopy(tiny_lm), [adapter])
    # Both rows of a CFG song run it (the engine grows the index to the batch's rows).
    assert torch.equal(_greedy(model, prompt, gen, lora="tt"), _greedy(merged, prompt, gen))
    assert rows.index.tolist() == [-1, -1]  # its rows freed when it ended


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_per_row_over_a_quantized_base_within_its_quantization_error(
    made: Made, tiny_lm: HeartMuLa, quant: str
) -> None:
    model, _, refs = _mixed(made, tiny_lm, quant)
    x = _rows_input()
    # Each wrapper adds its row's LoRA in float over the quantized module's own output.
    wrapper = model.get_submodule("backbone.layers.1.mlp.w2")
    h = torch.randn(3, 2, 160, generator=torch.Generator().manual_seed(8))
    adapters = [load_lora(made.tt, tiny_lm.config), load_lora(f"{made.st}:0.7", tiny_lm.config)]
    deltas = [a.delta("backbone.layers.1.mlp.w2") for a in adapters] + [torch.zeros(64, 160)]
    with torch.no_grad():
        want = torch.cat(
            [wrapper.base(h[i : i + 1]) + h[i : i + 1] @ d.T for i, d in enumerate(deltas)]
        )
        torch.testing.assert_close(wrapper(h), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        batch = _steps(model, x)
        alone = [_steps(ref, x[i : i + 1]) for i, ref in enumerate(refs)]
    for k in range(len(batch)):
        # Row 2 (no adapter) measures the base's own quantization error; the LoRA rows add
        # theirs in float over the same quantized weights, so they stay within a small multiple.
        base_error = _relative(batch[k][2:], alone[2][k])
        for i in (0, 1):
            error = _relative(batch[k][i : i + 1], alone[i][k])
            effect = _relative(alone[i][k], alone[2][k][:1].expand_as(alone[i][k]))
            assert error < 3 * base_error + 1e-4, (quant, k, i, error, base_error)
            assert effect > 3 * error  # the adapter's effect stands well above that error


@pytest.mark.parametrize("merged", [True, False])
def test_per_row_bytes_are_what_apply_adds(made: Made, tiny_lm: HeartMuLa, merged: bool) -> None:
    """Over the parts, and over the merged q/k/v and w1/w3 every pipeline loads (their B spans
    the whole merged output: more than the parts' sum)."""
    adapters = [load_lora(made.tt, tiny_lm.config), load_lora(made.st, tiny_lm.config)]
    model = copy.deepcopy(tiny_lm)
    if merged:
        merge_projections(model)
    before = sum(t.nbytes for t in model.state_dict().values())
    apply_lora_rows(model, adapters, rows=4, dtype=torch.bfloat16)
    after = sum(t.nbytes for t in model.state_dict().values())
    expected = lora_rows_bytes(adapters, tiny_lm.config, torch.bfloat16, merged=merged)
    assert after - before == expected
    parts = lora_rows_bytes(adapters, tiny_lm.config, torch.bfloat16, merged=False)
    assert (expected > parts) if merged else expected == parts


def test_per_row_frame_step_is_capture_safe(made: Made) -> None:
    """The static engine's frame step with per-row LoRAs holds nothing a CUDA graph cannot
    (test_capture_safety's guard, on the meta device)."""
    pytest.importorskip("triton")
    from test_capture_safety import _frame_step, capture_guard

    from heartmula_rt.config import LM_PRESETS, LMConfig

    with torch.device("meta"):
        lm = HeartMuLa(LMConfig.from_dict(LM_PRESETS["tiny"])).to(torch.bfloat16)
    # The adapter's tensors are real; apply_lora_rows moves them where each module is: meta.
    apply_lora_rows(quantize_model(lm, "int8"), [load_lora(made.tt, lm.config)], rows=2)
    step = _frame_step(lm, 1.5)
    with capture_guard():
        step()


def test_the_quant_cache_merges_before_quantizing_and_keys_on_the_adapters(
    made: Made, tiny_lm: HeartMuLa, tiny_ckpt: Path
) -> None:
    lm_dir, cpu = tiny_ckpt / LM_DIR, torch.device("cpu")
    adapter = load_lora(made.tt, tiny_lm.config)
    got = load_quantized_lm(lm_dir, "int8", device=cpu, dtype=torch.float32, lora=[adapter])
    # As a pipeline loads: merged LoRA, then q/k/v and w1/w3 merged, then quantized.
    want = quantize_model(merge_projections(merge_lora(copy.deepcopy(tiny_lm), [adapter])), "int8")
    for key, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], t), key
    cache_dir = Path(os.environ["HEARTMULA_RT_CACHE"])
    paths = {
        cache_path(lm_dir, "int8", torch.float32, cache_dir, lora)
        for lora in ([], [adapter], [adapter.with_scale(0.5)])
    }
    assert len(paths) == 3  # the base model and each adapter set: caches of their own
    path = cache_path(lm_dir, "int8", torch.float32, cache_dir, [adapter])
    mtime = path.stat().st_mtime_ns
    again = load_quantized_lm(lm_dir, "int8", device=cpu, dtype=torch.float32, lora=[adapter])
    assert path.stat().st_mtime_ns == mtime  # read back, not rebuilt
    assert torch.equal(again.state_dict()["projection.weight"], want.projection.weight)


# ---------------------------------------------------------------------------------------------
# Bad files: one sentence each, and nothing loaded.


def _refused(source, config, *fragments: str) -> str:
    with pytest.raises(UserError) as e:
        load_loras([source], config)
    message = str(e.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _edited(made: Made, tmp_path: Path, edit) -> Path:
    state = dict(made.tt_state)
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return path


def test_wrong_shapes_are_refused_naming_the_key(
    made: Made, tiny_lm: HeartMuLa, tmp_path: Path
) -> None:
    key = "base_model.model.backbone.layers.1.mlp.w2.lora_A.weight"

    def edit(state):
        state[key] = torch.zeros(4, 64)  # w2's input is 160 wide

    _refused(_edited(made, tmp_path, edit), tiny_lm.config, repr(key), "backbone.layers.1.mlp.w2")


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.backbone.layers.0.attn.qkv_proj.lora_A.weight",
        "base_model.model.backbone.layers.7.attn.q_proj.lora_A.weight",  # 2 layers here
        "base_model.model.text_embeddings.lora_embedding_A",
        "base_model.model.backbone.layers.0.attn.q_proj.weight",  # a full weight
    ],
)
def test_unknown_keys_are_refused_naming_the_key(
    made: Made, tiny_lm: HeartMuLa, tmp_path: Path, key: str
) -> None:
    def edit(state):
        state[key] = torch.zeros(4, 64)

    _refused(_edited(made, tmp_path, edit), tiny_lm.config, repr(key))


def test_a_rank_other_than_the_configs_is_refused(
    made: Made, tiny_lm: HeartMuLa, tmp_path: Path
) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        (made.tt / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((made.tt / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    _refused(folder, tiny_lm.config, "rank 4", "rank 8")


def test_a_pickle_with_code_is_refused_without_running_it(
    tiny_lm: HeartMuLa, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"backbone.layers.0.attn.q_proj.lora_A.weight": Payload()}, path)
    _refused(path, tiny_lm.config, "weights-only", "safetensors")
    assert not marker.exists()


def test_a_lora_of_another_model_size_is_refused(tiny_lm: HeartMuLa, tmp_path: Path) -> None:
    wider = _peft(SimpleTunerSkeleton(tiny_lm, embed_dim=128), 4, 4, SIMPLETUNER_TARGETS, 3)
    wider.save_pretrained(str(tmp_path / "wide"))
    _refused(tmp_path / "wide", tiny_lm.config, "another model size")


def test_an_ambiguous_orientation_is_refused(tiny_lm: HeartMuLa, tmp_path: Path) -> None:
    # Rank 64 on the 64×64 projection: A [64, 64] fits as [r, in] and as [in, r].
    path = tmp_path / "square.safetensors"
    save_file(
        {
            "projection.lora_A.weight": torch.ones(64, 64),
            "projection.lora_B.weight": torch.ones(64, 64),
        },
        str(path),
    )
    _refused(path, tiny_lm.config, "ambiguous")


def test_one_bad_file_refuses_the_whole_set(made: Made, tiny_lm: HeartMuLa, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_loras([made.tt, bad], tiny_lm.config)


# ---------------------------------------------------------------------------------------------
# Specs and fingerprints


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("a.safetensors", LoraSpec(Path("a.safetensors"), 1.0)),
        ("a.safetensors:0.5", LoraSpec(Path("a.safetensors"), 0.5)),
        ("dir/x:-1", LoraSpec(Path("dir/x"), -1.0)),
        ("C:\\loras\\x.safetensors", LoraSpec(Path("C:\\loras\\x.safetensors"), 1.0)),
        ("odd:name", LoraSpec(Path("odd:name"), 1.0)),
    ],
)
def test_lora_specs(text: str, spec: LoraSpec) -> None:
    assert parse_lora_spec(text) == spec


@pytest.mark.parametrize("text", ["a.safetensors:", "a.safetensors:nan", "a.safetensors:1e", ":2"])
def test_bad_lora_specs_are_one_sentence(text: str) -> None:
    with pytest.raises(UserError) as e:
        parse_lora_spec(text)
    assert "\n" not in str(e.value)


def test_the_fingerprint_is_the_contents(made: Made, tiny_lm: HeartMuLa, tmp_path: Path) -> None:
    copied = tmp_path / "copy.safetensors"
    copied.write_bytes(made.transposed.read_bytes())
    a = load_lora(made.transposed, tiny_lm.config)
    b = load_lora(f"{copied}:0.5", tiny_lm.config)
    assert a.fingerprint == b.fingerprint and a.key != b.key
    assert load_lora(made.pt, tiny_lm.config).fingerprint != a.fingerprint
