"""Training: the loss falls, the run folder is complete, and a stopped or killed run resumes
to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssbctl.config import load_recipe
from ssbctl.core.errors import UserError
from ssbctl.core.io import read_jsonl
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.engine.trainer import SilentReporter, Trainer, lr_factor
from ssbctl.training import train

from fixtures import write_recipe as _write_recipe


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_training_lowers_the_loss_and_writes_a_complete_run(tiny_recipe_args, tmp_path: Path) -> None:
    recipe = load_recipe("shapes", tiny_recipe_args("run", **{"train.epochs": 8}))
    summary = train(recipe, tmp_path / "run")
    assert summary["steps"] == 8 * 4 and summary["epochs"] == 8 and summary["stopped_by"] is None
    run = tmp_path / "run"
    assert (run / "recipe.toml").read_text().startswith("# Resolved recipe")
    assert (run / "text_encoder" / "config.json").is_file() and (run / "text_encoder" / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    assert len(steps) == 32 and len(evals) == 8
    assert {"contrastive_loss", "caption_loss", "lr", "clips_per_s", "temperature", "grad_norm"} <= steps[0].keys()
    assert all(0 <= r["data_wait"] <= 1 for r in steps)  # share of the time spent waiting for batches
    first = sum(r["loss"] for r in steps[:4]) / 4
    last = sum(r["loss"] for r in steps[-4:]) / 4
    assert last < first - 0.3, (first, last)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000028", "step-00000032"], "keep_checkpoints=2 prunes older ones"
    ckpt = run / "checkpoints" / "step-00000032"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "trainer.pt", "state.json"}
    torch.load(ckpt / "trainer.pt", weights_only=True)  # no unrestricted pickle needed


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = load_recipe("shapes", ["train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


class _SigtermAt(SilentReporter):
    """Sends this process a real SIGTERM when training reaches a step."""

    def __init__(self, step: int) -> None:
        self.at = step

    def step(self, step: int, terms: dict[str, float] | None, clips_per_s: float) -> None:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tiny_recipe_args, tmp_path: Path) -> None:
    recipe = load_recipe("shapes", tiny_recipe_args("full", **{"train.epochs": 3}))
    train(recipe, tmp_path / "full")
    stopped = load_recipe("shapes", tiny_recipe_args("stopped", **{"train.epochs": 3}))
    # The signal arrives after step 6; the ranks agree on it during step 7, then stop (mid-epoch 2).
    summary = train(stopped, tmp_path / "stopped", reporter=_SigtermAt(6))
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 7
    assert latest_checkpoint(tmp_path / "stopped").name == "step-00000007"
    resumed = train(stopped, tmp_path / "stopped", resume=True)
    assert resumed["steps"] == 12
    _assert_same_weights(tmp_path / "full", tmp_path / "stopped")


def test_fresh_run_refuses_a_folder_with_checkpoints_and_resume_needs_one(tiny_recipe_args, tmp_path: Path) -> None:
    recipe = load_recipe("shapes", tiny_recipe_args("run", **{"train.max_steps": 2}))
    with pytest.raises(UserError, match="nothing to resume"):
        Trainer(recipe, tmp_path / "run", resume=True)
    train(recipe, tmp_path / "run")
    with pytest.raises(UserError, match="already has checkpoints"):
        Trainer(recipe, tmp_path / "run")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_recipe_args, tmp_path: Path) -> None:
    extra = {"train.epochs": 12, "train.ckpt_every": 4, "data.eval_split": ""}
    ref = load_recipe("shapes", tiny_recipe_args("reference", **extra))
    train(ref, tmp_path / "reference")

    recipe_file = _write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("killed", **extra))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ckpt = latest_checkpoint(tmp_path / "killed")
        if ckpt is not None and ckpt.name >= "step-00000008":
            proc.send_signal(signal.SIGKILL)
            killed_at = ckpt.name
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    last = latest_checkpoint(tmp_path / "killed")
    assert last is not None and last.name < "step-00000048"
    done = subprocess.run([sys.executable, "-m", "ssbctl", "train", "--resume", "--out", str(tmp_path / "killed")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000048"
    _assert_same_weights(tmp_path / "reference", tmp_path / "killed")
    # one loss curve, equal to the uninterrupted run's; the rows the killed part logged after its
    # last checkpoint are kept aside
    curve = [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl")]
    reference = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    assert curve == [(r["step"], r["loss"], r["grad_norm"]) for r in reference]
    assert [s for s, *_ in curve] == list(range(1, 49))
    superseded = tmp_path / "killed" / "metrics.superseded.jsonl"
    assert not superseded.exists() or all(r["step"] > int(last.name[5:]) for r in read_jsonl(superseded))


def test_two_experts_train_and_evaluate(shapes_raw: Path, tiny_vit: Path, tiny_recipe_args, tmp_path: Path,
                                        capsys) -> None:
    """Two backbones prepared in one pass become two experts of the video encoder."""
    from ssbctl.cli.app import main

    assert main(["prepare", "custom", "--annotations", str(shapes_raw / "captions.jsonl"), "--out", str(tmp_path / "s"),
                 "--backbone", "pixels", "--backbone", f"hf:{tiny_vit}", "--pixel-size", "8", "--frames", "3",
                 "--workers", "0", "--json"]) == 0
    capsys.readouterr()
    main_store, vit_store = tmp_path / "s-pixels", tmp_path / f"s-{tiny_vit.name}"
    args = [a for a in tiny_recipe_args("run", **{"train.max_steps": 3}) if not a.startswith("data.prepared")]
    recipe = load_recipe("shapes", [*args, f'data.prepared="{main_store}"', f'data.experts=["{vit_store}"]'])
    summary = train(recipe, tmp_path / "run")
    assert summary["steps"] == 3
    from ssbctl.inference.run import load_run

    run = load_run(tmp_path / "run")
    assert run.recipe.model.video.input_dims == (192, 16) and len(run.model.video.inputs) == 2
    assert main(["evaluate", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_videos"] == 6


def test_nonfinite_batches_are_skipped_counted_and_abort_when_persistent(tiny_recipe_args, tmp_path: Path) -> None:
    """lr=1e30: step 1 is finite and leaves weights every later loss is NaN on; the batches after it
    are skipped until train.max_nonfinite in a row fail the run, before the epoch's checkpoint."""
    from ssbctl.core.errors import TrainingError

    reporter = _Notes()
    recipe = load_recipe("shapes", tiny_recipe_args("nan", **{"train.lr": 1e30, "train.max_nonfinite": 2}))
    with pytest.raises(TrainingError, match="non-finite 2 times in a row at step 1"):
        train(recipe, tmp_path / "nan", reporter=reporter)
    assert [n for n in reporter.notes if "non-finite" in n] == ["step 2: non-finite loss, batch skipped"] * 2
    assert latest_checkpoint(tmp_path / "nan") is None


