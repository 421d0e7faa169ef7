"""A real 2-process torchrun (gloo, CPU) trains exactly like one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssbctl.config import load_recipe
from ssbctl.core.io import read_jsonl
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.training import train

from fixtures import children as _children
from fixtures import communicate_or_reap as _communicate_or_reap
from fixtures import write_recipe as _write_recipe


@pytest.fixture(scope="module")
def no_dropout_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT without dropout (so 1 and 2 processes draw no different random masks)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ssbctl.model.text_encoder import builtin_models

    folder = tmp_path_factory.mktemp("bert_nodrop")
    tokenizer = AutoTokenizer.from_pretrained(builtin_models()["all-MiniLM-L6-v2"], local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _losses(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("mask, accum", [("cross", 1), ("identity", 2)])
def test_two_process_torchrun_equals_one_process(shapes_store: Path, no_dropout_text: Path, tmp_path: Path,
                                                  mask: str, accum: int) -> None:
    """Same losses and weights; the second case also accumulates 2 micro-batches per rank."""
    from conftest import tiny_overrides

    extra = {"train.max_steps": 4, "train.batch_size": 8, "data.eval_split": "", "model.video.dropout": 0.0,
             "model.decoder.dropout": 0.0, "model.support.mask": mask, "train.ckpt_every": 2}
    single = tiny_overrides(shapes_store, no_dropout_text, tmp_path / "one", **extra)
    extra["train.accum_steps"] = accum
    train(load_recipe("shapes", single), tmp_path / "one")

    double = tiny_overrides(shapes_store, no_dropout_text, tmp_path / "two", **extra)
    recipe = _write_recipe(tmp_path / "tiny.toml", double)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe), "--nproc", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "contrastive_loss", "caption_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])
    w1 = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    w2 = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    assert w1.keys() == w2.keys()
    adam_bound = 4 * 3e-3 * 2  # 4 steps of lr 3e-3, each at most about lr: two runs apart by twice that
    for key in w1:
        a, b = w1[key], w2[key]
        if key.endswith("in_proj_bias"):
            # The key bias has zero true gradient (softmax ignores a per-query constant): its
            # gradient is rounding noise, which Adam scales up to lr-sized steps. Compare the query
            # and value biases exactly and bound the key bias by the steps Adam can take.
            width = a.shape[0] // 3
            assert (a[width:2 * width] - b[width:2 * width]).abs().max() <= adam_bound
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        # Any element whose gradient is near zero (a frame position few clips reach) gets the same
        # treatment from Adam: summed in another order on two ranks, its rounding noise becomes a
        # step. Allow that in at most 1% of a tensor's elements, within Adam's bound; the rest exact.
        off = ~torch.isclose(b, a, rtol=1e-4, atol=2e-5)
        assert int(off.sum()) <= max(1, a.numel() // 100), (key, int(off.sum()), float((a - b).abs().max()))
        assert float((a - b).abs().max()) <= adam_bound, key
    state = json.loads((latest_checkpoint(tmp_path / "two") / "state.json").read_text())
    assert state["world"] == 2
    rng = torch.load(latest_checkpoint(tmp_path / "two") / "trainer.pt", weights_only=True)["rng"]
    assert len(rng) == 2, "every rank's RNG state is checkpointed"


def test_global_batch_must_divide(shapes_store: Path, no_dropout_text: Path, tmp_path: Path) -> None:
    from conftest import tiny_overrides

    recipe = _write_recipe(tmp_path / "odd.toml", tiny_overrides(shapes_store, no_dropout_text, tmp_path / "r",
                                                                 **{"train.batch_size": 7}))
    proc = subprocess.run([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe), "--nproc", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "must be divisible by the 2 processes" in proc.stderr


def _workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers under an ``ssbctl train --nproc`` process (Linux /proc)."""
    found: dict[int, int] = {}
    for torchrun in _children(launcher):
        for pid in _children(torchrun):
            items = Path(f"/proc/{pid}/environ").read_text().split("\0")
            env = dict(item.split("=", 1) for item in items if "=" in item)
            found[int(env["RANK"])] = pid
    return found


def _launch_until_checkpoint(args: list[str], run: Path, after_step: int) -> tuple[subprocess.Popen, int]:
    """Start ``ssbctl train ... --nproc 2`` and wait for a checkpoint past ``after_step``."""
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "train", *args, "--nproc", "2"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ckpt = latest_checkpoint(run)
        if ckpt is not None and json.loads((ckpt / "state.json").read_text())["step"] > after_step:
            return proc, len(_workers(proc.pid))
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no checkpoint past step {after_step}: {proc.communicate()[1][-2000:]}")


