"""The text model's own decoder as the caption decoder (``model.decoder.kind = "t5"``).

METHOD.md: the caption is reconstructed "by a lightweight transformer decoder (or the text model's
own decoder, e.g. T5's)". With a T5 text encoder, this module is T5's pretrained decoder stack and
language-model head, taken from the same checkpoint as the encoder, cross-attending to the
support-set memory (projected from its width, ``model.decoder.hidden_dim``, to T5's ``d_model``).
It predicts over T5's whole vocabulary with T5's conventions: the decoder input is the caption
shifted right behind ``decoder_start_token_id`` (T5's pad id), the targets are the text encoder's own
token ids (the caption and its ``</s>``) with padding as -100, so the caption loss is unchanged.

The decoder's word embedding starts as a copy of the encoder's (T5 ties them; here each trains on
its own). Dropout is T5's ``dropout_rate``; ``model.decoder.layers``, ``heads`` and ``dropout``
describe the light decoder only. A text encoder that is not T5 has no decoder of its own: asking
for ``kind = "t5"`` with one is a UserError, as is a checkpoint that holds no trained decoder (an
encoder-only save), which would otherwise be a random decoder under a pretrained name.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssbctl.core.errors import UserError
from ssbctl.core.hf import load_pretrained
from ssbctl.model.decoder import IGNORE_INDEX

T5_TYPES = ("t5", "mt5")  # checkpoints whose decoder is transformers' T5Stack
# Parameter names (under the SSB model) of the pretrained decoder: trained at train.text_lr like the
# pretrained text encoder; the memory projection is new and trains at train.lr.
PRETRAINED_PREFIXES = ("decoder.stack.", "decoder.lm_head.")


def check_t5(text_config: Any, text_model: str) -> None:
    """A UserError unless the text model is a T5 (whose decoder ``kind = "t5"`` uses)."""
    kind = getattr(text_config, "model_type", "")
    if kind not in T5_TYPES:
        raise UserError(f"recipe key 'model.decoder.kind' = \"t5\" uses the text model's own T5 decoder, but "
                        f"model.text.pretrained '{text_model}' is a {kind or 'non-T5'} model; use a T5 text "
                        f"model (t5-base) or model.decoder.kind = \"light\"")


def decoder_stack_config(text_config: Any) -> Any:
    """The decoder stack's config from the T5 text model's (which keeps ``num_decoder_layers``)."""
    config = copy.deepcopy(text_config)
    config.is_decoder, config.is_encoder_decoder, config.use_cache = True, False, False
    config.num_layers = getattr(text_config, "num_decoder_layers", None) or text_config.num_layers
    return config


def shift_right(targets: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """T5's decoder input for ``targets (B, L)``: ``start_id`` then the targets but the last, -100 as pad."""
    inputs = torch.full_like(targets, start_id)
    inputs[:, 1:] = targets[:, :-1]
    return inputs.masked_fill(inputs == IGNORE_INDEX, pad_id)


class T5CaptionDecoder(nn.Module):
    """T5's decoder over the support-set memory; its vocabulary is the T5 tokenizer's.

    Offers the generation interface every caption decoder has: ``start_id``, ``end_ids``,
    :meth:`next_logits` and :meth:`to_tokenizer_ids`.
    """

    def __init__(self, text_config: Any, memory_dim: int, tokenizer_size: int,
                 end_ids: frozenset[int] | None = None) -> None:
        from transformers.models.t5.modeling_t5 import T5Stack

        super().__init__()
        config = decoder_stack_config(text_config)
        self.stack = T5Stack(config)  # its own embed_tokens: the decoder's word embedding
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        # T5 v1.0 (tied head) rescales the decoder output by d_model^-0.5 before the head.
        self.rescale = bool(getattr(config, "scale_decoder_outputs", self.tied))
        self.lm_head = None if self.tied else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.memory = nn.Linear(memory_dim, config.d_model)  # support-set memory width -> d_model
        self.d_model = int(config.d_model)
        self.pad_id = int(config.pad_token_id or 0)
        start = config.decoder_start_token_id
        self.start_id = int(self.pad_id if start is None else start)
        self.end_ids = end_ids if end_ids is not None else frozenset({int(config.eos_token_id)})
        self.tokenizer_size = tokenizer_size  # ids at or above it (T5 pads its vocabulary) decode to nothing

    def load_pretrained(self, model: Any) -> None:
        """Copy the decoder stack (and an untied head) of a ``T5ForConditionalGeneration``."""
        self.stack.load_state_dict(model.decoder.state_dict())
        if self.lm_head is not None:
            self.lm_head.load_state_dict(model.lm_head.state_dict())

    def logits(self, inputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, t, V)`` of the token after each of ``inputs (B, t)`` (decoder-input ids)."""
        states = self.memory(memory.to(self.memory.weight.dtype))  # (B, S, d_model)
        hidden = self.stack(input_ids=inputs, encoder_hidden_states=states, use_cache=False).last_hidden_state
        if self.rescale:
            hidden = hidden * self.d_model ** -0.5
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.stack.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, L, V)`` and targets ``(B, L)`` (padding as -100) for a tokenised caption."""
        targets = input_ids.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
        return self.logits(shift_right(targets, self.start_id, self.pad_id), memory), targets

    def next_logits(self, prefix: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, V)`` of the token after ``prefix (B, t)`` (which begins with ``start_id``);
        ids the tokenizer cannot decode (T5's vocabulary padding) are never chosen."""
        logits = self.logits(prefix, memory)[:, -1]
        return logits.index_fill(1, torch.arange(self.tokenizer_size, logits.shape[1], device=logits.device),
                                 float("-inf"))

    def to_tokenizer_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Decoder ids as tokenizer ids: the same vocabulary."""
        return ids


def load_t5_decoder(name: str, source: str, text_config: Any, memory_dim: int,
                    tokenizer_size: int) -> T5CaptionDecoder:
    """The pretrained decoder of the T5 checkpoint ``source`` (``name``: as the user gave it)."""
    import transformers

    check_t5(text_config, name)

    def load(local: bool) -> tuple[Any, dict[str, Any]]:
        loaded: Any = transformers.T5ForConditionalGeneration.from_pretrained(  # (model, info) with the flag
            source, local_files_only=local, output_loading_info=True)
        return loaded

    full, info = load_pretrained("T5 decoder of", name, source, load)
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(("decoder.", "lm_head."))]
    if missing:
        raise UserError(f"'{name}' holds no trained T5 decoder ({len(missing)} decoder weights missing, e.g. "
                        f"{missing[0]}); model.decoder.kind = \"t5\" needs a full T5 checkpoint (encoder and decoder)")
    decoder = T5CaptionDecoder(full.config, memory_dim, tokenizer_size)
    decoder.load_pretrained(full)
    return decoder
