"""Every shipped model config builds (at tiny size) with a text model of its family and trains a step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import fixtures
from ssbctl.config import LossConfig, load_model_config
from ssbctl.data.loader import Collate
from ssbctl.model.ssb import build_model
from ssbctl.paths import shipped_configs

FAMILY = {"t5": "t5", "clip": "clip"}


def _family(pretrained: str) -> str:
    return next((f for key, f in FAMILY.items() if key in pretrained), "bert")


@pytest.mark.parametrize("name", sorted(shipped_configs("models")))
def test_model_config_builds_at_tiny_size_and_takes_a_step(name: str, tmp_path: Path) -> None:
    cfg = load_model_config(name)
    text_dir = fixtures.tiny_text_model(tmp_path / "text", _family(cfg.text.pretrained))
    tiny = dataclasses.replace(
        cfg, embed_dim=16,
        video=dataclasses.replace(cfg.video, hidden_dim=16, layers=1, heads=2),
        text=dataclasses.replace(cfg.text, pretrained=str(text_dir), max_tokens=12),
        decoder=dataclasses.replace(cfg.decoder, hidden_dim=16, layers=1, heads=2))
    captions = ["a red circle moves to the left", "a big blue box spins", "a person cooks"]
    model, tokenizer, resolved = build_model(tiny, LossConfig(), (24,), captions)
    assert resolved.video.input_dims == (24,)
    items = [([torch.randn(5, 24)], c, i) for i, c in enumerate(captions)]
    batch = Collate(tokenizer, 12)(items)
    terms = model(batch)
    assert torch.isfinite(terms["loss"]) and ("caption_loss" in terms) == (cfg.support.mask != "none")
    terms["loss"].backward()
    assert model.text.proj.weight.grad is not None
    # DistributedDataParallel fails at the second step if a trainable parameter gets no gradient.
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
