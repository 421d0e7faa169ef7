"""Issue 12, "Discoverable": shell completion, ``ssbctl recipes`` (list, show, copy) and ``ssbctl runs``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssbctl.config import load_recipe
from ssbctl.core.paths import shipped_configs

from damage import assert_one_error_line, cli
from fixtures import write_recipe

SSBCTL = [sys.executable, "-m", "ssbctl"]


def _bash(command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``command`` run by bash, with this environment's ssbctl first on PATH (so the shell that
    completion detects is bash, its parent)."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": path, **(env or {})})


# ---------------------------------------------------------------- shell completion


def test_completion_is_offered_installed_and_completes_commands(tmp_path: Path) -> None:
    """``--show-completion`` prints the bash script, ``--install-completion`` installs it for the
    user, and the completion itself answers with ssbctl's commands and subcommands."""
    shown = _bash(f"{sys.executable} -m ssbctl --show-completion")
    assert shown.returncode == 0, shown.stderr
    assert "_SSBCTL_COMPLETE" in shown.stdout and "complete" in shown.stdout

    installed = _bash(f"{sys.executable} -m ssbctl --install-completion", env={"HOME": str(tmp_path)})
    assert installed.returncode == 0, installed.stderr
    scripts = list(tmp_path.rglob("ssbctl*"))
    assert scripts and "_SSBCTL_COMPLETE" in scripts[0].read_text(), list(tmp_path.rglob("*"))

    def complete(words: str) -> list[str]:
        proc = subprocess.run(SSBCTL, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "_SSBCTL_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                   "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert {"recipes", "runs"} <= set(complete("ssbctl r")), complete("ssbctl r")
    assert "show" in complete("ssbctl recipes s")
    assert "--recipe" in complete("ssbctl train --rec")


# ---------------------------------------------------------------- ssbctl recipes


def test_recipes_lists_every_shipped_config_with_its_purpose() -> None:
    result = cli(["recipes", "--json"])
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    names = {(r["kind"], r["name"]) for r in rows}
    expected = {("recipe", n) for n in shipped_configs("recipes")} | {("model", n) for n in shipped_configs("models")}
    assert names == expected and len(rows) == len(expected)
    by_name = {r["name"]: r for r in rows}
    assert by_name["shapes"]["purpose"].startswith("Synthetic shapes clips")
    assert by_name["msvd"]["purpose"].startswith("MSVD: 1,200 / 100 / 670 videos")
    assert by_name["ssb-clip-b32"]["purpose"].startswith("SSB over CLIP ViT-B/32 frame features")
    assert all(r["purpose"] and not r["purpose"].startswith(("Launch", "ssbctl", "Card")) for r in rows), rows

    piped = cli(["recipes"])  # stdout is not a terminal: one whole tab-separated line per config
    assert piped.code == 0
    lines = piped.out.splitlines()
    assert len(lines) == len(expected)
    assert f"shapes\trecipe\t{by_name['shapes']['purpose']}" in lines


def test_recipes_show_prints_the_shipped_toml() -> None:
    result = cli(["recipes", "show", "shapes"])
    assert result.code == 0, result.err
    assert result.out == shipped_configs("recipes")["shapes"].read_text()
    model = cli(["recipes", "show", "ssb-clip-b32", "--json"])
    assert json.loads(model.out)["kind"] == "model"
    assert_one_error_line(cli(["recipes", "show", "shapez"]), 2, "shapez", "shapes")


def test_recipes_copy_writes_an_editable_recipe_and_never_overwrites(tmp_path: Path) -> None:
    dest = tmp_path / "my-shapes.toml"
    result = cli(["recipes", "copy", "shapes", str(dest)])
    assert result.code == 0, result.err
    assert dest.read_text() == shipped_configs("recipes")["shapes"].read_text()
    assert f"ssbctl train --recipe {dest}" in result.out
    assert load_recipe(str(dest)) == load_recipe("shapes")

    dest.write_text("# my edits\n")
    assert_one_error_line(cli(["recipes", "copy", "msvd", str(dest)]), 2, str(dest), "exists")
    assert dest.read_text() == "# my edits\n"

    folder = tmp_path / "configs"
    folder.mkdir()
    assert cli(["recipes", "copy", "ssb-clip-b32", str(folder)]).code == 0
    assert (folder / "ssb-clip-b32.toml").read_text() == shipped_configs("models")["ssb-clip-b32"].read_text()
    assert_one_error_line(cli(["recipes", "copy", "shapes", str(tmp_path / "no" / "such" / "x.toml")]), 2, "no folder")
    assert not list(tmp_path.rglob(".*.tmp"))


# ---------------------------------------------------------------- ssbctl runs


def test_runs_lists_checkpoint_data_model_and_best_validation(tiny_recipe_args, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("unused"))
    for name, epochs in (("a", 2), ("b", 1)):
        result = cli(["train", "--recipe", str(recipe), "--out", str(runs / name), "--set", f"train.epochs={epochs}"],
                     timeout=600)
        assert result.code == 0, result.err
    resumed = cli(["train", "--resume", "--out", str(runs / "b"), "--set", "train.epochs=2"], timeout=600)
    assert resumed.code == 0, resumed.err  # a resume keeps the recipe the run was started from
    shutil.copytree(runs / "a", runs / "damaged")
    metrics = runs / "damaged" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("not a run\n")

    result = cli(["runs", str(runs), "--json"])
    assert result.code == 0, result.err
    rows = {Path(r["run"]).name: r for r in json.loads(result.out)}
    assert set(rows) == {"a", "b", "damaged"}
    a = rows["a"]
    assert a["status"] == "ok" and a["problem"] is None
    assert a["data"] == load_recipe(str(recipe)).data.prepared and a["model"] == "ssb-minilm-pixels"
    assert a["recipe"] == rows["b"]["recipe"] == str(recipe)  # what --recipe named, recorded in run.json
    assert a["checkpoint"] == (runs / "a" / "checkpoints" / "latest").read_text().strip()
    evals = [json.loads(line)["eval"] for line in (runs / "a" / "metrics.jsonl").read_text().splitlines()
             if "eval" in json.loads(line)]
    assert len(evals) == 2
    assert a["best"]["t2v"]["R1"] == max(e["t2v"]["R1"] for e in evals) and a["best"]["split"] == "val"
    assert rows["b"]["step"] == a["step"]  # b: one epoch, then resumed to two
    damaged = rows["damaged"]
    assert damaged["status"] == "damaged" and "metrics.jsonl line 2" in damaged["problem"], damaged

    table = cli(["runs", str(runs)])  # piped: a header and one tab-separated line per run, whole values
    assert table.code == 0, table.err
    assert table.out.splitlines()[0].split("\t")[:4] == ["run", "status", "checkpoint", "recipe"]
    assert any(line.startswith(f"{runs / 'damaged'}\tdamaged: ") for line in table.out.splitlines()), table.out
    assert cli(["runs", str(runs / "a"), "--json"]).code == 0  # one run by its own folder
    assert_one_error_line(cli(["runs", str(tmp_path / "nowhere")]), 2, "nowhere")


@pytest.mark.parametrize("damage", ["recipe", "pointer"])
def test_runs_lists_a_run_with_damaged_files_as_damaged(tiny_recipe_args, tmp_path: Path, damage: str) -> None:
    run = tmp_path / "runs" / "r"
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("unused", **{"train.epochs": 1}))
    assert cli(["train", "--recipe", str(recipe), "--out", str(run)], timeout=600).code == 0
    if damage == "recipe":
        (run / "recipe.toml").write_bytes(b"# Resolved recipe of this run\n[train\n\xff")
    else:
        (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    result = cli(["runs", str(tmp_path / "runs"), "--json"])
    assert result.code == 0, result.err
    (row,) = json.loads(result.out)
    assert row["status"] == "damaged" and row["problem"], row
