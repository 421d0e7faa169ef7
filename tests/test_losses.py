"""Loss values against hand-computed references on small tensors.

The references are Python floats (float64); the losses run on float64 tensors too, so the
comparison does not depend on how a CPU rounds fp32 (exp, log and sums in another order)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssbctl.config import LossConfig
from ssbctl.objective.losses import SSBLoss, caption_loss, infonce_loss, max_margin_loss


def _f64(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _reference_infonce(t: list[list[float]], v: list[list[float]], ids: list[int], scale: float) -> float:
    n = len(t)
    s = [[scale * sum(a * b for a, b in zip(t[i], v[j])) for j in range(n)] for i in range(n)]
    t2v = v2t = 0.0
    for i in range(n):
        row = [math.exp(s[i][j]) for j in range(n)]
        t2v += -math.log(sum(row[j] for j in range(n) if ids[j] == ids[i]) / sum(row))
        col = [math.exp(s[j][i]) for j in range(n)]
        v2t += -math.log(sum(col[j] for j in range(n) if ids[j] == ids[i]) / sum(col))
    return 0.5 * (t2v / n + v2t / n)


def test_infonce_matches_hand_computation_with_distinct_videos() -> None:
    t = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    v = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    got = infonce_loss(_f64(t), _f64(v), torch.tensor([0, 1, 2]), _f64(10.0))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_reference_infonce(t, v, [0, 1, 2], 10.0), rel=1e-12)


def test_infonce_two_captions_of_one_video_are_positives_not_negatives() -> None:
    t = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    v = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # pairs 0 and 1 show the same video
    ids = [5, 5, 9]
    got = infonce_loss(_f64(t), _f64(v), torch.tensor(ids), _f64(5.0))
    assert got.item() == pytest.approx(_reference_infonce(t, v, ids, 5.0), rel=1e-12)
    as_negatives = infonce_loss(_f64(t), _f64(v), torch.tensor([0, 1, 2]), _f64(5.0))
    assert got.item() < as_negatives.item()


def test_max_margin_matches_hand_computation() -> None:
    t = _f64([[1.0, 0.0], [0.0, 1.0]])
    v = _f64([[0.6, 0.8], [1.0, 0.0]])
    # sims: s00=.6 s01=1, s10=.8 s11=0; margin .2
    # t2v: i=0: [.2+1-.6]=.6 ; i=1: [.2+.8-0]=1.0 ; v2t: video0: [.2+.8-.6]=.4 ; video1: [.2+1-0]=1.2
    expected = (0.6 + 1.0 + 0.4 + 1.2) / 2
    got = max_margin_loss(t, v, torch.tensor([0, 1]), 0.2)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_caption_loss_ignores_padding() -> None:
    logits = _f64([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    targets = torch.tensor([[0, -100]])
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2))
    assert caption_loss(logits, targets).item() == pytest.approx(expected, rel=1e-12)


def test_ssb_loss_adds_weighted_caption_term_and_clamps_temperature() -> None:
    t = F.normalize(torch.randn(4, 3), dim=-1)
    v = F.normalize(torch.randn(4, 3), dim=-1)
    ids = torch.arange(4)
    logits, targets = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))
    loss = SSBLoss(LossConfig(caption_weight=0.5, max_logit_scale=20.0))
    out = loss(t, v, ids, torch.tensor(math.log(1000.0)), logits, targets)
    assert set(out) == {"loss", "contrastive_loss", "caption_loss"}
    total = out["contrastive_loss"].item() + 0.5 * out["caption_loss"].item()
    assert out["loss"].item() == pytest.approx(total, rel=1e-6)
    assert out["contrastive_loss"].item() == pytest.approx(infonce_loss(t, v, ids, torch.tensor(20.0)).item(), rel=1e-6)
    only = loss(t, v, ids, torch.tensor(0.0))
    assert set(only) == {"loss", "contrastive_loss"}


@pytest.mark.parametrize("contrastive", ["infonce", "max_margin"])
def test_contrastive_similarities_stay_fp32_under_autocast(contrastive: str) -> None:
    """AMP must not round the (B, B) similarities: bf16 logits near a scale of 100 are 0.5 apart."""
    torch.manual_seed(0)
    t = F.normalize(torch.randn(16, 64), dim=-1)
    v = F.normalize(torch.randn(16, 64), dim=-1)
    loss = SSBLoss(LossConfig(contrastive=contrastive, max_logit_scale=100.0))
    scale = torch.tensor(math.log(100.0))
    reference = loss(t, v, torch.arange(16), scale)["contrastive_loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(t, v, torch.arange(16), scale)["contrastive_loss"]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-6)
