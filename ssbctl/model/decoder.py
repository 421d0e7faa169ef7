"""A lightweight transformer caption decoder over (a subset of) the text tokenizer's vocabulary."""

from __future__ import annotations

from collections.abc import Iterable

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
    vocab: torch.Tensor  # buffer: decoder id - 2 -> tokenizer id
    start_id = BOS  # generation: the decoder id fed first (training shifts captions right behind it)

    def __init__(self, cfg: DecoderConfig, tokenizer_size: int, max_tokens: int,
                 vocab: torch.Tensor | None = None, end_tokens: Iterable[int] = ()) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.end_tokens = frozenset(int(t) for t in end_tokens)  # tokenizer ids; see end_ids
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

    @property
    def end_ids(self) -> frozenset[int]:
        """Decoder ids that end a caption: those of ``end_tokens`` (the tokenizer's sep/eos ids,
        the last token of every training target) that are in the decoder's vocabulary.

        Mapped when asked, not at construction: a decoder rebuilt for a checkpoint gets its
        vocabulary (the ``lookup`` buffer) only when the weights are loaded."""
        found = {int(self.lookup[t]) for t in self.end_tokens if 0 <= t < self.lookup.shape[0]}
        return frozenset(found - {UNK})

    def set_end_tokens(self, tokenizer_ids: Iterable[int | None]) -> None:
        """Name the tokenizer ids that end a caption (None entries, a tokenizer without such a
        token, are skipped): generation stops at them."""
        self.end_tokens = frozenset(int(t) for t in tokenizer_ids if t is not None)

    def next_logits(self, prefix: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, V)`` of the token after ``prefix`` ``(B, t)`` (decoder ids starting with
        :attr:`start_id`), decoding from ``memory`` ``(B, S, W)``: for generation.

        The prefix goes through the same layers, positions and causal mask as a teacher-forced
        caption in :meth:`forward`, so the logits equal ``forward``'s at position ``t - 1``. The
        whole prefix is recomputed each step; captions are at most ``max_tokens`` long.
        """
        length = prefix.shape[1]
        if not 1 <= length <= self.max_tokens:
            raise ValueError(f"a prefix of {length} tokens; the decoder takes 1 to {self.max_tokens}")
        x = self.embed(prefix) + self.position[:length]  # (B, t, W)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # True: masked
        h = self.decoder(x, memory.to(x.dtype), tgt_mask=causal, tgt_is_causal=True)
        return self.head(self.norm(h[:, -1]))

    def to_tokenizer_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids of decoder ids; UNK and BOS, which stand for no tokenizer token, become -1."""
        tokens = self.vocab[(ids - 2).clamp(min=0)]
        return torch.where(ids >= 2, tokens, torch.full_like(tokens, -1))
