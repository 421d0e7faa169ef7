"""Gradient accumulation that keeps the whole batch as negatives and support set (GradCache).

1. Embed every micro-batch without gradients (remembering each one's RNG state).
2. Compute the loss once on the full batch of embeddings, held as leaf tensors; its backward
   gives the decoder's and support set's gradients and dL/d(embedding) for every sample.
3. Re-embed each micro-batch with gradients (same RNG state, so the same dropout masks) and
   backpropagate the cached dL/d(embedding) through the encoders.

The loss and the gradients equal those of one full batch; encoder activations are held for one
micro-batch at a time. The cost is one extra no-grad forward pass of both encoders per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ssbctl.data.batch import Batch
from ssbctl.engine.rng import rng_states, set_rng_states
from ssbctl.objective.step import SSBObjective

Embed = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]


def accumulated_backward(objective: SSBObjective, batch: Batch, micro_batches: int,
                         scale: Callable[[torch.Tensor], torch.Tensor], autocast: Any,
                         embed: Embed | None = None) -> dict[str, torch.Tensor]:
    """Backpropagate the full-batch loss through ``micro_batches`` pieces; return the loss terms.

    ``objective`` computes the loss apart from embedding (never its own forward); ``embed`` is its
    model's ``embed`` (or that compiled, under ``train.compile``); ``scale`` is the GradScaler's
    ``scale`` (identity without fp16); ``autocast`` a context factory.
    """
    embed = embed or objective.model.embed
    size = batch.input_ids.shape[0]
    bounds = [(size * i // micro_batches, size * (i + 1) // micro_batches) for i in range(micro_batches)]
    device = batch.input_ids.device
    states, videos, texts = [], [], []
    with torch.no_grad():
        for lo, hi in bounds:
            states.append(rng_states(device))
            with autocast():
                v, t = embed(batch.slice(lo, hi))
            videos.append(v)
            texts.append(t)
    after = rng_states(device)
    video = torch.cat(videos).detach().requires_grad_(True)  # (B, D) leaves
    text = torch.cat(texts).detach().requires_grad_(True)
    with autocast():
        terms = objective.loss_from_embeddings(video, text, batch)
    scale(terms["loss"]).backward()
    assert video.grad is not None and text.grad is not None  # leaves that the loss used
    for (lo, hi), state in zip(bounds, states):
        set_rng_states(state)
        with autocast():
            v, t = embed(batch.slice(lo, hi))
        torch.autograd.backward([v, t], [video.grad[lo:hi], text.grad[lo:hi]])
    set_rng_states(after)
    return terms
