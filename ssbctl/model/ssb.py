"""The SSB model: video and text embeddings plus support-set caption reconstruction (the losses
are the objective layer's)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssbctl.config import LossConfig, ModelConfig
from ssbctl.data.batch import Batch
from ssbctl.model.decoder import CaptionDecoder, decoder_vocab
from ssbctl.model.precision import fp32_or_wider
from ssbctl.model.support_set import SupportSetBottleneck
from ssbctl.model.t5_decoder import T5CaptionDecoder, check_t5, load_t5_decoder
from ssbctl.model.text_encoder import TextEncoder, load_text_backbone, resolve_source
from ssbctl.model.video_encoder import VideoEncoder


class SSBModel(nn.Module):
    """Video encoder, text encoder, learned temperature, and (unless the mask is ``none``) the
    support-set bottleneck with its caption decoder.

    A plain module: it returns embeddings, support-set memory and caption logits. The training
    objective (``ssbctl.objective.SSBObjective``) gathers them across ranks and turns them into
    loss terms; the temperature is a parameter here so checkpoints keep one layout.

    Every parameter that requires grad gets a gradient from the configured objective: under
    DistributedDataParallel one that gets none fails the second step.
    """

    def __init__(self, cfg: ModelConfig, loss: LossConfig, text_backbone: nn.Module,
                 tokenizer_size: int, vocab: torch.Tensor | None = None,
                 decoder: T5CaptionDecoder | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.contrastive = loss.contrastive
        self.video = VideoEncoder(cfg.video, cfg.embed_dim)
        self.text = TextEncoder(cfg.text, cfg.embed_dim, text_backbone)
        # Only InfoNCE uses the temperature. Under max-margin it stays in the weights (checkpoints
        # keep one layout whatever the loss) but is frozen, so nothing expects a gradient for it.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / loss.init_temperature)),
                                            requires_grad=loss.contrastive == "infonce")
        self.support: SupportSetBottleneck | None = None
        self.decoder: CaptionDecoder | T5CaptionDecoder | None = None
        if cfg.support.mask != "none":
            self.support = SupportSetBottleneck(cfg.support, cfg.embed_dim, cfg.decoder.hidden_dim)
            if cfg.decoder.kind == "t5":  # given pretrained, or of the run's architecture (weights: its checkpoint)
                text_config: Any = text_backbone.config  # the Hugging Face model's config
                check_t5(text_config, cfg.text.pretrained)
                self.decoder = decoder or T5CaptionDecoder(text_config, cfg.decoder.hidden_dim, tokenizer_size)
            else:
                self.decoder = CaptionDecoder(cfg.decoder, tokenizer_size, cfg.text.max_tokens, vocab)

    @property
    def temperature(self) -> float | None:
        """The learned InfoNCE temperature (unclamped); None when the contrastive loss has none."""
        if self.contrastive != "infonce":
            return None
        return float(torch.exp(-self.log_logit_scale.detach()))

    def encode_video(self, features: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised video embeddings ``(B, D)``."""
        return F.normalize(fp32_or_wider(self.video(features, masks)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, D)``."""
        return F.normalize(fp32_or_wider(self.text(input_ids, attention_mask)), dim=-1)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised video and text embeddings ``(B, D)`` of a batch (the same as :meth:`embed`)."""
        return self.embed(batch)

    def embed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised video and text embeddings ``(B, D)`` of a batch."""
        return (self.encode_video(batch.video, batch.video_mask),
                self.encode_text(batch.input_ids, batch.attention_mask))

    def reconstruct(self, video: torch.Tensor, batch: Batch, support: torch.Tensor, support_ids: torch.Tensor,
                    offset: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Caption logits ``(B, L, V)`` and targets ``(B, L)`` of the batch's captions, each decoded
        from the support-set memory of ``video`` (this batch's embeddings) attending to ``support``
        (``(S, D)``, with video ids ``support_ids``; the global batch under torchrun, where this
        batch starts at ``offset``). None when the model has no support set."""
        if self.support is None or self.decoder is None:
            return None
        memory, _ = self.support(video, batch.video_index, support, support_ids, offset)  # (B, slots, W)
        return self.decoder(batch.input_ids, batch.attention_mask, memory)


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
    backbone, tokenizer = load_text_backbone(cfg.text.pretrained, projected=cfg.text.pooling == "projected")
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, input_dims=feature_dims))
    vocab, decoder = None, None
    if cfg.support.mask != "none" and cfg.decoder.kind == "t5":
        decoder = load_t5_decoder(cfg.text.pretrained, resolve_source(cfg.text.pretrained), backbone.config,
                                  cfg.decoder.hidden_dim, len(tokenizer))
    elif cfg.support.mask != "none":
        seen = (caption_token_ids(tokenizer, train_captions, cfg.text.max_tokens)
                if cfg.decoder.vocab == "train" else None)
        vocab = decoder_vocab(seen, len(tokenizer))
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=len(vocab) + 2))
    return SSBModel(cfg, loss, backbone, len(tokenizer), vocab, decoder), tokenizer, cfg
