"""Resuming when the trainable parameters differ from the checkpoint's optimizer: checkpoints
written before the temperature was frozen under max-margin, and runs resumed under another loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssbctl.core.errors import UserError
from ssbctl.core.io import read_jsonl
from ssbctl.engine.checkpoint import latest_checkpoint, remap_optimizer_state
from ssbctl.engine.train_setup import resolve_recipe
from ssbctl.engine.trainer import Trainer
from ssbctl.training import train


def test_optimizer_state_is_matched_by_parameter_name() -> None:
    """A parameter trained then but not now is dropped; one trained now but not then starts fresh."""
    a, b, c, d = (torch.nn.Parameter(torch.ones(2) * i) for i in range(4))
    old = torch.optim.AdamW([{"params": [a, b], "lr": 0.1}, {"params": [c], "lr": 0.2}])
    for p in (a, b, c):
        p.grad = torch.ones(2)
    old.step()
    saved = old.state_dict()
    new = torch.optim.AdamW([{"params": [b], "lr": 1.0}, {"params": [c, d], "lr": 1.0}])
    new.load_state_dict(remap_optimizer_state(saved, [["a", "b"], ["c"]], [["b"], ["c", "d"]], Path("ckpt")))
    assert [g["lr"] for g in new.param_groups] == [0.1, 0.2], "group settings come from the checkpoint"
    assert torch.equal(new.state[b]["exp_avg"], old.state[b]["exp_avg"])
    assert torch.equal(new.state[c]["exp_avg_sq"], old.state[c]["exp_avg_sq"])
    assert d not in new.state
    with pytest.raises(UserError, match="does not fit"):
        remap_optimizer_state(saved, [["a"], ["c"]], [["b"], ["c", "d"]], Path("ckpt"))


def test_a_checkpoint_whose_optimizer_held_the_temperature_resumes_under_max_margin(
        tiny_recipe_args, tmp_path: Path) -> None:
    """Checkpoints written before this change have no parameter names and an optimizer over the
    temperature (under either loss); an InfoNCE one is exactly such a file. Resumed under
    max-margin, the temperature is frozen and left out, the other moments carry over."""
    run = tmp_path / "run"
    train(resolve_recipe("shapes", tiny_recipe_args("run", **{"train.max_steps": 2, "train.ckpt_every": 2,
                                                               "data.eval_split": ""}), None, False)[0], run)
    ckpt = latest_checkpoint(run)
    trainer_file = ckpt / "trainer.pt"
    state = torch.load(trainer_file, weights_only=True)
    assert "log_logit_scale" in sum(state.pop("param_names"), [])
    torch.save(state, trainer_file)  # the layout older versions wrote
    recipe, run_dir = resolve_recipe(None, ["loss.contrastive=max_margin", "train.max_steps=4"], run, True)
    trainer = Trainer(recipe, run_dir, resume=True)
    before = float(trainer.module.log_logit_scale)
    trainer.fit()
    assert float(trainer.module.log_logit_scale) == before and not trainer.module.log_logit_scale.requires_grad
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {4}, "every trained parameter kept its Adam moments from the first 2 steps"
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [("temperature" in r) for r in rows] == [True, True, False, False]
    names = torch.load(latest_checkpoint(run) / "trainer.pt", weights_only=True)["param_names"]
    assert "log_logit_scale" not in sum(names, []) and "video.proj.weight" in sum(names, [])


def test_adamw_runs_fused_and_a_resume_keeps_this_machines_kernel(tiny_recipe_args, tmp_path: Path) -> None:
    """The fused AdamW kernel where torch has one (CPU from 2.4); a checkpoint written with the
    per-tensor kernel (fused unset, as before this change) resumes with this machine's kernel."""
    run = tmp_path / "run"
    train(resolve_recipe("shapes", tiny_recipe_args("run", **{"train.max_steps": 2, "train.ckpt_every": 2,
                                                               "data.eval_split": ""}), None, False)[0], run)
    trainer_file = latest_checkpoint(run) / "trainer.pt"
    state = torch.load(trainer_file, weights_only=True)
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    torch.save(state, trainer_file)
    recipe, run_dir = resolve_recipe(None, ["train.max_steps=3"], run, True)
    trainer = Trainer(recipe, run_dir, resume=True)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    trainer.fit()
    assert trainer.state.step == 3
