"""Retrieval metrics and the evaluation protocol (text-to-video and video-to-text)."""

from ssbctl.evaluation.metrics import rank_summary, retrieval_metrics, t2v_ranks, v2t_ranks

__all__ = ["rank_summary", "retrieval_metrics", "t2v_ranks", "v2t_ranks"]
