"""Every shipped model config builds (at tiny size) with a text model of its family and trains a
step, under each contrastive loss and support mask, with every trainable parameter used."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ssbctl.config import LossConfig, load_model_config
from ssbctl.core.paths import shipped_configs
from ssbctl.data.loader import Collate
from ssbctl.model.ssb import build_model
from ssbctl.objective.step import SSBObjective

import fixtures

FAMILY = {"t5": "t5", "clip": "clip"}
# What feeds mean_residual's zero-initialised output projection (video.proj): the temporal transformer.
RESIDUAL = ("video.inputs.", "video.position", "video.expert_type", "video.transformer.", "video.norm.")
CAPTIONS = ["a red circle moves to the left", "a big blue box spins", "a person cooks", "a man cooks"]


def _family(pretrained: str) -> str:
    return next((f for key, f in FAMILY.items() if key in pretrained), "bert")


@pytest.fixture(scope="module")
def text_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random text model per family, built once for the module."""
    root = tmp_path_factory.mktemp("text_models")
    return {family: fixtures.tiny_text_model(root / family, family) for family in ("bert", "t5", "clip")}


@pytest.mark.parametrize("mask", ["config", "none", "identity", "full"])
@pytest.mark.parametrize("contrastive", ["infonce", "max_margin"])
@pytest.mark.parametrize("name", sorted(shipped_configs("models")))
def test_model_config_builds_at_tiny_size_and_every_trainable_parameter_learns(
        name: str, contrastive: str, mask: str, text_models: dict[str, Path]) -> None:
    """DistributedDataParallel fails the second step when a trainable parameter gets no gradient
    from the objective, so every one must get a gradient under every loss and mask (the learned
    temperature once got none under max-margin, which every real-dataset recipe uses). One that
    can only ever get an exactly-zero gradient is dead weight and must be frozen instead."""
    cfg = load_model_config(name)
    support = cfg.support if mask == "config" else dataclasses.replace(cfg.support, mask=mask)
    tiny = dataclasses.replace(
        cfg, embed_dim=16, support=support,
        video=dataclasses.replace(cfg.video, hidden_dim=16, layers=1, heads=2),
        text=dataclasses.replace(cfg.text, pretrained=str(text_models[_family(cfg.text.pretrained)]), max_tokens=12),
        decoder=dataclasses.replace(cfg.decoder, hidden_dim=16, layers=1, heads=2))
    torch.manual_seed(0)
    loss = LossConfig(contrastive=contrastive)
    main = 3 * 4 * 4  # 4x4 pixels: what a pixel stem (`conv`, `cnn`) reads, a plain vector to a Linear
    model, tokenizer, resolved = build_model(tiny, loss, (main, 12), CAPTIONS)
    assert resolved.video.input_dims == (main, 12)
    items = [([torch.randn(5, main), torch.randn(3, 12)], c, i // 2) for i, c in enumerate(CAPTIONS)]
    batch = Collate(tokenizer, 12)(items)
    terms = SSBObjective(model, loss)(batch)
    assert torch.isfinite(terms["loss"]) and ("caption_loss" in terms) == (support.mask != "none")
    terms["loss"].backward()
    assert model.text.proj.weight.grad is not None
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"trainable but no gradient (DDP would fail the second step): {unused}"
    dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum()]
    # mean_residual's temporal transformer feeds a zero-initialised projection (step 0 is the frames'
    # mean): at step 0 alone its gradient is exactly zero. After one update it must be a real one.
    starts_at_zero = [n for n in dead if tiny.video.kind == "mean_residual" and n.startswith(RESIDUAL)]
    assert dead == starts_at_zero, f"trainable but an exactly-zero gradient: {dead}"
    if starts_at_zero:
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        model.zero_grad()
        SSBObjective(model, loss)(batch)["loss"].backward()
        dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum()]
        assert not dead, f"trainable but an exactly-zero gradient after one step: {dead}"
    assert model.log_logit_scale.requires_grad == (contrastive == "infonce")
    assert (model.temperature is None) == (contrastive == "max_margin")
