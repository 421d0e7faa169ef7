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
    hinges = 0.6 + 1.0 + 0.4 + 1.2
    summed = max_margin_loss(t, v, torch.tensor([0, 1]), 0.2, "sum")
    assert summed.item() == pytest.approx(hinges / 2, rel=1e-12)  # over negatives, divided by B = 2
    mean = max_margin_loss(t, v, torch.tensor([0, 1]), 0.2, "mean")
    assert mean.item() == pytest.approx(hinges / 4, rel=1e-12)  # over the 2B(B-1) = 4 negative hinges


def test_max_margin_mean_counts_only_pairs_of_other_videos() -> None:
    """Captions 0 and 1 show the same video: (0, 1) and (1, 0) are neither positives nor negatives,
    so 4 ordered pairs of other videos remain, 8 hinges in all."""
    t = _f64([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    v = _f64([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([5, 5, 9])
    # sims s_ij = t_i . v_j: row 0: 1, 1, 0; row 1: .8, .8, .6; row 2: 0, 0, 1; margin .5
    # t2v (caption i vs video j): (0,2) [.5+0-1]=0 ; (1,2) [.5+.6-.8]=.3 ; (2,0) [.5+0-1]=0 ; (2,1) 0
    # v2t (video i vs caption j): (0,2) [.5+s20-s00]=0 ; (1,2) [.5+s21-s11]=0 ; (2,0) [.5+s02-s22]=0 ;
    #     (2,1) [.5+s12-s22]=[.5+.6-1]=.1
    hinges = 0.3 + 0.1
    got = max_margin_loss(t, v, ids, 0.5, "mean")
    assert got.item() == pytest.approx(hinges / 8, rel=1e-12)
    assert max_margin_loss(t, v, ids, 0.5, "sum").item() == pytest.approx(hinges / 3, rel=1e-12)


def _hinge_at_batch(batch: int, reduction: str | None, draws: int = 8) -> float:
    """The max-margin term through SSBLoss on random normalised embeddings (D = 256), averaged over
    ``draws`` seeds; ``reduction`` None: the configured default."""
    extra = {} if reduction is None else {"margin_reduction": reduction}
    loss = SSBLoss(LossConfig(contrastive="max_margin", margin=0.2, **extra))
    values = []
    for seed in range(draws):
        gen = torch.Generator().manual_seed(seed)
        t = F.normalize(torch.randn(batch, 256, generator=gen, dtype=torch.float64), dim=-1)
        v = F.normalize(torch.randn(batch, 256, generator=gen, dtype=torch.float64), dim=-1)
        values.append(loss(t, v, torch.arange(batch), torch.tensor(0.0))["contrastive_loss"].item())
    return sum(values) / draws


def test_max_margin_default_scale_does_not_grow_with_the_batch() -> None:
    """Doubling B leaves the (default) hinge term's scale unchanged, so ``caption_weight`` means the
    same at every batch size. On random embeddings each hinge is ``[0.2 + s_ij - s_ii]_+`` with
    similarities of spread 1/16, so its expectation (about 0.2) does not depend on B; the mean of
    8 draws of 2B(B-1) >= 8064 hinges is within a fraction of a percent of it. 5% leaves room for
    that noise and still fails the former reduction (a sum over negatives over B), which is
    about 2(B-1) times the mean: 25 at B = 64 and 51 at B = 128, a ratio of 2.0."""
    small, large = _hinge_at_batch(64, None), _hinge_at_batch(128, None)
    assert large / small == pytest.approx(1.0, abs=0.05), (small, large)
    assert small == pytest.approx(0.2, rel=0.1)


def test_max_margin_sum_reduction_is_kept_and_grows_with_the_batch() -> None:
    """``loss.margin_reduction = "sum"`` keeps the former scale (for old runs and comparisons)."""
    small, large = _hinge_at_batch(64, "sum"), _hinge_at_batch(128, "sum")
    assert small / _hinge_at_batch(64, "mean") == pytest.approx(2 * 63, rel=1e-9)
    assert large / small == pytest.approx(2 * 127 / (2 * 63), rel=0.05)


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
