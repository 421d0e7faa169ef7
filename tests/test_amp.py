"""The AMP code path (autocast, GradScaler and its checkpointed state), exercised on the CPU.

The trainer autocasts only on CUDA. Here it is allowed to autocast on the CPU (slow, but the
model is tiny) so that the same lines run where CI runs; the GPU numbers come from
benchmarks/device_check.sh."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import ssbctl.engine.trainer as trainer_module
from ssbctl.config import load_recipe
from ssbctl.core.io import read_jsonl
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.engine.trainer import Trainer
from ssbctl.training import train


@pytest.fixture
def cpu_amp(monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    monkeypatch.setattr(trainer_module, "amp_dtype", lambda precision, device: dtypes.get(precision))


def test_bf16_and_fp16_losses_match_fp32_and_the_scaler_state_resumes(cpu_amp: None, tiny_recipe_args,
                                                                       tmp_path: Path) -> None:
    rows = {}
    for precision in ("fp32", "bf16", "fp16"):
        recipe = load_recipe("shapes", tiny_recipe_args(precision, **{
            "train.precision": precision, "train.max_steps": 2, "data.eval_split": "", "model.video.dropout": 0.0,
            "model.decoder.dropout": 0.0}))
        train(recipe, tmp_path / precision)
        rows[precision] = [r for r in read_jsonl(tmp_path / precision / "metrics.jsonl") if "loss" in r]
    for precision in ("bf16", "fp16"):
        for key in ("loss", "contrastive_loss", "caption_loss"):
            assert rows[precision][0][key] == pytest.approx(rows["fp32"][0][key], rel=2e-2), (precision, key)
    assert rows["bf16"][0]["grad_norm"] == pytest.approx(rows["fp32"][0]["grad_norm"], rel=2e-2)
    for precision in ("bf16", "fp16"):  # the terms' gradients on the embeddings: autocast, fp16 scale divided out
        for key in ("embed_grad_contrastive", "embed_grad_caption"):
            assert rows[precision][0][key] == pytest.approx(rows["fp32"][0][key], rel=2e-2), (precision, key)
    # fp16 starts at a loss scale of 2**16; gradients that overflow skip the update and halve it.
    assert rows["fp16"][0]["loss_scale"] in (2.0**16, 2.0**15) and math.isfinite(rows["fp16"][-1]["grad_norm"])
    assert "loss_scale" not in rows["bf16"][0]

    saved = torch.load(latest_checkpoint(tmp_path / "fp16") / "trainer.pt", weights_only=True)["scaler"]
    assert saved["scale"] > 1.0, "fp16 trains with a loss scale"
    assert torch.load(latest_checkpoint(tmp_path / "bf16") / "trainer.pt", weights_only=True)["scaler"] == {}
    resumed = load_recipe("shapes", tiny_recipe_args("fp16", **{"train.precision": "fp16", "train.max_steps": 3,
                                                                "data.eval_split": ""}))
    trainer = Trainer(resumed, tmp_path / "fp16", resume=True)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == saved["scale"]
    assert trainer.fit()["steps"] == 3
