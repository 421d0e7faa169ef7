"""Retrieval metrics and the evaluation protocol (text-to-video and video-to-text)."""

from ssbctl.evaluation.metrics import (
                                       DEFAULT_V2T_CONVENTION,
                                       V2T_CONVENTIONS,
                                       rank_summary,
                                       retrieval_metrics,
                                       t2v_ranks,
                                       v2t_group_max_ranks,
                                       v2t_ranks,
)

__all__ = ["DEFAULT_V2T_CONVENTION", "V2T_CONVENTIONS", "rank_summary", "retrieval_metrics", "t2v_ranks",
           "v2t_group_max_ranks", "v2t_ranks"]
