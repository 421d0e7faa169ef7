"""The package has one direction of imports: the import-linter layers contract in pyproject.toml
holds (lazy and TYPE_CHECKING imports included), it lists no exceptions, and no module imports
itself back through others (no cycles)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> list[str]:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "importlinter.cli"]


def test_layers_contract_holds() -> None:
    proc = subprocess.run([*_lint_imports(), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_layers_contract_lists_no_exceptions() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    assert contract["type"] == "layers" and contract.get("exhaustive") is True
    assert not contract.get("ignore_imports") and not contract.get("unmatched_ignore_imports_alerting")


def test_layers_are_in_the_issues_order() -> None:
    """Bottom-up: core, config, data, model, objective, engine, inference, then evaluation and
    retrieval side by side (neither imports the other), and the faces over them. The model is plain
    modules (the objective turns their outputs into losses), and the trainer takes its per-epoch
    validation as an argument instead of importing the evaluation layer."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    bottom_up = [[name.strip() for name in layer.split("|")] for layer in reversed(contract["layers"])]
    assert bottom_up[:8] == [["core"], ["config"], ["data"], ["model"], ["objective"], ["engine"], ["inference"],
                             ["evaluation", "retrieval"]]
    assert bottom_up[-1] == ["cli"]


def _cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in imports[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1 or module in imports[module]:
                found.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("ssbctl", cache_dir=None)
    imports = {m: set(graph.find_modules_directly_imported_by(m)) & graph.modules for m in graph.modules}
    assert _cycles(imports) == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a two-module loop and a self-import are both reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"c"}, "d": set()}) == [["a", "b"], ["c"]]
