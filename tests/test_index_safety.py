"""`ssbctl index` never drops videos silently: indexing a folder into an existing index adds to it,
replacing an index another checkpoint embedded needs --replace, and the human output always says
what was removed. A run records what its video features were made from, and `index` warns when the
videos differ from it in an obvious way (issue 12, "Data safety and honesty")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssbctl.cli.app import main
from ssbctl.config import load_recipe
from ssbctl.data.datasets.shapes import write_mp4
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.retrieval.index import Index
from ssbctl.training import train

from conftest import tiny_overrides


@pytest.fixture(scope="module")
def run_dir(shapes_store: Path, tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes run (pixels backbone, 32x32 clips) with two checkpoints."""
    root = tmp_path_factory.mktemp("safety")
    train(load_recipe("shapes", tiny_overrides(shapes_store, tiny_text_model, root / "run")), root / "run")
    assert len(list((root / "run" / "checkpoints").glob("step-*"))) == 2
    return root / "run"


def _folder(shapes_raw: Path, target: Path, names: list[str]) -> Path:
    """A folder of the user's own: copies of some generated clips."""
    target.mkdir(parents=True)
    for name in names:
        shutil.copyfile(shapes_raw / "videos" / name, target / name)
    return target


def _clips(shapes_raw: Path) -> list[str]:
    return sorted(p.name for p in (shapes_raw / "videos").glob("*.mp4"))


def test_a_run_records_what_its_features_were_made_from(run_dir: Path) -> None:
    experts = json.loads((run_dir / "experts.json").read_text())
    assert experts[0]["backbone"]["name"] == "pixels" and experts[0]["dataset"] == "shapes"
    assert experts[0]["frame_size"] == [32, 32] and experts[0]["prepared"] == "shapes"


def test_indexing_folders_into_the_default_index_adds(run_dir: Path, shapes_raw: Path, tmp_path: Path,
                                                      capsys) -> None:
    default = Path(os.environ["SSBCTL_HOME"]) / "index"
    assert main(["index", str(run_dir)]) == 0  # the run's prepared data: every split
    full = len(Index.load(default).videos)
    assert full == 24
    clips = _clips(shapes_raw)
    first = _folder(shapes_raw, tmp_path / "first", clips[:2])
    second = _folder(shapes_raw, tmp_path / "second", clips[2:5])
    capsys.readouterr()

    assert main(["index", str(run_dir), "--videos", str(first)]) == 0
    assert "removed 0" in capsys.readouterr().out
    assert main(["index", str(run_dir), "--videos", str(second)]) == 0
    said = capsys.readouterr().out
    assert "kept 26 indexed earlier" in said and "removed 0" in said
    index = Index.load(default)
    assert len(index.videos) == full + 5
    assert {str(p.resolve()) for p in [*first.iterdir(), *second.iterdir()]} <= {v["path"] for v in index.videos}

    gone = sorted(second.iterdir())[0]
    gone.unlink()
    assert main(["index", str(run_dir), "--videos", str(second)]) == 0
    said = capsys.readouterr().out
    assert "removed 1" in said and f"removed {gone.resolve()}" in said
    assert len(Index.load(default).videos) == full + 4

    assert main(["index", str(run_dir), "--split", "test"]) == 0  # a part of what it holds: nothing is lost
    assert len(Index.load(default).videos) == full + 4 and "removed 0" in capsys.readouterr().out


def test_an_index_of_another_checkpoint_is_replaced_only_with_replace(run_dir: Path, shapes_raw: Path,
                                                                      tmp_path: Path, capsys) -> None:
    older = sorted((run_dir / "checkpoints").glob("step-*"))[0].name
    assert older != latest_checkpoint(run_dir).name
    clips = _clips(shapes_raw)
    first = _folder(shapes_raw, tmp_path / "first", clips[:2])
    second = _folder(shapes_raw, tmp_path / "second", clips[2:4])
    target = tmp_path / "mine"
    assert main(["index", str(run_dir), "--videos", str(first), "--out", str(target), "--checkpoint", older]) == 0
    before = (target / "embeddings.safetensors").read_bytes()
    capsys.readouterr()

    assert main(["index", str(run_dir), "--videos", str(second), "--out", str(target)]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("index videos")]
    assert len(said) == 1 and said[0].startswith("error: ") and "--replace" in said[0], said
    assert (target / "embeddings.safetensors").read_bytes() == before  # untouched

    assert main(["index", str(run_dir), "--videos", str(second), "--out", str(target), "--replace"]) == 0
    said = capsys.readouterr().out
    assert "removed 2" in said and all(f"removed {p.resolve()}" in said for p in first.iterdir())
    assert {v["path"] for v in Index.load(target).videos} == {str(p.resolve()) for p in second.iterdir()}


def test_index_warns_on_footage_unlike_the_runs(run_dir: Path, shapes_raw: Path, tmp_path: Path, capsys) -> None:
    footage = tmp_path / "holiday"
    rng = np.random.default_rng(0)
    footage.mkdir()
    for i in range(2):  # "real footage": 320x240 frames, ten times the run's 32x32 clips
        write_mp4(footage / f"beach{i}.mp4", rng.integers(0, 255, (8, 240, 320, 3), dtype=np.uint8), 8)
    assert main(["index", str(run_dir), "--videos", str(footage), "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().err.replace("\n", " ")
    assert "warning:" in said and "8x8 pixels of shapes clips" in said and "320x240" in said
    assert "ssbctl train --recipe msvd" in said

    alike = _folder(shapes_raw, tmp_path / "alike", _clips(shapes_raw)[:2])
    assert main(["index", str(run_dir), "--videos", str(alike), "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_demo_never_replaces_an_index_of_other_videos(run_dir: Path, shapes_raw: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`ssbctl demo` rewrites the default index: one that holds a user's own videos (another run's,
    or added to an earlier demo's) is refused before any work, and left as it was."""
    home = tmp_path / "home"
    default = home / "index"
    mine = _folder(shapes_raw, tmp_path / "mine", _clips(shapes_raw)[:2])
    monkeypatch.setenv("SSBCTL_HOME", str(home))
    assert main(["index", str(run_dir), "--videos", str(mine)]) == 0
    before = {p.name: p.read_bytes() for p in default.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["demo", "--num-videos", "12"]) == 2
    said = capsys.readouterr().err
    assert "which the demo would replace" in said and str(mine.resolve()) in said
    assert {p.name: p.read_bytes() for p in default.iterdir() if p.is_file()} == before
    assert not (home / "demo" / "run").exists()  # refused before any work
