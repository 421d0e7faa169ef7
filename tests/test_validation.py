"""Bad options and recipe values are refused before any work: one ``error:`` line naming what is
wrong, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ssbctl.cli.app import main
from ssbctl.engine.checkpoint import latest_checkpoint


def _refused(capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    """``main(argv)`` exits 2 with a single ``error:`` line on stderr that contains ``needle``."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("override, needle", [
    ("train.lr=nan", "'train.lr' must be a finite number"),
    ("train.lr=inf", "'train.lr' must be a finite number"),
    ("train.lr=-inf", "'train.lr' must be a finite number"),
    ("loss.margin=1e400", "'loss.margin' must be a finite number"),
    ("model.support.temperature=nan", "'model.support.temperature' must be a finite number"),
    ("model.video.heads=3", "'model.video.heads' must divide model.video.hidden_dim=256"),
    ("model.decoder.heads=5", "'model.decoder.heads' must divide"),
    ("train.accum_steps=100", "'train.accum_steps' must be at most train.batch_size=64"),
    ("model.name=5", "'model.name' must be str"),
])
def test_bad_recipe_values_exit_2_naming_the_key(capsys, override: str, needle: str) -> None:
    _refused(capsys, ["train", "--recipe", "shapes", "--set", override], needle)


@pytest.mark.parametrize("args, needle", [
    (["--fps", "0", "--sampling", "fps"], "--fps must be a positive number"),
    (["--fps", "-1", "--sampling", "fps"], "--fps must be a positive number"),
    (["--fps", "nan", "--sampling", "fps"], "--fps must be a positive number"),
    (["--num-videos", "0"], "--num-videos must be at least 1"),
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_prepare_options_exit_2_before_any_work(capsys, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "prepared"
    _refused(capsys, ["prepare", "shapes", "--num-videos", "4", "--root", str(tmp_path / "raw"), "--out", str(out),
                      *args], needle)
    assert not out.exists() and not (tmp_path / "raw").exists(), "nothing generated or written"


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "RUN", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["index", "RUN", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["index", "RUN", "--workers", "-1"], "--workers must be at least 0"),
    (["retrieve", "--query", "a ball", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["demo", "--num-videos", "0"], "--num-videos must be at least 1"),
])
def test_bad_options_of_other_commands_exit_2(capsys, tmp_path: Path, argv: list[str], needle: str) -> None:
    _refused(capsys, [str(tmp_path) if a == "RUN" else a for a in argv], needle)


def test_a_misspelled_eval_split_is_refused_before_the_first_epoch(capsys, tiny_recipe_args, tmp_path: Path) -> None:
    args = tiny_recipe_args("run", **{"data.eval_split": "vall"})
    _refused(capsys, ["train", "--recipe", "shapes", *(x for a in args for x in ("--set", a))],
             "recipe key 'data.eval_split': split 'vall' has no videos")
    assert not (tmp_path / "run").exists(), "no epoch trained, no run folder written"


def test_accum_steps_beyond_a_process_share_of_the_batch_is_refused(capsys, tiny_recipe_args,
                                                                    tmp_path: Path) -> None:
    """Under --nproc 2 a batch of 32 gives each process 16 pairs: 20 micro-batches cannot be made,
    and the launcher says so once, before starting any worker."""
    args = tiny_recipe_args("run", **{"train.batch_size": 32, "train.accum_steps": 20})
    _refused(capsys, ["train", "--recipe", "shapes", "--nproc", "2", *(x for a in args for x in ("--set", a))],
             "recipe key 'train.accum_steps' must be at most 16")
    assert not (tmp_path / "run").exists()


def test_resume_refuses_to_change_the_model(capsys, tiny_run: Path, tmp_path: Path) -> None:
    """The architecture of a resumed run is its own; a --set model.* that would change it is an error, not ignored."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the session's run stays as it is
    before = latest_checkpoint(run)
    _refused(capsys, ["train", "--resume", "--out", str(run), "--set", "model.video.dropout=0.3"],
             "recipe key 'model.video.dropout' cannot change when resuming")
    _refused(capsys, ["train", "--resume", "--out", str(run), "--set", "model.support.mask=none"],
             "recipe key 'model.support.mask' cannot change when resuming")
    assert latest_checkpoint(run) == before
    # repeating the run's own value is no change: the resume goes ahead (and trains 1 more step)
    assert main(["train", "--resume", "--out", str(run), "--set", "model.support.mask=cross",
                 "--set", "train.max_steps=3"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out


def test_index_of_an_unknown_split_is_refused(capsys, tiny_run: Path, tmp_path: Path) -> None:
    _refused(capsys, ["index", str(tiny_run), "--split", "nope", "--out", str(tmp_path / "index")],
             "--split nope: no such split in")
    assert not (tmp_path / "index").exists(), "no empty index written"
    assert main(["index", str(tiny_run), "--split", "test", "--out", str(tmp_path / "index"), "--json"]) == 0
    assert '"videos": 6' in capsys.readouterr().out
