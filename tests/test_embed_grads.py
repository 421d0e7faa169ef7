"""The loss terms' gradient norms on the shared embeddings, logged in metrics.jsonl (issue 11 §2).

Measured with ``torch.autograd.grad`` on logged steps only: the fields must be there, finite, zero
for a caption term of weight 0, the same with gradient accumulation, and the measurement must not
change what trains. (One process against two: tests/test_recipes_distributed.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ssbctl.config import LossConfig, load_recipe
from ssbctl.core.io import read_jsonl
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.engine.run import read_run_recipe
from ssbctl.objective.grad_norms import CAPTION_KEY, CONTRASTIVE_KEY, RATIO_KEY, embedding_grad_norms
from ssbctl.objective.losses import SSBLoss
from ssbctl.training import train

KEYS = (CONTRASTIVE_KEY, CAPTION_KEY, RATIO_KEY)
# Deterministic forward passes (no dropout: frozen text model, dropout 0), so that runs can be compared.
STILL = {"model.text.trainable_layers": 0, "model.video.dropout": 0.0, "model.decoder.dropout": 0.0,
         "data.eval_split": ""}


def _rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("contrastive", ["infonce", "max_margin"])
def test_metrics_log_finite_gradient_norms_of_both_terms(tiny_recipe_args, tmp_path: Path, contrastive: str) -> None:
    recipe = load_recipe("shapes", tiny_recipe_args("run", **{"train.max_steps": 3, "loss.contrastive": contrastive,
                                                               "data.eval_split": ""}))
    train(recipe, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert all(isinstance(row[k], float) and math.isfinite(row[k]) for k in KEYS), row
        assert row[CONTRASTIVE_KEY] > 0 and row[CAPTION_KEY] > 0
        assert row[RATIO_KEY] == pytest.approx(row[CAPTION_KEY] / row[CONTRASTIVE_KEY], rel=1e-6)


def test_caption_weight_zero_gives_a_zero_caption_gradient(tiny_recipe_args, tmp_path: Path) -> None:
    recipe = load_recipe("shapes", tiny_recipe_args("run", **{"train.max_steps": 2, "loss.caption_weight": 0.0,
                                                               "data.eval_split": ""}))
    train(recipe, tmp_path / "run")
    for row in _rows(tmp_path / "run"):
        assert row["caption_loss"] > 0  # the term is computed, with no weight
        assert row[CAPTION_KEY] == 0.0 and row[RATIO_KEY] == 0.0 and row[CONTRASTIVE_KEY] > 0


def test_only_logged_steps_are_measured_and_measuring_changes_nothing(tiny_recipe_args, tmp_path: Path) -> None:
    """log_every = 1 measures every step, 3 only steps 3 and 6: the weights are bit-identical."""
    for name, every in (("every", 1), ("some", 3)):
        train(load_recipe("shapes", tiny_recipe_args(name, **{**STILL, "train.max_steps": 6,
                                                               "train.log_every": every})), tmp_path / name)
    assert [r["step"] for r in _rows(tmp_path / "some")] == [3, 6]
    every = {r["step"]: r for r in _rows(tmp_path / "every")}
    for row in _rows(tmp_path / "some"):  # the norm of the logged step itself, not a window's mean
        for key in KEYS:
            assert row[key] == pytest.approx(every[row["step"]][key], rel=1e-6), key
    a, b = (load_file(str(latest_checkpoint(tmp_path / n) / "model.safetensors")) for n in ("every", "some"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_measures_the_same_norms_as_one_batch(tiny_recipe_args, tmp_path: Path) -> None:
    for name, accum in (("one", 1), ("four", 4)):
        train(load_recipe("shapes", tiny_recipe_args(name, **{**STILL, "train.max_steps": 2,
                                                               "train.accum_steps": accum})), tmp_path / name)
    for a, b in zip(_rows(tmp_path / "one"), _rows(tmp_path / "four"), strict=True):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["step"])


def test_norms_are_those_of_each_term_on_the_embeddings_whatever_the_loss_scale() -> None:
    """Against the gradients of each term alone (float64); an fp16 loss scale is divided back out."""
    gen = torch.Generator().manual_seed(0)
    video = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1).requires_grad_(True)
    logits = (video @ torch.randn(8, 5 * 7, generator=gen, dtype=torch.float64)).view(6, 5, 7)
    targets = torch.randint(0, 7, (6, 5), generator=gen)
    loss = SSBLoss(LossConfig(contrastive="max_margin", caption_weight=0.5))
    terms = loss(text, video, torch.arange(6), torch.tensor(0.0), logits, targets)
    plain = embedding_grad_norms(terms, 0.5, (video, text))
    scaled = embedding_grad_norms(terms, 0.5, (video, text), scale=65536.0)
    gv, gt = torch.autograd.grad(terms["contrastive_loss"], (video, text), retain_graph=True)
    (cv,) = torch.autograd.grad(0.5 * terms["caption_loss"], (video,), retain_graph=True)
    assert plain[CONTRASTIVE_KEY].item() == pytest.approx(math.sqrt(gv.square().sum() + gt.square().sum()), rel=1e-12)
    assert plain[CAPTION_KEY].item() == pytest.approx(cv.norm().item(), rel=1e-12)
    for key in KEYS:
        assert scaled[key].item() == pytest.approx(plain[key].item(), rel=1e-12)
    terms["loss"].backward()  # the graph is kept for the training backward
    assert video.grad is not None


def test_a_run_written_before_margin_reduction_keeps_its_summed_hinge(tiny_recipe_args, tmp_path: Path) -> None:
    """Its recipe.toml has no loss.margin_reduction: it trained with the sum, and resumes with it."""
    train(load_recipe("shapes", tiny_recipe_args("run", **{"train.max_steps": 1, "loss.contrastive": "max_margin",
                                                           "data.eval_split": ""})), tmp_path / "run")
    recipe_file = tmp_path / "run" / "recipe.toml"
    assert read_run_recipe(tmp_path / "run").loss.margin_reduction == "mean"
    recipe_file.write_text("".join(line for line in recipe_file.read_text().splitlines(keepends=True)
                                   if not line.startswith("margin_reduction")))
    assert read_run_recipe(tmp_path / "run").loss.margin_reduction == "sum"
