"""Embedding a prepared split with a model and scoring it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ssbctl.data.loader import check_finite_features
from ssbctl.data.store import Store
from ssbctl.evaluation.metrics import retrieval_metrics
from ssbctl.model.embed import embed_features, embed_texts, require_finite
from ssbctl.model.ssb import SSBModel


@dataclass
class SplitEmbeddings:
    """Normalised embeddings of one split."""

    video: torch.Tensor  # (Nv, D)
    text: torch.Tensor  # (Nc, D)
    caption_video: torch.Tensor  # (Nc,) row of each caption's video


@torch.no_grad()
def embed_split(model: SSBModel, tokenizer: Any, store: Store, split: str,
                device: torch.device) -> SplitEmbeddings:
    """Embed every video and caption of ``split``."""
    was_training = model.training
    model.eval()
    videos = store.split_videos(split)
    row = {v["video_id"]: i for i, v in enumerate(videos)}
    captions = [c for c in store.split_captions(split) if c["video_id"] in row]
    features = store.load_experts(videos)
    check_finite_features(store, videos, features, split)
    result = SplitEmbeddings(
        video=embed_features(model, features, device),
        text=embed_texts(model, tokenizer, [c["caption"] for c in captions], device),
        caption_video=torch.tensor([row[c["video_id"]] for c in captions], dtype=torch.long))
    model.train(was_training)
    return result


def evaluate_split(model: SSBModel, tokenizer: Any, store: Store, split: str,
                   device: torch.device, source: str | None = None) -> dict[str, Any]:
    """The metrics object of DESIGN.md for one split. With ``source`` (the run, for the message),
    non-finite embeddings are a DataError; without, their scores rank last."""
    emb = embed_split(model, tokenizer, store, split, device)
    if source is not None:
        require_finite(source, videos=emb.video, captions=emb.text)
    return {**retrieval_metrics(emb.text, emb.video, emb.caption_video, ks=store.ks), "split": split}
