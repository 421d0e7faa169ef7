"""``model.decoder.kind = "t5"``: T5's own pretrained decoder reconstructs the caption from the support set.

A tiny random T5 (``T5Config`` at width 16, saved with ``save_pretrained``, loaded offline) stands in
for t5-base: its decoder must be the checkpoint's with T5's conventions (shift right behind the
decoder start id, tied and rescaled head, -100 padding), train, and survive checkpoints and resume."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssbctl.config import LossConfig, load_model_config, load_recipe
from ssbctl.core.errors import UserError
from ssbctl.data.loader import Collate
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.engine.trainer import SilentReporter
from ssbctl.inference.run import load_run
from ssbctl.model.ssb import build_model
from ssbctl.model.t5_decoder import T5CaptionDecoder, load_t5_decoder
from ssbctl.objective.losses import caption_loss
from ssbctl.objective.step import SSBObjective
from ssbctl.training import train

import fixtures

CAPTIONS = ["a red circle moves to the left", "a big blue box spins", "a person cooks", "a man cooks"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole random T5 (encoder and decoder) with a word-level tokenizer, dropout off."""
    return fixtures.tiny_text_model(tmp_path_factory.mktemp("t5") / "t5", "t5", dropout=0.0, seq2seq=True)


def _tiny(name: str, text: Path, **decoder: object) -> object:
    """Registered model ``name`` at width 16 over ``text``, with decoder ``kind = "t5"``."""
    cfg = load_model_config(name)
    return dataclasses.replace(
        cfg, embed_dim=16, video=dataclasses.replace(cfg.video, hidden_dim=16, layers=1, heads=2, dropout=0.0),
        text=dataclasses.replace(cfg.text, pretrained=str(text), max_tokens=12),
        decoder=dataclasses.replace(cfg.decoder, kind="t5", hidden_dim=16, heads=2, **decoder))


def _batch(tokenizer: object) -> object:
    gen = torch.Generator().manual_seed(0)
    items = [([torch.randn(5, 24, generator=gen)], c, i) for i, c in enumerate(CAPTIONS)]
    return Collate(tokenizer, 12)(items)


def test_the_decoder_is_the_checkpoints_with_t5s_conventions(tiny_t5: Path) -> None:
    """Logits and loss equal those of ``T5ForConditionalGeneration`` given the projected memory as its
    encoder output and the caption as labels (it shifts them right and ties and rescales its head)."""
    import transformers
    from transformers.modeling_outputs import BaseModelOutput

    from ssbctl.model.text_encoder import load_text_backbone

    backbone, tokenizer = load_text_backbone(str(tiny_t5))
    decoder = load_t5_decoder(str(tiny_t5), str(tiny_t5), backbone.config, 16, len(tokenizer))
    full = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5, local_files_only=True).eval()
    decoder.eval()
    enc = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    memory = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1))
    logits, targets = decoder(enc["input_ids"], enc["attention_mask"], memory)
    assert (targets[:, -1] == -100).any() and (targets == tokenizer.eos_token_id).sum().item() == 4
    with torch.no_grad():
        states = decoder.memory(memory)
        reference = full(encoder_outputs=BaseModelOutput(last_hidden_state=states), labels=targets)
    torch.testing.assert_close(logits, reference.logits, rtol=1e-5, atol=1e-5)
    assert caption_loss(logits, targets).item() == pytest.approx(reference.loss.item(), rel=1e-5)
    assert decoder.start_id == full.config.decoder_start_token_id == 0
    assert decoder.end_ids == frozenset({tokenizer.eos_token_id})


