"""Ahead-of-time compiles of our Triton kernels for real GPU targets, without a GPU.

Triton's compiler needs no GPU or driver: given a target (`GPUTarget("cuda", 90, 32)`) it lowers a
kernel to PTX and assembles it with the ptxas in Triton's wheel. This is how CI proves that every
kernel of `kernels/` compiles for the GPUs our users have (the interpreter the CPU tests run
under accepts code a real compile refuses), and how benchmarks/README.md's table of registers
and spills is made:

    python -m heartmula_rt.kernels.aot [MODULE ...]   # a markdown table of registers and spills
    python -m heartmula_rt.kernels.aot --json   # one JSON object per compile (the CI test),
                                                # then the table on stderr

Run it without TRITON_INTERPRET set. Another Triton compiles them when it comes first on the path
(`PYTHONPATH=.triton-3.6 python -m heartmula_rt.kernels.aot`: the GPU machines' Triton 3.6.0,
which .ci/run installs there); each record says which compiled it. Each kernel module lists its
launches (`aot_launches()`: description, jitted function, arguments with `MockTensor` stand-ins,
meta-parameters) through the same function its op launches with, so what is compiled here is
what runs; the arguments are specialised as the runtime would (alignment, integers equal to 1 or
divisible by 16), and an autotuned kernel is compiled in every config it may pick.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Compute capability → the GPUs our users have of it.
TARGETS = {80: "A100, A30", 86: "RTX 30xx, A10, A40", 89: "RTX 40xx, L4, L40", 90: "H100, H200"}


@dataclass(frozen=True)
class Compiled:
    """One kernel compiled for one target, and the launches that compile serves."""

    kernel: str
    meta: str  # the meta-parameters: what a table row groups by
    triton: str  # the version that compiled it
    launches: tuple[str, ...]
    capability: int
    seconds: float
    registers: int
    local_bytes: int  # local memory per thread: register spills (0 is what we want)
    shared_bytes: int
    code_bytes: int  # the cubin's size: grows with the code a thread runs, unrolled
    ptx_arch: str


def kernel_modules() -> list[str]:
    """The modules of `kernels/` (this one aside)."""
    package = importlib.import_module("heartmula_rt.kernels")
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "aot")


def launches(modules: tuple[str, ...] = ()) -> list[tuple[str, object, tuple, dict]]:
    """Every (description, jitted function, args, meta) of `kernels/` (or of `modules`); an
    autotuned kernel is listed once per config, its meta-parameters merged into the launch's."""
    out = []
    for name in modules or kernel_modules():
        module = importlib.import_module(f"heartmula_rt.kernels.{name}")
        for what, kernel, args, meta in module.aot_launches():
            configs = getattr(kernel, "configs", None)
            if configs is None:
                out.append((f"{name}: {what}", kernel, args, meta))
                continue
            for c in configs:  # an Autotuner: every config it may pick
                tuned = {**meta, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                params = ", ".join(f"{k}={v}" for k, v in c.kwargs.items())
                config = f"config {params}, num_warps={c.num_warps}"
                out.append((f"{name}: {what}, {config}", kernel.fn, args, tuned))
    return out


def _prepare(kernel, args: tuple, meta: dict, capability: int):
    """(source, target, options) of compiling `kernel` for an NVIDIA GPU of `capability` as a
    launch with `args` and `meta` would be compiled."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, meta, bound, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local-memory bytes, shared bytes) per thread / block of a compiled kernel, read
    from its cubin (assembled by the ptxas in Triton's wheel) by the wheel's cuobjdump. Local
    memory is where ptxas spills registers (and puts arrays indexed at run time): nonzero means
    slow LDL/STL traffic."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True
        )
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", done.stdout))
    local = int(usage.get("LOCAL", 0)) + int(usage.get("STACK", 0))
    return int(usage["REG"]), local, int(usage.get("SHARED", 0))


def _compile(task: tuple[tuple[str, ...], int, int, tuple[str, ...]]) -> Compiled:
    """Compile launch number `index` of `launches(modules)` for one target (a worker's unit)."""
    import triton

    modules, index, cc, served = task
    _, kernel, args, meta = launches(modules)[index]
    source, target, options = _prepare(kernel, args, meta, cc)
    start = time.perf_counter()
    compiled = triton.compile(source, target=target, options=options)
    seconds = time.perf_counter() - start
    cubin = compiled.asm["cubin"]
    registers, local, shared = resources(cubin)
    arch = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.MULTILINE)[1]
    params = ", ".join(f"{k}={v}" for k, v in meta.items())
    return Compiled(
        kernel.fn.__name__, params, triton.__version__, served, cc, seconds, registers, local,
        shared, len(cubin), arch,
    )  # fmt: skip


def compile_all(
    modules: tuple[str, ...] = (),
    capabilities: tuple[int, ...] = tuple(TARGETS),
    workers: int | None = None,
) -> Iterator[Compiled]:
    """Compile every distinct launch of `kernels/` (or of `modules`) for every target, with its
    resource report, on `workers` processes (default: one per core). Launches that specialise
    the same way compile once. Yields the results as they finish."""
    served: dict[tuple, list[str]] = {}  # compile key → the launches it serves
    first: dict[tuple, tuple[int, int]] = {}
    for index, (what, kernel, args, meta) in enumerate(launches(modules)):
        for cc in capabilities:
            source, _, options = _prepare(kernel, args, meta, cc)
            key = (source.hash(), cc, repr(sorted(options.items())))
            first.setdefault(key, (index, cc))
            served.setdefault(key, []).append(what)
    tasks = [(modules, *first[key], tuple(served[key])) for key in first]
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=context) as pool:
        yield from pool.map(_compile, tasks)


def markdown(results: list[Compiled]) -> str:
    """One row per kernel and meta-parameters: registers per target, worst spills, shared memory
    and compile time over the shapes compiled."""
    caps = sorted({r.capability for r in results})
    rows: dict[tuple[str, str], list[Compiled]] = defaultdict(list)
    for r in results:
        rows[r.kernel, r.meta].append(r)
    head = ["kernel", "meta-parameters", *(f"regs sm_{c}" for c in caps)]
    head += ["local (spills) B", "smem B", "compile s (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, meta), group in rows.items():
        regs = []
        for cc in caps:
            values = [r.registers for r in group if r.capability == cc]
            low, high = min(values, default=None), max(values, default=None)
            regs.append("-" if low is None else str(low) if low == high else f"{low}–{high}")
        lines.append(
            f"| `{kernel}` | {meta} | "
            + " | ".join(regs)
            + f" | {max(r.local_bytes for r in group)} | {max(r.shared_bytes for r in group)}"
            + f" | {max(r.seconds for r in group):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    modules = tuple(a for a in sys.argv[1:] if not a.startswith("--"))
    results = []
    for c in compile_all(modules):
        results.append(c)
        if "--json" in sys.argv[1:]:
            print(json.dumps(asdict(c)), flush=True)
    print(markdown(results), file=sys.stderr if "--json" in sys.argv[1:] else sys.stdout)


if __name__ == "__main__":
    main()
