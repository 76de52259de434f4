"""Every Triton kernel of kernels/ compiles ahead of time for real GPU targets (sm_80, 86, 89,
90) with Triton's own compiler, no GPU needed: the CPU tests run the kernels under Triton's
interpreter, which accepts code a real compile refuses (a plain Python global read inside a
kernel, say). Each compile must finish in bounded time and spill no registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="needs triton's compiler")

COMPILE_S = 60  # per kernel; a whole-vocabulary tile once took over 15 minutes
TOTAL_S = 900


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    # A fresh process without TRITON_INTERPRET (conftest sets it): there @triton.jit makes
    # compilable kernels, not interpreted functions.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, said aloud: no warning per worker
    done = subprocess.run(
        [sys.executable, "-m", "heartmula_rt.kernels.aot", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TOTAL_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def _launches() -> list[str]:
    """The launch descriptions of kernels/, listed in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from heartmula_rt.kernels import aot; "
    code += "print(json.dumps([w for w, *_ in aot.launches()]))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_launch_compiles_for_every_target(compiled: list[dict]) -> None:
    served = {(w, c["capability"]) for c in compiled for w in c["launches"]}
    wanted = {(w, cc) for w in _launches() for cc in (80, 86, 89, 90)}
    assert wanted <= served
    # The sampler in both of its chunkings (guidance and rows are values, not variants).
    chunks = {c["meta"] for c in compiled if c["kernel"] == "_fused_sample_kernel"}
    assert any("ONE_CHUNK=True" in m for m in chunks) and any(
        "ONE_CHUNK=False" in m for m in chunks
    )


def test_compiles_are_bounded_and_spill_nothing(compiled: list[dict]) -> None:
    slow = [(c["launches"][0], c["capability"], c["seconds"]) for c in compiled]
    assert max(s for *_, s in slow) < COMPILE_S, max(slow, key=lambda x: x[2])
    spilling = [(c["launches"][0], c["capability"]) for c in compiled if c["local_bytes"]]
    assert not spilling
    print(f"{len(compiled)} compiles, longest {max(s for *_, s in slow):.1f} s")


def test_every_kernel_module_lists_its_launches() -> None:
    """A module of kernels/ with a jitted function must say how it is launched, or it would
    never be compiled here."""
    from pathlib import Path

    import heartmula_rt.kernels as kernels

    for path in Path(kernels.__file__).parent.glob("*.py"):
        text = path.read_text()
        if "@triton.jit" in text:
            assert "def aot_launches(" in text, f"{path.name} has kernels but no aot_launches()"
