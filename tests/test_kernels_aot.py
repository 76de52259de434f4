"""Every Triton kernel of kernels/ compiles ahead of time for real GPU targets (sm_80, 86, 89,
90) with Triton's own compiler, no GPU needed: the CPU tests run the kernels under Triton's
interpreter, which accepts code a real compile refuses (a plain Python global read inside a
kernel, say). Each compile must stay small and spill no registers, under the Triton this venv
installs and under Triton 3.6.0, the one the GPU machines' torch (2.11) pins: a kernel that
compiles with one may not with the other."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="needs triton's compiler")

# .ci/run installs Triton 3.6.0 here (pip install --target), beside the venv.
TRITON_36 = Path(__file__).resolve().parents[1] / ".triton-3.6"
# A kernel's machine code grows with the elements each thread holds, fully unrolled, and its
# compile time with it: a whole-vocabulary tile once took over 15 minutes. Bounding the cubin's
# size catches that whatever the machine's load, where a time limit failed on a busy machine.
# The largest today is about 330 KB; the sampler as one 8197-entry tile makes 1.5 MB.
CODE_BYTES = 1024 * 1024
# Only a hung compile reaches this: the whole AOT takes 4-6 minutes of CPU time per Triton.
TOTAL_S = 3600


def _env(triton_path: Path | None = None) -> dict[str, str]:
    """This environment without TRITON_INTERPRET (conftest sets it; without it @triton.jit makes
    compilable kernels, not interpreted functions), `triton_path` first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, said aloud: no warning per worker
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton_path), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module", params=["venv", "3.6.0"], ids=lambda p: f"triton-{p}")
def compiled(request: pytest.FixtureRequest) -> list[dict]:
    """Every compile's record (`aot.Compiled`), by the venv's Triton or by Triton 3.6.0."""
    if request.param == "venv":
        path, version = None, triton.__version__
    else:
        path, version = TRITON_36, request.param
        if not (path / "triton").is_dir():
            why = f"Triton 3.6.0 is not in {path}: pip install --target {path} triton==3.6.0"
            if os.environ.get("CI") == "true":
                pytest.fail(why)  # CI must compile with the GPU machines' Triton
            pytest.skip(why)
    done = subprocess.run(
        [sys.executable, "-m", "heartmula_rt.kernels.aot", "--json"],
        env=_env(path),
        capture_output=True,
        text=True,
        timeout=TOTAL_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert records and {r["triton"] for r in records} == {version}
    return records


@functools.cache
def _launches() -> list[str]:
    """The launch descriptions of kernels/, listed in a process without the interpreter."""
    code = "import json; from heartmula_rt.kernels import aot; "
    code += "print(json.dumps([w for w, *_ in aot.launches()]))"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_launch_compiles_for_every_target(compiled: list[dict]) -> None:
    served = {(w, c["capability"]) for c in compiled for w in c["launches"]}
    wanted = {(w, cc) for w in _launches() for cc in (80, 86, 89, 90)}
    assert wanted <= served


def test_compiles_are_bounded_and_spill_nothing(compiled: list[dict]) -> None:
    largest = max(compiled, key=lambda c: c["code_bytes"])
    assert largest["code_bytes"] < CODE_BYTES, largest
    spilling = [(c["launches"][0], c["capability"]) for c in compiled if c["local_bytes"]]
    assert not spilling
    longest = max(c["seconds"] for c in compiled)
    print(f"{len(compiled)} compiles, largest {largest['code_bytes']} B, longest {longest:.1f} s")


def test_every_kernel_module_lists_its_launches() -> None:
    """A module of kernels/ with a jitted function must say how it is launched, or it would
    never be compiled here."""
    import heartmula_rt.kernels as kernels

    for path in Path(kernels.__file__).parent.glob("*.py"):
        text = path.read_text()
        if "@triton.jit" in text:
            assert "def aot_launches(" in text, f"{path.name} has kernels but no aot_launches()"
