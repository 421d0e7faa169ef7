"""Training logs where people train (issue 12): plain progress lines when stderr is a file (nohup,
Slurm, CI), no source locations in log lines, and ``train.report_to`` trackers beside metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from damage import assert_one_error_line, cli
from fixtures import write_recipe

# [HH:MM:SS] step 4/8 (50%) contrastive 1.76 caption 3.925 loss 5.685 ... lr 2.26e-03 ... | 32.9 clips/s | ETA 0:00:01
PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d\] step (\d+)/(\d+) \(\d+%\) .*\bloss [\d.]+ .*\blr \d\.\d\de[-+]\d\d\b.*"
                      r"\| [\d.]+ clips/s \| ETA (\d+:\d\d:\d\d|\?)$")


def test_training_under_a_log_file_prints_a_plain_line_every_log_every_steps(tiny_recipe_args, tmp_path: Path) -> None:
    """stderr to a file, as under nohup or sbatch: one plain line per logged step with the loss terms,
    the learning rate, clips/s and an ETA; no progress-bar drawing, no ``common.py:68`` locations."""
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("run", **{"train.log_every": 2, "train.epochs": 2}))
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe)],
                              stdout=subprocess.PIPE, stderr=fh, text=True, timeout=600,
                              env={**os.environ, "COLUMNS": "80"})
    text = log.read_text()
    assert proc.returncode == 0, text
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged_steps = [r["step"] for r in rows if "loss" in r]
    progress = [m for m in map(PROGRESS.match, text.splitlines()) if m]
    assert [int(m.group(1)) for m in progress] == logged_steps, text
    assert logged_steps and all(s % 2 == 0 for s in logged_steps)
    assert {int(m.group(2)) for m in progress} == {logged_steps[-1]}, text  # step N of the run's total
    assert "text-to-video R@1" in text  # the per-epoch validation note is a line too
    assert not re.search(r"\b\w+\.py:\d+\b", text), f"a source location in the log:\n{text}"
    assert "\x1b[" not in text and "\r" not in text, "terminal control codes in a log file"


def test_report_to_tensorboard_writes_the_rows_of_metrics_jsonl(tiny_recipe_args, tmp_path: Path) -> None:
    """``train.report_to = ["tensorboard"]``: event files in RUN/tensorboard holding every number of
    metrics.jsonl (training rows under train/, validation under eval/) at the same steps."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra; not installable here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("run", **{"train.epochs": 2}))
    result = cli(["train", "--recipe", str(recipe), "--set", 'train.report_to=["tensorboard"]'], timeout=600)
    assert result.code == 0, result.err
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval" in r]
    assert train_rows and eval_rows
    for key in ("loss", "lr", "grad_norm", "clips_per_s"):
        logged = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        expected = {r["step"]: r[key] for r in train_rows}
        assert logged.keys() == expected.keys(), key
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, step)
    r1 = {e.step: e.value for e in events.Scalars("eval/t2v/R1")}
    assert r1 == pytest.approx({r["step"]: r["eval"]["t2v"]["R1"] for r in eval_rows})
    assert "eval/v2t/MdR" in tags and not any(t.endswith(("/step", "/epoch", "/time")) for t in tags), tags


def test_report_to_refuses_an_unknown_or_missing_tracker_in_one_line(tiny_recipe_args, tmp_path: Path) -> None:
    """An unknown name, or wandb asked for but not installed, is exit 2 and one line, before any work."""
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("run"))
    result = cli(["train", "--recipe", str(recipe), "--set", 'train.report_to=["mlflw"]'])
    assert_one_error_line(result, 2, "train.report_to", "mlflw")
    assert not (tmp_path / "run").exists()
    if importlib.util.find_spec("wandb") is None:
        result = cli(["train", "--recipe", str(recipe), "--set", 'train.report_to=["wandb"]'])
        assert_one_error_line(result, 2, "wandb", "not installed", "ssbctl[wandb]")
        assert not (tmp_path / "run").exists()
