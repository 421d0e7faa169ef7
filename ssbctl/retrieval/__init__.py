"""Video search indexes: build from a run and prepared data, exact top-k search."""

from ssbctl.retrieval.index import Index
from ssbctl.retrieval.scan import topk_search

__all__ = ["Index", "topk_search"]
