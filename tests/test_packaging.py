"""The library imports without the CLI's dependencies, and the wheel ships recipes, models and splits."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_imports_without_typer_or_rich() -> None:
    code = ("import sys, ssbctl.model, ssbctl.objective.losses, ssbctl.evaluation, ssbctl.retrieval.index; "
            "bad = [m for m in ('typer', 'rich') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_wheel_ships_configs_and_split_files(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("ssbctl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in ("shapes", "msrvtt", "msvd", "vatex", "activitynet", "didemo"):
        assert f"ssbctl/configs/recipes/{recipe}.toml" in names
    for model in ("ssb-minilm-pixels", "ssb-clip-b32", "ssb-t5-clip-b32"):
        assert f"ssbctl/configs/models/{model}.toml" in names and f"ssbctl/configs/models/{model}.md" in names
    assert "ssbctl/data/splits/msrvtt/MSRVTT_JSFUSION_test.csv" in names
    assert "ssbctl/data/splits/msvd/test_list.txt" in names
    assert {f"ssbctl/serve/static/{name}" for name in ("index.html", "app.js", "style.css")} <= names  # ssbctl serve


def _requirements() -> dict[str, str]:
    """{canonical distribution name: specifier} of every runtime and optional dependency."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    found = {}
    for line in lines:
        name = re.match(r"[A-Za-z0-9_.-]+", line).group(0)
        found[re.sub(r"[-_.]+", "-", name).lower()] = line[len(name):].split(";")[0]
    return found


def _imported_top_level_modules() -> set[str]:
    """Top-level modules that ``ssbctl`` imports anywhere (optional imports included)."""
    names: set[str] = set()
    for path in (ROOT / "ssbctl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"ssbctl", "__future__"}


def test_every_imported_package_is_declared_and_bounded() -> None:
    """What the code imports is a declared dependency (or extra); each has a lower and an upper bound."""
    declared = _requirements()
    providers = metadata.packages_distributions()
    for module in sorted(_imported_top_level_modules()):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [module])}
        assert dists & declared.keys(), f"ssbctl imports {module!r} but pyproject.toml declares none of {dists}"
    for name, spec in declared.items():
        assert ">=" in spec and "<" in spec.replace("<=", ""), f"{name}{spec}: give it a lower and an upper bound"


def test_public_api_is_listed_lazy_and_versioned() -> None:
    """``ssbctl.__all__`` names what ``dir(ssbctl)`` shows and what resolves; ``import ssbctl`` alone
    stays light (no torch); the version is the installed distribution's (one source)."""
    code = ("import sys, ssbctl; assert 'torch' not in sys.modules, 'import ssbctl loaded torch'; "
            "assert set(ssbctl.__all__) <= set(dir(ssbctl)), dir(ssbctl); "
            "[getattr(ssbctl, n) for n in ssbctl.__all__]; "
            "from ssbctl.inference.run import load_run; from ssbctl.retrieval.index import Index; "
            "assert ssbctl.load is load_run and ssbctl.Index is Index; print(ssbctl.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == metadata.version("ssbctl")
