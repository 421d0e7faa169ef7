"""Embedding a prepared split with a model and scoring it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ssbctl.data.loader import Collate, pad_frames
from ssbctl.data.store import FeatureStore
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
    result = SplitEmbeddings(
        video=embed_features(model, store.load_experts(videos), device),
        text=embed_texts(model, tokenizer, [c["caption"] for c in captions], device),
        caption_video=torch.tensor([row[c["video_id"]] for c in captions], dtype=torch.long),
        video_ids=[v["video_id"] for v in videos], video_paths=[v["path"] for v in videos],
        captions=[c["caption"] for c in captions])
    model.train(was_training)
    return result


def evaluate_split(model: SSBModel, tokenizer: Any, store: FeatureStore, split: str,
                   device: torch.device) -> dict[str, Any]:
    """The metrics object of DESIGN.md for one split."""
    emb = embed_split(model, tokenizer, store, split, device)
    return {**retrieval_metrics(emb.text, emb.video, emb.caption_video, ks=store.ks), "split": split}
