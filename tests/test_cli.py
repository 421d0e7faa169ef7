"""The command line end to end on a tiny generated set, and its error contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssbctl.cli.app import main

from fixtures import write_recipe as _write_recipe


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssbctl", *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=300)


def test_prepare_train_evaluate_index_retrieve(shapes_raw: Path, tiny_recipe_args, tmp_path: Path, capsys) -> None:
    prepared = tmp_path / "prepared"
    assert main(["prepare", "custom", "--annotations", str(shapes_raw / "captions.jsonl"), "--out", str(prepared),
                 "--pixel-size", "8", "--frames", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["merged"] and summary["manifests"][0]["counts"] == {"videos": 24, "captions": 72, "failures": 0}

    run = tmp_path / "run"
    args = [a for a in tiny_recipe_args("unused") if not a.startswith("data.prepared")]
    recipe = _write_recipe(tmp_path / "tiny.toml", args + [f'data.prepared="{prepared}"'])
    assert main(["train", "--recipe", str(recipe), "--out", str(run), "--set", "train.epochs=3"]) == 0
    assert "trained 12 steps" in capsys.readouterr().out

    assert main(["evaluate", str(run), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["n_queries"] == 18 and result["n_videos"] == 6
    for direction in ("t2v", "v2t"):
        assert set(result[direction]) == {"R1", "R5", "R10", "MdR", "MnR"}
        assert 0 <= result[direction]["R1"] <= result[direction]["R5"] <= result[direction]["R10"] <= 100

    index = tmp_path / "index"
    assert main(["index", str(run), "--out", str(index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["videos"] == 24

    assert main(["retrieve", "--query", "a red circle moves to the left", "--index", str(index), "-k", "3",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"rank", "video_id", "split", "caption", "score", "path"}
    assert hits[0]["score"] >= hits[2]["score"]
    assert Path(hits[0]["path"]).is_file()

    # retrieve with no --index reads the default index under $SSBCTL_HOME
    assert main(["index", str(run)]) == 0
    capsys.readouterr()
    assert main(["retrieve", "--query", "a blue square spins"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 5  # piped: a TSV header and 5 rows


def test_demo_runs_offline_end_to_end(tmp_path: Path, capsys) -> None:
    code = main(["demo", "--out", str(tmp_path / "demo"), "--num-videos", "30", "--set", "train.epochs=1",
                 "--set", "train.batch_size=16", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test"]["split"] == "test" and result["test"]["n_videos"] == 6
    assert len(result["queries"]) == 4 and all(len(h) == 3 for h in result["queries"].values())
    assert main(["retrieve", "--query", "a red circle moves to the left", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5


@pytest.mark.parametrize("body, needle", [
    ('[train]\nlerning_rate = 0.1\n', "'train.lerning_rate'"),
    ('[train]\nepochs = "many"\n', "'train.epochs'"),
    ('[model]\nname = "ssb-minilm-pixels"\n[model.support]\nmask = "sideways"\n', "'model.support.mask'"),
    ('[train\nepochs = 1\n', "invalid TOML"),
])
def test_malformed_recipe_exits_2_with_one_line_naming_the_key(tmp_path: Path, body: str, needle: str) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(body)
    proc = _cli("train", "--recipe", str(recipe))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["prepare", "msrvtt-2030"], "unknown dataset 'msrvtt-2030'"),
    (["evaluate", "/no/such/run"], "run folder not found"),
    (["train", "--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["retrieve", "--query", "x", "--index", "/no/index"], "no index at /no/index"),
])
def test_user_errors_exit_2_without_traceback(args: list[str], needle: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_every_command_has_help_with_an_example() -> None:
    for command in ("prepare", "train", "evaluate", "index", "retrieve", "demo"):
        proc = _cli(command, "--help")
        assert proc.returncode == 0 and "Example" in proc.stdout, command