def test_generation_interface_scores_the_next_token_and_never_an_undecodable_one(tiny_t5: Path) -> None:
    from ssbctl.model.text_encoder import load_text_backbone

    backbone, tokenizer = load_text_backbone(str(tiny_t5))
    decoder = load_t5_decoder(str(tiny_t5), str(tiny_t5), backbone.config, 16, len(tokenizer) - 2).eval()
    memory = torch.randn(2, 3, 16)
    enc = tokenizer(CAPTIONS[:2], padding=True, return_tensors="pt")
    logits, _ = decoder(enc["input_ids"], enc["attention_mask"], memory)
    prefix = torch.cat([torch.full((2, 1), decoder.start_id), enc["input_ids"][:, :2]], dim=1)
    nxt = decoder.next_logits(prefix, memory)
    assert nxt.shape == (2, logits.shape[-1])
    torch.testing.assert_close(nxt[:, :len(tokenizer) - 2], logits[:, 2, :len(tokenizer) - 2])
    assert torch.isneginf(nxt[:, len(tokenizer) - 2:]).all()  # ids the tokenizer cannot decode
    ids = torch.full((2, 1), decoder.start_id)
    for _ in range(4):  # greedy, as a generation loop calls it
        ids = torch.cat([ids, decoder.next_logits(ids, memory).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(decoder.to_tokenizer_ids(ids), ids)
    assert isinstance(tokenizer.decode(decoder.to_tokenizer_ids(ids[0, 1:]).tolist()), str)


def test_shipped_t5_model_config_with_the_t5_decoder_trains_every_parameter(tiny_t5: Path) -> None:
    """ssb-t5-clip-b32 with ``decoder.kind = "t5"``: every trainable parameter, the decoder's
    included, gets a non-zero gradient (DistributedDataParallel needs all of them)."""
    cfg = _tiny("ssb-t5-clip-b32", tiny_t5)
    torch.manual_seed(0)
    loss = LossConfig(contrastive="max_margin")
    model, tokenizer, resolved = build_model(cfg, loss, (24,), CAPTIONS)
    assert isinstance(model.decoder, T5CaptionDecoder) and resolved.decoder.vocab_size == 0
    batch = _batch(tokenizer)
    SSBObjective(model, loss)(batch)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
    # The mean_residual video encoder's temporal transformer feeds a zero-initialised projection: at
    # step 0 alone its gradient is exactly zero (tests/test_model_configs.py); after one update, none is.
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.zero_grad()
    SSBObjective(model, loss)(batch)["loss"].backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum()]
    assert not dead, dead
    assert any(n.startswith("decoder.stack.block.0.layer.1.EncDecAttention") for n, _ in model.named_parameters())


def test_caption_loss_falls_over_a_few_steps_on_a_fixed_batch(tiny_t5: Path) -> None:
    cfg = _tiny("ssb-t5-clip-b32", tiny_t5)
    torch.manual_seed(0)
    loss = LossConfig(contrastive="max_margin")
    model, tokenizer, _ = build_model(cfg, loss, (24,), CAPTIONS)
    objective = SSBObjective(model, loss)
    batch = _batch(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    values = []
    for _ in range(8):
        optimizer.zero_grad()
        terms = objective(batch)
        terms["loss"].backward()
        optimizer.step()
        values.append(terms["caption_loss"].item())
    assert values[-1] < values[0] - 0.2, values


def test_t5_decoder_needs_a_t5_text_model_with_its_decoder(tiny_t5: Path, tmp_path: Path) -> None:
    bert = fixtures.tiny_text_model(tmp_path / "bert", "bert")
    with pytest.raises(UserError, match="model.decoder.kind.*is a bert model"):
        build_model(_tiny("ssb-minilm-pixels", bert), LossConfig(), (24,), CAPTIONS)
    encoder_only = fixtures.tiny_text_model(tmp_path / "enc", "t5")
    with pytest.raises(UserError, match="holds no trained T5 decoder"):
        build_model(_tiny("ssb-t5-clip-b32", encoder_only), LossConfig(), (24,), CAPTIONS)


class _SigtermAt(SilentReporter):
    """Sends this process a real SIGTERM when training reaches a step (it stops after the next)."""

    def __init__(self, step: int) -> None:
        self.at = step

    def step(self, step: int, terms: dict[str, float] | None, clips_per_s: float) -> None:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_t5_decoder_run_checkpoints_loads_and_resumes_to_the_uninterrupted_weights(
        shapes_store: Path, tiny_t5: Path, tmp_path: Path) -> None:
    from conftest import tiny_overrides

    def recipe(name: str, steps: int) -> object:
        extra = {"model.text.pretrained": str(tiny_t5), "model.decoder.kind": "t5", "model.video.dropout": 0.0,
                 "train.max_steps": steps, "data.eval_split": "", "loss.contrastive": "max_margin"}
        return load_recipe("shapes", tiny_overrides(shapes_store, tiny_t5, tmp_path / name, **extra))

    full = train(recipe("full", 5), tmp_path / "full")
    assert full["steps"] == 5
    stopped = train(recipe("part", 5), tmp_path / "part", reporter=_SigtermAt(2))
    assert stopped["stopped_by"] == "SIGTERM" and stopped["steps"] == 3
    resumed = train(recipe("part", 5), tmp_path / "part", resume=True)
    assert resumed["steps"] == 5
    a, b = (load_file(str(latest_checkpoint(tmp_path / r) / "model.safetensors")) for r in ("full", "part"))
    assert a.keys() == b.keys() and any(k.startswith("decoder.stack.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_run(tmp_path / "full")
    assert isinstance(loaded.model.decoder, T5CaptionDecoder)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k].cpu(), a[k]) for k in a)
