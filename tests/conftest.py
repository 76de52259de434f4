"""Shared test fixtures. The read-only `shared/` folder sits beside the repository checkout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from heartmula_rt.config import GenConfig
from heartmula_rt.model.checkpoint import load_lm
from heartmula_rt.model.folder import LM_DIR, load_gen_config
from heartmula_rt.model.lm import HeartMuLa

# Without a GPU, Triton kernels run on the CPU through Triton's interpreter; it must be chosen
# before any kernel is defined, so before heartmula_rt.kernels is first imported (lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared beside the checkout; HEARTMULA_RT_SHARED points elsewhere (a copy carried to a GPU
# machine, where only the checkout travels).
SHARED = Path(
    os.environ.get("HEARTMULA_RT_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `gpu` (pytest.ini) skip where no CUDA GPU is."""
    if torch.cuda.is_available():
        return
    needs_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(needs_gpu)


@pytest.fixture(scope="session", autouse=True)
def cache_dirs(tmp_path_factory: pytest.TempPathFactory):
    """Quantized-model caches go to a temporary folder, fresh for the session, never the
    user's cache."""
    saved = {}
    for variable, name in (("HEARTMULA_RT_CACHE", "quant-cache"),):
        saved[variable] = os.environ.get(variable)
        os.environ[variable] = str(tmp_path_factory.mktemp(name))
    yield
    for variable, old in saved.items():
        if old is None:
            del os.environ[variable]
        else:
            os.environ[variable] = old


def child_processes(parent: int) -> list[tuple[int, str]]:
    """(pid, command line) of `parent`'s living child processes, from /proc (zombies, already
    ended, are not counted; nor torch's compile workers, a pool torch keeps for the process's
    life)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue  # it ended meanwhile
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z" and "compile_worker" not in command:
            children.append((int(stat.parent.name), command.strip()))
    return children


@pytest.fixture(scope="session", autouse=True)
def no_process_left():
    """At the session's end, after every fixture that starts a server or a browser has stopped
    it: no child process of the tests is left running (each is killed, and the session fails
    naming them)."""
    yield
    left = child_processes(os.getpid())
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signal.SIGKILL)
    assert not left, f"the tests left processes running: {left}"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """shared/fixtures: tiny-public/ (checkpoint + reference outputs) and keys/."""
    path = SHARED / "fixtures"
    assert path.is_dir(), f"{path} is missing: clone the project with shared/ beside it"
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(fixtures_dir: Path) -> Path:
    """The tiny-public checkpoint folder (read-only)."""
    return fixtures_dir / "tiny-public" / "ckpt"


@pytest.fixture(scope="session")
def tiny_lm(tiny_ckpt: Path) -> HeartMuLa:
    """The tiny-public LM in float32 on the CPU, loaded once."""
    return load_lm(tiny_ckpt / LM_DIR)[0]


@pytest.fixture
def streams_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the heartmula_rt module that makes each new torch.cuda.Stream (torch's own
    streams, and the objects `current_stream()` wraps, are not counted)."""
    made: list[str] = []

    class Counted(torch.cuda.Stream):
        def __new__(cls, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("heartmula_rt"):
                made.append(caller)
            return super().__new__(cls, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Stream", Counted)
    return made


@pytest.fixture(scope="module")
def lm(tiny_ckpt: Path) -> HeartMuLa:
    """The tiny-public LM in float32 on the CPU, loaded afresh for each module that asks (the
    batching tests' engines run on it)."""
    return load_lm(tiny_ckpt / LM_DIR)[0]


@pytest.fixture
def client(server):
    """An HTTP client of the module's `server` (a tests/serving.py `ServerProcess`)."""
    import httpx
    from serving import WAIT_S

    with httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
        yield c


@pytest.fixture(scope="session")
def gen(tiny_ckpt: Path) -> GenConfig:
    """The tiny-public checkpoint's gen_config.json."""
    return load_gen_config(tiny_ckpt)


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt: Path) -> Tokenizer:
    """The tiny-public tokenizer (its post-processor adds BOS)."""
    return Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))


@pytest.fixture(scope="session")
def overwrite_tensor_data() -> Callable[[Path, str, bytes], None]:
    """`overwrite(path, key, data)` writes `data` over the start of tensor `key`'s bytes in a
    safetensors file, in place, as a bad disk or download would: the header stays valid."""

    def overwrite(path: Path, key: str, data: bytes) -> None:
        with path.open("r+b") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))  # little-endian u64, then JSON
            start, end = json.loads(f.read(header_len))[key]["data_offsets"]
            assert len(data) <= end - start, f"{key} holds only {end - start} bytes"
            f.seek(8 + header_len + start)
            f.write(data)

    return overwrite
