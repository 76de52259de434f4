"""The package's layers (docs/architecture.md), read from the code's own imports.

config/request/errors and kernels → model → quant, memory → runtime → serve, bench → cli: a module
imports only its own layer or those below; nothing imports a front end but the CLI that
dispatches to it; no cycles between modules; the planner, the CLI's start and
`import heartmula_rt` load no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's source lives in the repository (setup.py's package_dir).
SOURCES = {"heartmula_rt": REPO / "heartmula_rt", "heartmula_rt.kernels": REPO / "kernels",
           "heartmula_rt.quant": REPO / "quant"}
# Layer of each part of the package: a module may import from its own layer and those below.
LAYERS = {
    "heartmula_rt": 0,  # __init__ (lazy), config, request, errors
    "heartmula_rt.kernels": 0,
    "heartmula_rt.model": 1,
    "heartmula_rt.quant": 2,
    "heartmula_rt.memory": 2,
    "heartmula_rt.runtime": 3,
    "heartmula_rt.serve": 4,
    "heartmula_rt.bench": 4,
    "heartmula_rt.cli": 5,
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "heartmula_rt" and parts[:1] in (["kernels"], ["quant"]):
                continue
            found[name] = path
    return found


def layer_of(module: str) -> tuple[str, int]:
    part = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return part, LAYERS[part]


def type_only(tree: ast.Module) -> set[ast.AST]:
    """The imports under `if TYPE_CHECKING:`: for annotations, never run."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If)
              and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"]
    return {node for block in blocks for part in block.body for node in ast.walk(part)}


def imports(name: str, path: Path, known: set[str], *, run_time: bool = False) -> set[str]:
    """The package's modules that `name` imports (function-local imports included; with
    `run_time`, not those only type checkers read)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    skipped = type_only(tree) if run_time else set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph(*, run_time: bool = False) -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known, run_time=run_time) for name, path in found.items()}


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for name, targets in graph().items():
        part, rank = layer_of(name)
        for target in targets:
            other, other_rank = layer_of(target)
            if other_rank > rank or (other_rank == rank and other != part and rank >= 4):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_the_module_graph_has_no_cycle():
    """At run time: a façade's method may hand its own object to a module that names the
    façade's type for type checkers only (pipeline.py → edit.py)."""
    edges = graph(run_time=True)
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(edges[name]):
            # A package's __init__ importing its own submodules is how packages export names.
            if not target.startswith(name + "."):
                visit(target, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The walk reads relative imports too: a model module importing the runtime is caught."""
    fake = tmp_path / "lm.py"
    fake.write_text("from ..runtime import engine\nfrom ..config import LMConfig\n")
    known = {"heartmula_rt.runtime.engine", "heartmula_rt.runtime", "heartmula_rt.config"}
    found = imports("heartmula_rt.model.lm", fake, known)
    assert found == {"heartmula_rt.runtime", "heartmula_rt.runtime.engine", "heartmula_rt.config"}
    assert layer_of("heartmula_rt.runtime.engine")[1] > layer_of("heartmula_rt.model.lm")[1]


def test_planning_and_the_cli_start_load_no_torch():
    code = (
        "import sys, heartmula_rt, heartmula_rt.cli, heartmula_rt.memory.planner,"
        " heartmula_rt.memory.footprint, heartmula_rt.request, heartmula_rt.config;"
        " print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
