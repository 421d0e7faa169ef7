"""Accumulating over micro-batches keeps the contrastive batch: same loss, same gradients.

The two ways sum in different orders; fp32 rounding of that order differs between CPUs, so the
comparison runs both sides in float64, where it sits far below the tolerance."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ssbctl.config import load_recipe
from ssbctl.data.batch import Batch
from ssbctl.data.loader import Collate, PairDataset
from ssbctl.data.store import FeatureStore
from ssbctl.engine.accumulate import accumulated_backward
from ssbctl.model.ssb import build_model
from ssbctl.objective.step import SSBObjective
from ssbctl.training import train


@pytest.mark.parametrize("mask", ["cross", "identity", "none"])
def test_four_micro_batches_equal_one_full_batch(shapes_store: Path, tiny_text_model: Path, mask: str) -> None:
    recipe = load_recipe("shapes", [f'model.text.pretrained="{tiny_text_model}"', "model.text.trainable_layers=-1",
                                    "model.embed_dim=32", "model.video.hidden_dim=32", "model.video.heads=2",
                                    "model.decoder.hidden_dim=32", "model.decoder.heads=2", "model.text.max_tokens=16",
                                    f'model.support.mask="{mask}"'])
    data = PairDataset(FeatureStore(shapes_store), "train")
    torch.manual_seed(0)
    model, tokenizer, _ = build_model(recipe.model, recipe.loss, (192,), data.captions)
    model.eval()  # no dropout: both ways must see the same network
    model.double()
    batch = _double(Collate(tokenizer, 16)([data[i] for i in range(16)]))
    objective = SSBObjective(model, recipe.loss)

    full = objective(batch)
    full["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    terms = accumulated_backward(objective, batch, 4, lambda x: x, contextlib.nullcontext)
    for key in full:
        assert terms[key].item() == pytest.approx(full[key].item(), rel=1e-9)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], ref[name], rtol=1e-7, atol=1e-10, msg=name)


def _double(batch: Batch) -> Batch:
    """``batch`` with float64 frame features (the model was cast with ``.double()``)."""
    return dataclasses.replace(batch, video=[v.double() for v in batch.video])


def test_training_with_accumulation_runs(tiny_recipe_args, tmp_path: Path) -> None:
    recipe = load_recipe("shapes", tiny_recipe_args("acc", **{"train.accum_steps": 4, "train.max_steps": 3}))
    assert train(recipe, tmp_path / "acc")["steps"] == 3


def test_compile_with_accumulation_compiles_what_accumulation_runs(tiny_recipe_args, tmp_path: Path) -> None:
    """Accumulation embeds with the model's embed, not the wrapped forward: under train.compile
    that embed is the compiled one (it once ran uncompiled, silently), and training with it gives
    the losses of the uncompiled run."""
    from ssbctl.engine.trainer import Trainer

    args = tiny_recipe_args("acc", **{"train.accum_steps": 2, "train.max_steps": 1, "train.log_every": 1})
    # The eager backend: dynamo traces and runs the graph as it is (inductor would spend minutes compiling).
    losses = []
    for name, extra in (("compiled", ["train.compile=true", 'train.compile_backend="eager"']), ("plain", [])):
        trainer = Trainer(load_recipe("shapes", args + extra), tmp_path / name)  # seeds everything it draws
        if extra:
            assert trainer.model is trainer.objective  # nothing compiled that would never run
            assert hasattr(trainer.embed, "_torchdynamo_orig_callable")  # what accumulation runs is compiled
        else:
            assert trainer.embed == trainer.module.embed
        trainer.fit()
        rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if "loss" in r])
    assert losses[0] and losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)
