"""Embedding a prepared split with a model and scoring it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ssbctl.data.loader import Collate, check_finite_features, pad_frames
from ssbctl.data.store import FeatureStore
from ssbctl.errors import DataError
from ssbctl.evaluation.metrics import retrieval_metrics
from ssbctl.model.ssb import SSBModel


@dataclass
class SplitEmbeddings:
    """Normalised embeddings of one split."""

    video: torch.Tensor  # (Nv, D)
    text: torch.Tensor  # (Nc, D)
    caption_video: torch.Tensor  # (Nc,) row of each caption's video
    video_ids: list[str]
    video_paths: list[str]
    captions: list[str]


@torch.no_grad()
def embed_features(model: SSBModel, features: list[list[torch.Tensor]], device: torch.device,
                   batch_size: int = 256) -> torch.Tensor:
    """Video embeddings ``(N, D)`` on the CPU from ``features[expert][video]`` of ``(T, dim)``."""
    out = []
    for start in range(0, len(features[0]), batch_size):
        padded = [pad_frames(expert[start:start + batch_size]) for expert in features]
        out.append(model.encode_video([f.to(device) for f, _ in padded], [m.to(device) for _, m in padded]).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


@torch.no_grad()
def embed_texts(model: SSBModel, tokenizer: Any, captions: list[str], device: torch.device,
                batch_size: int = 256) -> torch.Tensor:
    """Text embeddings ``(N, D)`` on the CPU."""
    collate = Collate(tokenizer, model.cfg.text.max_tokens)
    out = []
    for start in range(0, len(captions), batch_size):
        ids, mask = collate.tokenize(captions[start:start + batch_size])
        out.append(model.encode_text(ids.to(device), mask.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


@torch.no_grad()
def embed_split(model: SSBModel, tokenizer: Any, store: FeatureStore, split: str,
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
        caption_video=torch.tensor([row[c["video_id"]] for c in captions], dtype=torch.long),
        video_ids=[v["video_id"] for v in videos], video_paths=[v["path"] for v in videos],
        captions=[c["caption"] for c in captions])
    model.train(was_training)
    return result


def nonfinite_rows(embeddings: torch.Tensor) -> int:
    """How many rows of ``(N, D)`` embeddings hold a NaN or an Inf."""
    return int((~torch.isfinite(embeddings)).any(dim=1).sum()) if embeddings.numel() else 0


def require_finite(source: str, **embeddings: torch.Tensor) -> None:
    """Raise a DataError naming ``source`` (the run and checkpoint) when any embedding is not finite:
    scores of such a model mean nothing. Keywords name the kinds (``videos=..., captions=...``)."""
    counts = {kind: (nonfinite_rows(e), len(e)) for kind, e in embeddings.items()}
    if any(bad for bad, _ in counts.values()):
        what = " and ".join(f"{bad} of {total} {kind}" for kind, (bad, total) in counts.items() if bad)
        raise DataError(f"{source} gives non-finite (NaN or Inf) embeddings for {what}; "
                        f"its weights are broken: use another checkpoint or train again")


def evaluate_split(model: SSBModel, tokenizer: Any, store: FeatureStore, split: str,
                   device: torch.device, source: str | None = None) -> dict[str, Any]:
    """The metrics object of DESIGN.md for one split. With ``source`` (the run, for the message),
    non-finite embeddings are a DataError; without, their scores rank last."""
    emb = embed_split(model, tokenizer, store, split, device)
    if source is not None:
        require_finite(source, videos=emb.video, captions=emb.text)
    return {**retrieval_metrics(emb.text, emb.video, emb.caption_video, ks=store.ks), "split": split}
