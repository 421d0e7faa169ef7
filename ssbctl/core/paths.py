"""Where ssbctl keeps things: the home folder, shipped configs, prepared data by name."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ssbctl.core.errors import UserError

CONFIG_KINDS = ("recipes", "models")


def home() -> Path:
    """ssbctl's home (``$SSBCTL_HOME``, else ``~/.cache/ssbctl``): prepared data, demo, default index."""
    return Path(os.environ.get("SSBCTL_HOME") or Path.home() / ".cache" / "ssbctl").expanduser()


def default_index() -> Path:
    """The index that ``ssbctl retrieve`` searches when none is named (the demo writes it)."""
    return home() / "index"


RUN_INDEX_POINTER = "latest-run-index.txt"


def run_index_pointer() -> Path:
    """The file naming the index of the run trained last (``ssbctl train`` indexes its test videos)."""
    return home() / RUN_INDEX_POINTER


def search_index() -> Path:
    """The index ``retrieve`` searches when none is named: the newer (by its ``index.json``) of the
    default index and the index of the run trained last, so a search right after training searches
    that run's test videos, and one after ``ssbctl index``/``ssbctl demo`` the index just built."""
    candidates = [default_index()]
    pointer = run_index_pointer()
    try:
        candidates.append(Path(pointer.read_text(encoding="utf-8").strip()))
    except (OSError, UnicodeDecodeError):  # no run trained yet (or an unreadable pointer: ignored)
        pass
    built = [c for c in candidates if (c / "index.json").is_file()]
    return max(built, key=lambda c: (c / "index.json").stat().st_mtime_ns) if built else default_index()


def shipped_configs(kind: str) -> dict[str, Path]:
    """Every config of ``kind`` that ships inside the package, by bare name."""
    folder = resources.files("ssbctl") / "configs" / kind
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def find_config(kind: str, name: str) -> Path:
    """A recipe or model config by path, or by bare name among the shipped ones."""
    assert kind in CONFIG_KINDS
    path = Path(name).expanduser()
    if path.suffix == ".toml" or os.sep in name:
        if path.is_file():
            return path
        # `recipes/msvd.toml` typed outside a checkout still finds the copy in the wheel.
        shipped = shipped_configs(kind).get(path.stem)
        if shipped is not None and path.parent.name == kind:
            return shipped
        raise UserError(f"{kind[:-1]} file not found: {name}")
    known = shipped_configs(kind)
    if name in known:
        return known[name]
    raise UserError(f"unknown {kind[:-1]} '{name}'; known: {', '.join(sorted(known))}")


def resolve_prepared(name: str) -> Path:
    """A prepared-data folder given as a path or as a name under ``$SSBCTL_HOME/data``."""
    path = Path(name).expanduser()
    for candidate in (path, home() / "data" / name):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise UserError(f"no prepared data at '{name}' (looked in {path} and {home() / 'data' / name}); "
                    f"run `ssbctl prepare` first")

