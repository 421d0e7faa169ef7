"""The library imports without the CLI's dependencies, and the wheel ships recipes, models and splits."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_imports_without_typer_or_rich() -> None:
    code = ("import sys, ssbctl.model, ssbctl.losses, ssbctl.evaluation, ssbctl.retrieval.index; "
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
