"""The quantized-LM cache: reused when current, rebuilt with a notice when stale or damaged."""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path

import pytest
import torch
from heartmula_rt.quant import cache as qcache
from heartmula_rt.quant import quantize_model

from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.folder import LM_DIR
from heartmula_rt.model.lm import merge_projections


@pytest.fixture
def ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny LM folder (the shared fixture is read-only)."""
    return Path(shutil.copytree(tiny_ckpt / LM_DIR, tmp_path / "lm"))


def _load(ckpt: Path, cache: Path, mode: str = "int8"):
    return qcache.load_quantized_lm(
        ckpt, mode, device=torch.device("cpu"), dtype=torch.float32, cache_dir=cache
    )


def _quantized_from_scratch(ckpt: Path, mode: str = "int8"):
    # as the quantized load makes it: q/k/v and w1/w3 merged, then quantized
    return quantize_model(merge_projections(load_lm(ckpt)[0]), mode)


def _assert_same(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_first_load_writes_the_cache_and_the_next_reuses_it(
    ckpt: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    cache = tmp_path / "cache"
    first = _load(ckpt, cache)
    (path,) = cache.glob("*.safetensors")
    assert "int8-float32" in path.name
    _assert_same(first, _quantized_from_scratch(ckpt))

    def no_requantizing(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded again")

    monkeypatch.setattr(qcache, "quantize_checkpoint", no_requantizing)
    with caplog.at_level(logging.WARNING):
        again = _load(ckpt, cache)
    assert not caplog.records
    _assert_same(again, first)
    assert not list(cache.glob(".*.tmp"))  # written atomically


def _float_storages() -> set[int]:
    """The storages of the live float32 tensors with two or more dims: unquantized weights in
    the LM dtype of these tests, not norms, not the 4-bit formats' bfloat16 block scales, and
    not the meta model's placeholders, which hold no memory."""
    gc.collect()
    return {
        o.untyped_storage().data_ptr()
        for o in gc.get_objects()
        if type(o) in (torch.Tensor, torch.nn.Parameter)
        and o.dtype == torch.float32
        and o.dim() >= 2
        and not o.is_meta
    }


@pytest.mark.parametrize("mode", ["int8", "nf4", "int4"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(
    ckpt: Path, mode: str, monkeypatch
) -> None:
    """Tensor by tensor: whenever a weight is quantized, no earlier unquantized one is alive."""
    expected = _quantized_from_scratch(ckpt, mode)
    cls = qcache.FORMATS[mode]
    original = cls.from_weight.__func__
    before = _float_storages()
    calls = []

    def from_weight(klass, weight, *args, **kwargs):
        calls.append(len(_float_storages() - before))
        return original(klass, weight, *args, **kwargs)

    monkeypatch.setattr(cls, "from_weight", classmethod(from_weight))
    model = qcache.quantize_checkpoint(ckpt, mode, device=torch.device("cpu"), dtype=torch.float32)
    # Alive at each call: this weight and the two embeddings once they are loaded, so the count
    # moves by at most 2; loading everything before quantizing would start about 37 higher.
    # (25 calls: each layer's q/k/v and w1/w3 are quantized as one merged weight each.)
    assert len(calls) > 20 and max(calls) - min(calls) <= 2, str(calls)
    _assert_same(model, expected)


def test_modes_have_their_own_files(ckpt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _load(ckpt, cache, "int8")
    _load(ckpt, cache, "int4")
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_a_changed_checkpoint_makes_the_cache_stale(ckpt: Path, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    _load(ckpt, cache)
    config = ckpt / "config.json"
    config.write_text(config.read_text().replace("{", '{"note": "edited", ', 1))
    with caplog.at_level(logging.WARNING):
        model = _load(ckpt, cache)
    (record,) = caplog.records
    assert "is stale; rebuilding it" in record.getMessage()
    _assert_same(model, _quantized_from_scratch(ckpt))
    caplog.clear()
    _load(ckpt, cache)  # rebuilt: current again
    assert not caplog.records


def test_a_new_runtime_version_makes_the_cache_stale(
    ckpt: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    cache = tmp_path / "cache"
    _load(ckpt, cache)
    monkeypatch.setattr(qcache, "CACHE_FORMAT", qcache.CACHE_FORMAT + 1)
    with caplog.at_level(logging.WARNING):
        _load(ckpt, cache)
    assert "stale" in caplog.records[0].getMessage()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop-a-tensor"])
def test_a_damaged_cache_is_rebuilt(ckpt: Path, tmp_path: Path, caplog, damage: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    _load(ckpt, cache)
    (path,) = cache.glob("*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:  # a well-formed file with the right key but a tensor missing
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        state = load_file(str(path))
        state.pop(next(iter(state)))
        save_file(state, str(path), metadata=metadata)
    with caplog.at_level(logging.WARNING):
        model = _load(ckpt, cache)
    assert "is damaged" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
    _assert_same(model, _quantized_from_scratch(ckpt))
    caplog.clear()
    _load(ckpt, cache)
    assert not caplog.records  # the rebuilt file is good


def test_an_unwritable_cache_folder_costs_only_a_notice(ckpt: Path, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        model = _load(ckpt, blocker / "cache")  # a folder cannot be made under a file
    assert "could not write the quantized cache" in caplog.records[0].getMessage()
    _assert_same(model, _quantized_from_scratch(ckpt))
