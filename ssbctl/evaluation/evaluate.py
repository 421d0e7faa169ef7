"""Embedding a prepared split with a model and scoring it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ssbctl.data.loader import check_finite_features
from ssbctl.data.store import Store
from ssbctl.evaluation.metrics import DEFAULT_V2T_CONVENTION, retrieval_metrics
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


def lost_videos(store: Store, split: str) -> tuple[int, bool]:
    """How many videos of ``split`` prepare could not use, and whether the store says so: a store
    written before failures recorded their split counts every failure (``known`` False)."""
    failures = store.failures()
    if all("split" in f for f in failures):
        return sum(1 for f in failures if f["split"] == split), True
    return len(failures), False


def lost_videos_warning(store: Store, split: str) -> str | None:
    """The warning to print when ``split`` lost videos at prepare time: its gallery is then smaller
    than the protocol's, so its numbers are not comparable with published ones. None if none."""
    count, known = lost_videos(store, split)
    if not count:
        return None
    failures = store.root / "failures.jsonl"
    if known:
        n_split = len(store.split_videos(split))
        return (f"{count} video{'s' if count != 1 else ''} of split '{split}' could not be used at prepare time "
                f"(see {failures}): the gallery has {n_split} videos instead of {n_split + count}, so the "
                f"numbers are not comparable with the protocol's")
    return (f"{count} video{'s' if count != 1 else ''} of this store could not be used at prepare time (see "
            f"{failures}; the store does not record their splits): the gallery of split '{split}' may be "
            f"smaller than the protocol's, so the numbers may not be comparable with published ones")


def evaluate_split(model: SSBModel, tokenizer: Any, store: Store, split: str,
                   device: torch.device, source: str | None = None,
                   v2t_convention: str = DEFAULT_V2T_CONVENTION) -> dict[str, Any]:
    """The metrics object of DESIGN.md for one split. With ``source`` (the run, for the message),
    non-finite embeddings are a DataError; without, their scores rank last. ``v2t_convention``
    chooses the convention of ``v2t`` (see :mod:`ssbctl.evaluation.metrics`); ``lost_videos``
    counts the split's videos that prepare could not use (see :func:`lost_videos`)."""
    emb = embed_split(model, tokenizer, store, split, device)
    if source is not None:
        require_finite(source, videos=emb.video, captions=emb.text)
    metrics = retrieval_metrics(emb.text, emb.video, emb.caption_video, ks=store.ks, v2t_convention=v2t_convention)
    return {**metrics, "split": split, "lost_videos": lost_videos(store, split)[0]}