def _stopped_step(proc: subprocess.Popen, run: Path) -> int:
    out, err = _communicate_or_reap(proc, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["world"] == 2
    return state["step"]


# Run under torchrun: trains a recipe; rank 1 alone sends itself SIGTERM right after step AT.
SIGNAL_ONE_RANK = """
import json, os, signal, sys
from pathlib import Path
import torch.distributed as dist
from ssbctl.config import load_recipe
from ssbctl import training
from ssbctl.engine import trainer

recipe, run, at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if os.environ["RANK"] == "1":
    def step(self, step, terms, clips_per_s):
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)
    trainer.SilentReporter.step = step
summary = training.train(load_recipe(recipe), run)
summary["group_left"] = not dist.is_initialized()  # gloo alive at exit aborts the process
(run.parent / f"summary-{os.environ['RANK']}.json").write_text(json.dumps(summary))
"""


def test_a_signal_to_one_rank_or_to_the_launcher_stops_every_rank_at_one_step(
        shapes_store: Path, no_dropout_text: Path, tmp_path: Path) -> None:
    """A signal that reaches one rank stops all ranks after the same step, with a checkpoint and exit 0.

    Rank 1 gets it right after the last step of epoch 1, between that step's agreement and the
    next epoch: the moment where a rank acting on its own signal would leave the others waiting
    in a collective forever. Then the run resumes under ``--nproc 2`` and SIGTERM to the launcher
    reaches the workers."""
    from ssbctl.data.loader import EpochBatchSampler, PairDataset
    from ssbctl.data.store import FeatureStore

    from conftest import tiny_overrides

    run = tmp_path / "run"
    recipe = _write_recipe(tmp_path / "long.toml", tiny_overrides(
        shapes_store, no_dropout_text, run, **{"train.max_steps": 100000, "train.epochs": 10000,
                                               "train.log_every": 1000, "train.ckpt_every": 1000,
                                               "data.eval_split": ""}))
    per_epoch = len(EpochBatchSampler(len(PairDataset(FeatureStore(shapes_store), "train")), 8, 0).batches())
    script = tmp_path / "signal_one_rank.py"
    script.write_text(SIGNAL_ONE_RANK)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(recipe), str(run), str(per_epoch)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, err = _communicate_or_reap(proc, timeout=180)
    assert proc.returncode == 0, err[-3000:]
    summaries = [json.loads((tmp_path / f"summary-{rank}.json").read_text()) for rank in (0, 1)]
    assert {(s["steps"], s["stopped_by"], s["group_left"]) for s in summaries} == {(per_epoch + 1, "SIGTERM", True)}
    first = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert first["step"] == per_epoch + 1 and first["world"] == 2

    proc, workers = _launch_until_checkpoint(
        ["--resume", "--out", str(run), "--set", "train.ckpt_every=2"], run, after_step=first["step"])
    assert workers == 2
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to the workers
    assert _stopped_step(proc, run) > first["step"]


# Joins a 2-process gloo group through ssbctl's setup and exits without leaving it; the handler
# registered first runs last, after every exit handler that setup registered.
JOIN_AND_EXIT = """
import atexit, torch.distributed as dist
from ssbctl.core.distributed import setup
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
setup("cpu")
dist.barrier()
"""


def test_a_process_that_joined_the_group_leaves_it_before_the_interpreter_exits() -> None:
    """gloo alive during interpreter finalization aborts a process now and then (SIGABRT,
    "terminate called without an active exception"); setup makes every exit leave the group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", JOIN_AND_EXIT], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    for proc in procs:
        out, err = _communicate_or_reap(proc, timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "group alive at exit: False" in out, out + err[-3000:]


def test_nproc_launches_the_command_given_to_main(shapes_store: Path, no_dropout_text: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``main(argv)`` with --nproc: the workers run argv's command, not whatever sys.argv holds."""
    from ssbctl.cli.app import main

    from conftest import tiny_overrides

    recipe = _write_recipe(tmp_path / "tiny.toml", tiny_overrides(
        shapes_store, no_dropout_text, tmp_path / "run", **{"train.max_steps": 2, "data.eval_split": ""}))
    monkeypatch.setattr(sys, "argv", ["ssbctl", "evaluate", str(tmp_path / "no-run")])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["train", "--recipe", str(recipe), "--nproc", "2"]) == 0
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["world"] == 2 and state["step"] == 2
