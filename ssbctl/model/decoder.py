"""A lightweight transformer caption decoder over (a subset of) the text tokenizer's vocabulary."""

from __future__ import annotations

import torch
import torch.nn as nn

from ssbctl.config import DecoderConfig

IGNORE_INDEX = -100  # the target of a padding position: the caption loss ignores it
UNK, BOS = 0, 1  # decoder-vocabulary ids reserved before the tokenizer's tokens


def decoder_vocab(token_ids: list[int] | None, tokenizer_size: int) -> torch.Tensor:
    """Tokenizer ids the decoder predicts: all of them, or those seen in training captions.

    Predicting over the captions' own tokens (a few hundred to a few thousand) instead of a 30k+
    vocabulary is what keeps the caption head cheap on a CPU; unseen tokens map to UNK.
    """
    ids = range(tokenizer_size) if token_ids is None else sorted(set(token_ids))
    return torch.tensor(list(ids), dtype=torch.long)


class CaptionDecoder(nn.Module):
    """Teacher-forced transformer decoder cross-attending to the support-set bottleneck."""

    lookup: torch.Tensor  # buffer: tokenizer id -> decoder id

    def __init__(self, cfg: DecoderConfig, tokenizer_size: int, max_tokens: int,
                 vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        if vocab is None:  # rebuilt from a checkpoint, whose buffers replace this placeholder
            if cfg.vocab_size < 3:
                raise ValueError("the decoder needs its vocabulary or model.decoder.vocab_size")
            vocab = torch.zeros(cfg.vocab_size - 2, dtype=torch.long)
        size = len(vocab) + 2
        lookup = torch.full((tokenizer_size,), UNK, dtype=torch.long)
        lookup[vocab] = torch.arange(2, len(vocab) + 2)
        self.register_buffer("vocab", vocab)  # decoder id - 2 -> tokenizer id
        self.register_buffer("lookup", lookup)  # tokenizer id -> decoder id
        width = cfg.hidden_dim
        self.embed = nn.Embedding(size, width)
        self.position = nn.Parameter(torch.randn(max_tokens + 1, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, cfg.heads, 4 * width, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, L, V)`` and targets ``(B, L)`` (padding as -100) for a tokenised caption."""
        tokens = self.lookup[input_ids]  # (B, L)
        bos = torch.full_like(tokens[:, :1], BOS)
        inputs = torch.cat([bos, tokens[:, :-1]], dim=1)  # (B, L): shifted right
        valid = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask[:, :-1]], dim=1).bool()
        length = inputs.shape[1]
        x = self.embed(inputs) + self.position[:length]  # (B, L, W)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # True: masked
        h = self.decoder(x, memory.to(x.dtype), tgt_mask=causal, tgt_is_causal=True,
                         tgt_key_padding_mask=~valid)
        targets = tokens.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
        return self.head(self.norm(h)), targets
