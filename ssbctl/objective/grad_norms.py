"""How hard each loss term pulls on the shared embeddings: the gradient norms that ``metrics.jsonl`` logs.

The contrastive and caption terms meet only in the video and text embeddings. The norm of each
term's gradient with respect to them (the caption term with its ``caption_weight``) says whether
the caption objective does anything next to the contrastive one, whatever the two losses' values.
It is measured on logged steps only: two extra backward passes through the loss (not through the
encoders), with ``torch.autograd.grad``, so no parameter's ``.grad`` is touched and training is
exactly what it would be without the measurement.

Distributed, the embeddings of every rank are gathered with a backward that sums every rank's
gradient (:func:`ssbctl.core.distributed.gather_with_grad`), and the caption loss's gradient is its
rank's share times the world size: both terms' gradients on a rank's embeddings are the world size
times those of the global loss. Dividing by it and summing the squares over ranks gives the norm
over the global batch, the same number one process computes for the same batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ssbctl.core.distributed import world

# The metrics.jsonl fields: ||dL_contrastive / d(video, text)||, ||caption_weight * dL_caption / d(video, text)||
# over the global batch's embeddings, and the second over the first.
CONTRASTIVE_KEY = "embed_grad_contrastive"
CAPTION_KEY = "embed_grad_caption"
RATIO_KEY = "embed_grad_ratio"


@torch.compiler.disable  # autograd.grad inside a compiled forward: run this part eagerly
def embedding_grad_norms(terms: dict[str, torch.Tensor], caption_weight: float,
                         embeddings: tuple[torch.Tensor, ...], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The norms of each term's gradient on ``embeddings`` (this rank's ``(B, D)`` video and text).

    ``terms`` are the objective's (their graphs are kept for the training backward); ``scale`` is the
    fp16 loss scale, applied to the backward and divided out (a gradient that underflows fp16
    unscaled is as small in the norm as in training). A term missing from ``terms`` (no caption
    loss without a support set) has norm 0. Every rank must call this at the same step: the
    backward of the gather is a collective."""
    _, size = world()
    device = embeddings[0].device
    embeddings = tuple(e for e in embeddings if e.requires_grad)  # a frozen side has no gradient to measure
    squares = []
    for term, weight in ((terms.get("contrastive_loss"), 1.0), (terms.get("caption_loss"), caption_weight)):
        if term is None or not term.requires_grad or not embeddings:
            squares.append(torch.zeros((), dtype=torch.float64, device=device))
            continue
        grads = torch.autograd.grad(term * (weight * scale), embeddings, retain_graph=True, allow_unused=True)
        squares.append(sum(((g.double() / (scale * size)).square().sum() for g in grads if g is not None),
                           torch.zeros((), dtype=torch.float64, device=device)))
    total = torch.stack(squares)
    if size > 1:
        dist.all_reduce(total)
    contrastive, caption = total.sqrt().unbind()
    return {CONTRASTIVE_KEY: contrastive, CAPTION_KEY: caption, RATIO_KEY: caption / contrastive}


def as_metrics(norms: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """The norms as JSON numbers; one that is not finite (an fp16 overflow, a ratio over a zero
    contrastive gradient) is None, since JSON has no Infinity or NaN."""
    out: dict[str, float | None] = {}
    for key, value in norms.items():
        number = float(value)
        out[key] = number if math.isfinite(number) else None
    return out
