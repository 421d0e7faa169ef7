"""Retrieval metrics: hand-checked ranks, the tie rule, several captions per video, chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssbctl.evaluation.metrics import rank_summary, retrieval_metrics, t2v_ranks, v2t_ranks


def test_perfect_embeddings_give_rank_one_everywhere() -> None:
    video = torch.eye(4)
    text = torch.eye(4)[[0, 0, 1, 2, 3]]
    m = retrieval_metrics(text, video, torch.tensor([0, 0, 1, 2, 3]))
    assert m["t2v"]["R1"] == 100.0 and m["v2t"]["R1"] == 100.0 and m["t2v"]["MdR"] == 1.0
    assert m["n_queries"] == 5 and m["n_videos"] == 4


def test_hand_computed_ranks() -> None:
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # caption 0 -> video 0 (scores 0, 1, .8): rank 3
    ranks = t2v_ranks(text, video, torch.tensor([0, 1]))  # caption 1 -> video 1 (1, 0, .6): rank 3
    assert ranks.tolist() == [3, 3]


def test_ties_count_against_the_model_and_only_once() -> None:
    video = torch.ones(5, 3) / 3 ** 0.5  # every video identical: every score ties
    text = torch.ones(2, 3) / 3 ** 0.5
    assert t2v_ranks(text, video, torch.tensor([0, 3])).tolist() == [5, 5]
    # one tie with one wrong video: rank 2, not 1 (optimistic) and not 3 (counted twice)
    video = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert t2v_ranks(torch.tensor([[1.0, 0.0]]), video, torch.tensor([0])).tolist() == [2]


def test_video_to_text_uses_the_best_caption_of_the_video() -> None:
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.1, 0.99]])  # video 0 owns captions 0 and 1
    ranks = v2t_ranks(F.normalize(text, dim=-1), video, torch.tensor([0, 0, 1]))
    # video 0: its caption 1 scores 1.0, best overall -> rank 1; its caption 0 is not a competitor
    # video 1: its caption 2 scores .995 but caption 0 (wrong) scores 1.0 -> rank 2
    assert ranks.tolist() == [1, 2]


def test_chunking_does_not_change_ranks() -> None:
    # float64: a near-tie rounded differently by another matrix shape (or CPU) cannot flip a rank
    torch.manual_seed(0)
    video = F.normalize(torch.randn(37, 8, dtype=torch.float64), dim=-1)
    owner = torch.randint(0, 37, (101,))
    text = F.normalize(video[owner] + 0.8 * torch.randn(101, 8, dtype=torch.float64), dim=-1)
    assert torch.equal(t2v_ranks(text, video, owner, chunk=7), t2v_ranks(text, video, owner, chunk=1000))
    assert torch.equal(v2t_ranks(text, video, owner, chunk=5), v2t_ranks(text, video, owner, chunk=1000))


def test_summary_values() -> None:
    s = rank_summary(torch.tensor([1, 2, 6, 11]))
    assert s == {"R1": 25.0, "R5": 50.0, "R10": 75.0, "MdR": 4.0, "MnR": 5.0}


def test_random_embeddings_are_near_chance() -> None:
    torch.manual_seed(1)
    video = F.normalize(torch.randn(200, 16), dim=-1)
    text = F.normalize(torch.randn(2000, 16), dim=-1)
    m = retrieval_metrics(text, video, torch.randint(0, 200, (2000,)))
    assert m["t2v"]["R5"] == pytest.approx(2.5, abs=1.5)
