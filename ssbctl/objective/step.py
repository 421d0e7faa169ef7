"""The training objective as one module: the model's outputs turned into named loss terms.

``SSBObjective(model, loss_cfg)(batch)`` embeds the batch with the model, gathers the embeddings
of every rank (with gradients), reconstructs each caption from the support set and returns
``{"loss", "contrastive_loss"[, "caption_loss"]}``. The engine wraps *this* module in
DistributedDataParallel / ``torch.compile``: one forward uses every trained parameter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssbctl.config import LossConfig
from ssbctl.core.distributed import gather_no_grad, gather_with_grad, global_offset
from ssbctl.data.batch import Batch
from ssbctl.model.ssb import SSBModel
from ssbctl.objective.grad_norms import embedding_grad_norms
from ssbctl.objective.losses import SSBLoss


class SSBObjective(nn.Module):
    """``model`` (a submodule: its parameters are this module's) and the SSB loss of ``cfg``.

    Its state dict is the model's under a ``model.`` prefix; checkpoints save the model itself.
    """

    def __init__(self, model: SSBModel, cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.loss = SSBLoss(cfg)
        # Set before a forward to measure each term's gradient norm on the embeddings in it (the value
        # is the fp16 loss scale, 1.0 without one; None: no measurement); read with take_grad_norms.
        self.grad_probe: float | None = None
        self.grad_norms: dict[str, torch.Tensor] = {}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss", "contrastive_loss"[, "caption_loss"]}`` for one batch.

        Under torchrun the embeddings of all ranks are gathered (with gradients), so negatives and
        the support set span the global batch; each rank decodes its own captions.
        """
        return self.loss_from_embeddings(*self.model.embed(batch), batch)

    def loss_from_embeddings(self, video: torch.Tensor, text: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss terms given the batch's embeddings ``(B, D)`` (gradient accumulation computes
        them apart): the global gather, the support set and decoder, and the losses."""
        all_video, all_text = gather_with_grad(video), gather_with_grad(text)  # (G, D): global batch
        all_ids = gather_no_grad(batch.video_index)  # (G,)
        caption = self.model.reconstruct(video, batch, all_video, all_ids, global_offset(video.shape[0]))
        logits, targets = caption if caption is not None else (None, None)
        terms = self.loss(all_text, all_video, all_ids, self.model.log_logit_scale, logits, targets)
        self._measure(terms, video, text)
        return terms

    @torch.compiler.disable  # reads and sets plain attributes; autograd.grad runs eagerly
    def _measure(self, terms: dict[str, torch.Tensor], video: torch.Tensor, text: torch.Tensor) -> None:
        """With ``grad_probe`` set: each term's gradient norm on this batch's embeddings, kept in
        ``grad_norms`` (see :mod:`ssbctl.objective.grad_norms`)."""
        if self.grad_probe is not None:
            self.grad_norms = embedding_grad_norms(terms, self.loss.cfg.caption_weight, (video, text),
                                                   self.grad_probe)

    def take_grad_norms(self) -> dict[str, torch.Tensor]:
        """The norms the last measured forward computed (then forgotten; empty when none was measured)."""
        norms, self.grad_norms = self.grad_norms, {}
        return norms
