"""The SSB model: contrastive video-text embedding plus support-set caption reconstruction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssbctl.config import LossConfig, ModelConfig
from ssbctl.core.distributed import gather_no_grad, gather_with_grad, global_offset
from ssbctl.data.batch import Batch
from ssbctl.objective.losses import SSBLoss, fp32_or_wider
from ssbctl.model.decoder import CaptionDecoder, decoder_vocab
from ssbctl.model.support_set import SupportSetBottleneck
from ssbctl.model.text_encoder import TextEncoder, load_text_backbone
from ssbctl.model.video_encoder import VideoEncoder


class SSBModel(nn.Module):
    """Video encoder, text encoder, learned temperature, and (unless the mask is ``none``) the
    support-set bottleneck with its caption decoder. ``forward`` returns named loss terms.

    Every parameter that requires grad gets a gradient from the configured objective: under
    DistributedDataParallel one that gets none fails the second step.
    """

    def __init__(self, cfg: ModelConfig, loss: LossConfig, text_backbone: nn.Module,
                 tokenizer_size: int, vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.video = VideoEncoder(cfg.video, cfg.embed_dim)
        self.text = TextEncoder(cfg.text, cfg.embed_dim, text_backbone)
        # Only InfoNCE uses the temperature. Under max-margin it stays in the weights (checkpoints
        # keep one layout whatever the loss) but is frozen, so nothing expects a gradient for it.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / loss.init_temperature)),
                                            requires_grad=loss.contrastive == "infonce")
        self.loss = SSBLoss(loss)
        self.support: SupportSetBottleneck | None = None
        self.decoder: CaptionDecoder | None = None
        if cfg.support.mask != "none":
            self.support = SupportSetBottleneck(cfg.support, cfg.embed_dim, cfg.decoder.hidden_dim)
            self.decoder = CaptionDecoder(cfg.decoder, tokenizer_size, cfg.text.max_tokens, vocab)

    @property
    def temperature(self) -> float | None:
        """The learned InfoNCE temperature (unclamped); None when the contrastive loss has none."""
        if self.loss.cfg.contrastive != "infonce":
            return None
        return float(torch.exp(-self.log_logit_scale.detach()))

    def encode_video(self, features: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised video embeddings ``(B, D)``."""
        return F.normalize(fp32_or_wider(self.video(features, masks)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, D)``."""
        return F.normalize(fp32_or_wider(self.text(input_ids, attention_mask)), dim=-1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss", "contrastive_loss"[, "caption_loss"]}`` for one batch.

        Under torchrun the embeddings of all ranks are gathered (with gradients), so negatives and
        the support set span the global batch; each rank decodes its own captions.
        """
        return self.loss_from_embeddings(*self.embed(batch), batch)

    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised video and text embeddings ``(B, D)`` of a batch."""
        return (self.encode_video(batch.video, batch.video_mask),
                self.encode_text(batch.input_ids, batch.attention_mask))

    def loss_from_embeddings(self, video: torch.Tensor, text: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss terms given the batch's embeddings (the support set, decoder and losses)."""
        all_video, all_text = gather_with_grad(video), gather_with_grad(text)  # (G, D): global batch
        all_ids = gather_no_grad(batch.video_index)  # (G,)
        logits = targets = None
        if self.support is not None and self.decoder is not None:
            memory, _ = self.support(video, batch.video_index, all_video, all_ids,
                                     global_offset(video.shape[0]))  # (B, slots, W)
            logits, targets = self.decoder(batch.input_ids, batch.attention_mask, memory)
        return self.loss(all_text, all_video, all_ids, self.log_logit_scale, logits, targets)


def caption_token_ids(tokenizer: Any, captions: list[str], max_tokens: int) -> list[int]:
    """Every tokenizer id that occurs in ``captions`` (special tokens included)."""
    ids: set[int] = set()
    for start in range(0, len(captions), 1024):
        enc = tokenizer(captions[start:start + 1024], truncation=True, max_length=max_tokens)
        for row in enc["input_ids"]:
            ids.update(row)
    return sorted(ids)


def build_model(cfg: ModelConfig, loss: LossConfig, feature_dims: tuple[int, ...],
                train_captions: list[str]) -> tuple[SSBModel, Any, ModelConfig]:
    """A fresh model with pretrained text weights; returns it, its tokenizer and the resolved
    config (input dims and decoder vocabulary size filled in, as needed to rebuild it)."""
    backbone, tokenizer = load_text_backbone(cfg.text.pretrained)
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, input_dims=feature_dims))
    vocab = None
    if cfg.support.mask != "none":
        seen = (caption_token_ids(tokenizer, train_captions, cfg.text.max_tokens)
                if cfg.decoder.vocab == "train" else None)
        vocab = decoder_vocab(seen, len(tokenizer))
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=len(vocab) + 2))
    return SSBModel(cfg, loss, backbone, len(tokenizer), vocab), tokenizer, cfg