class _Notes(SilentReporter):
    """Keeps the notes the trainer reports."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_cli_checkpoints_and_exits_0(tiny_recipe_args, tmp_path: Path, signum: int) -> None:
    recipe_file = _write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("term", **{"train.epochs": 200,
                                                                                      "data.eval_split": ""}))
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in out
    ckpt = latest_checkpoint(tmp_path / "term")
    assert ckpt is not None and 0 < json.loads((ckpt / "state.json").read_text())["step"] < 800


def test_resume_moves_rows_logged_after_the_checkpoint_aside(tiny_recipe_args, tmp_path: Path) -> None:
    """A run killed after logging step 6 but before checkpointing it resumes from step 4: metrics.jsonl
    keeps one curve, the lost steps' rows go to metrics.superseded.jsonl, a torn last line is dropped."""
    import shutil

    extra = {"train.max_steps": 6, "train.ckpt_every": 4, "data.eval_split": "", "train.keep_checkpoints": 3}
    run = tmp_path / "run"
    train(load_recipe("shapes", tiny_recipe_args("run", **extra)), run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "lo')  # the kill came mid-write
    assert latest_checkpoint(run).name == "step-00000004"

    resumed = train(load_recipe("shapes", tiny_recipe_args("run", **{**extra, "train.max_steps": 8})), run, resume=True)
    assert resumed["steps"] == 8
    rows = list(read_jsonl(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    aside = list(read_jsonl(run / "metrics.superseded.jsonl"))
    assert [r["step"] for r in aside] == [5, 6]
    assert [r["loss"] for r in aside] == [r["loss"] for r in rows[4:6]], "the replayed steps log the same losses"


def test_metrics_log_the_main_and_the_text_learning_rates(tiny_recipe_args, tmp_path: Path) -> None:
    """``lr`` is train.lr on its schedule, ``lr_text`` the text encoder's train.text_lr, only while it trains."""
    for name, layers in (("tuned", -1), ("frozen", 0)):
        recipe = load_recipe("shapes", tiny_recipe_args(name, **{"train.max_steps": 4, "data.eval_split": "",
                                                                 "model.text.trainable_layers": layers}))
        train(recipe, tmp_path / name)
        steps = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3, 4]
        for r in steps:
            factor = lr_factor(r["step"], 4, recipe.train)
            assert r["lr"] == pytest.approx(3e-3 * factor, rel=1e-9), (name, r["step"])
            if layers:
                assert r["lr_text"] == pytest.approx(1e-3 * factor, rel=1e-9), r["step"]
            else:
                assert "lr_text" not in r


def test_a_global_batch_larger_than_the_split_is_refused_before_any_work(shapes_store: Path, tiny_recipe_args,
                                                                         tmp_path: Path, capsys) -> None:
    from ssbctl.cli.app import main
    from ssbctl.data.loader import EpochBatchSampler, PairDataset
    from ssbctl.data.store import FeatureStore

    pairs = len(PairDataset(FeatureStore(shapes_store), "train"))
    recipe = _write_recipe(tmp_path / "big.toml", tiny_recipe_args("run", **{"train.batch_size": pairs + 2}))
    for extra in ([], ["--nproc", "2"]):  # with --nproc: before torchrun starts any worker
        assert main(["train", "--recipe", str(recipe), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: train.batch_size={pairs + 2} (the global batch) is larger than the "
                              f"{pairs} (video, caption) pairs of split 'train'") and err.count("\n") == 1
        assert not (tmp_path / "run").exists(), "refused before writing the run folder"
    with pytest.raises(UserError, match="train.batch_size=4 .* larger than the 3"):
        EpochBatchSampler(3, 4, seed=0)
    with pytest.raises(UserError, match="train.batch_size=2 .* larger than the 1"):  # was a ZeroDivisionError
        EpochBatchSampler(1, 2, seed=0, rank=0, world=2)
    assert len(EpochBatchSampler(9, 4, seed=0, rank=1, world=2).batches()) == 2
