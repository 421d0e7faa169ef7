"""A recipe's model before any training (step 0), as ``ssbctl evaluate --zero-shot`` scores it.

The model is built exactly as ``ssbctl train`` builds a fresh run's (same seed, pretrained text
weights, initial values of everything else), so its embeddings are the run's step-0 embeddings.
With the CLIP models (``model.video.kind = "mean_residual"``, ``model.text.pooling = "projected"``,
features from the text tower's CLIP) that is CLIP zero-shot: CLIP's text embedding against the
mean of CLIP's frame embeddings, the baseline every trained number can be read against.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from ssbctl.config import Recipe
from ssbctl.model.ssb import SSBModel, build_model

if TYPE_CHECKING:
    from ssbctl.data.store import ExpertStores


def zero_shot_model(recipe: Recipe, store: ExpertStores, device: torch.device) -> tuple[SSBModel, Any]:
    """The recipe's model at step 0 for ``store``'s features, in eval mode on ``device``, and its
    tokenizer. The support set and decoder are left out: they never touch the embeddings, and are
    built after both encoders, so leaving them out changes no initial value."""
    model_cfg = dataclasses.replace(recipe.model, support=dataclasses.replace(recipe.model.support, mask="none"))
    torch.manual_seed(recipe.train.seed)  # as the trainer seeds before building a fresh run's model
    model, tokenizer, _ = build_model(model_cfg, recipe.loss, store.feature_dims, [])
    return model.to(device).eval(), tokenizer
