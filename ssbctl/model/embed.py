"""Embedding many videos or texts with a model, in batches, without gradients; checking the result.

The one way every caller (validation, evaluation, a loaded run, the index) turns features and
captions into normalised embeddings."""

from __future__ import annotations

from typing import Any

import torch

from ssbctl.core.errors import DataError
from ssbctl.data.loader import Collate, pad_frames
from ssbctl.model.ssb import SSBModel


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
