"""The SSB model: support-set masks, gradients into every part, normalised embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssbctl.config import SupportSetConfig, load_recipe
from ssbctl.core.errors import UserError
from ssbctl.data.loader import Collate, PairDataset
from ssbctl.data.store import FeatureStore
from ssbctl.model.ssb import build_model
from ssbctl.model.support_set import SupportSetBottleneck, support_mask
from ssbctl.objective.step import SSBObjective


def test_cross_mask_never_attends_to_the_sample_or_its_own_video() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    bottleneck = SupportSetBottleneck(SupportSetConfig(mask="cross", temperature=0.01), 16, 8)
    video = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    video[2] = video[1]  # identical embeddings: attention would love itself if it could
    weights = bottleneck.attention(video, ids)
    same = ids[:, None] == ids[None, :]
    assert torch.all(weights[same] == 0)
    assert torch.all(weights.diagonal() == 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(8))


def test_identity_full_and_empty_rows() -> None:
    ids = torch.tensor([0, 1, 2])
    assert torch.equal(support_mask("identity", ids), torch.eye(3, dtype=torch.bool))
    assert support_mask("full", ids).all()
    bottleneck = SupportSetBottleneck(SupportSetConfig(mask="identity"), 4, 4)
    weights = bottleneck.attention(torch.randn(3, 4), ids)
    torch.testing.assert_close(weights, torch.eye(3))
    lonely = SupportSetBottleneck(SupportSetConfig(mask="cross"), 4, 4)
    memory, weights = lonely(torch.randn(2, 4), torch.tensor([7, 7]))  # nothing else to draw from
    assert torch.all(weights == 0) and torch.all(memory == 0) and torch.isfinite(memory).all()


def _tiny_model(store: Path, text_model: Path, mask: str = "cross", trainable: int = -1, stem: str = "linear"):
    recipe = load_recipe("shapes", [f'model.video.stem="{stem}"',
        f'model.text.pretrained="{text_model}"', f"model.text.trainable_layers={trainable}",
        "model.embed_dim=32", "model.video.hidden_dim=32", "model.video.heads=2", "model.video.layers=1",
        "model.decoder.hidden_dim=32", "model.decoder.heads=2", "model.decoder.layers=1",
        f'model.support.mask="{mask}"', "model.text.max_tokens=16"])
    data = PairDataset(FeatureStore(store), "train")
    torch.manual_seed(0)
    model, tokenizer, cfg = build_model(recipe.model, recipe.loss, (FeatureStore(store).feature_dim,), data.captions)
    batch = Collate(tokenizer, 16)([data[i] for i in range(8)])
    return model, tokenizer, cfg, batch, SSBObjective(model, recipe.loss)


def test_gradients_reach_both_encoders_and_the_decoder(shapes_store: Path, tiny_text_model: Path) -> None:
    model, _, cfg, batch, objective = _tiny_model(shapes_store, tiny_text_model)
    out = objective(batch)
    assert set(out) == {"loss", "contrastive_loss", "caption_loss"}
    out["loss"].backward()
    parts = {"video": model.video, "text backbone": model.text.backbone, "text proj": model.text.proj,
             "support": model.support, "decoder": model.decoder}
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert model.log_logit_scale.grad is not None
    # the caption loss alone reaches the video encoder through the bottleneck
    model.zero_grad()
    objective(batch)["caption_loss"].backward()
    assert sum(float(p.grad.abs().sum()) for p in model.video.parameters()) > 0
    assert cfg.decoder.vocab_size == model.decoder.head.out_features


def test_mask_none_is_contrastive_only(shapes_store: Path, tiny_text_model: Path) -> None:
    model, _, _, batch, objective = _tiny_model(shapes_store, tiny_text_model, mask="none")
    assert model.decoder is None and set(objective(batch)) == {"loss", "contrastive_loss"}


def test_embeddings_are_normalised(shapes_store: Path, tiny_text_model: Path) -> None:
    model, _, _, batch, _ = _tiny_model(shapes_store, tiny_text_model)
    v = model.encode_video(batch.video, batch.video_mask)
    t = model.encode_text(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(8))


def test_frozen_text_encoder_caches_exactly_what_it_computes(shapes_store: Path, tiny_text_model: Path) -> None:
    model, tokenizer, _, batch, _ = _tiny_model(shapes_store, tiny_text_model, trainable=0)
    assert not any(p.requires_grad for p in model.text.backbone.parameters())
    model.train()
    first = model.text(batch.input_ids, batch.attention_mask)
    distinct = {tuple(r[m.bool()].tolist()) for r, m in zip(batch.input_ids, batch.attention_mask)}
    assert len(model.text._cache) == len(distinct)
    again = model.text(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    model.text.frozen = False
    model.text.backbone.eval()
    torch.testing.assert_close(model.text(batch.input_ids, batch.attention_mask), first, rtol=1e-5, atol=1e-5)


def test_top_layers_only(shapes_store: Path, tiny_text_model: Path) -> None:
    model, *_ = _tiny_model(shapes_store, tiny_text_model, trainable=1)
    layers = model.text.backbone.encoder.layer
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in model.text.backbone.embeddings.parameters())


def test_builtin_minilm_loads_offline() -> None:
    from ssbctl.model.text_encoder import load_text_backbone

    backbone, tokenizer = load_text_backbone("builtin:all-MiniLM-L6-v2")
    assert backbone.config.hidden_size == 384 and backbone.config.num_hidden_layers == 6
    with torch.no_grad():
        enc = tokenizer(["a red ball slides left", "a red circle moves to the left", "a blue box spins"],
                        return_tensors="pt", padding=True)
        states = backbone(**enc).last_hidden_state
        pooled = torch.nn.functional.normalize((states * enc["attention_mask"][..., None]).sum(1), dim=-1)
    sims = pooled @ pooled.t()
    assert sims[0, 1] > sims[0, 2], "real pretrained weights: paraphrases are closer than unrelated captions"


def test_unreachable_text_model_is_a_user_error() -> None:
    from ssbctl.model.text_encoder import load_text_backbone

    with pytest.raises(UserError, match="cannot load text model"):
        load_text_backbone("no-such-org/no-such-model")


@pytest.mark.parametrize("mask", ["none", "identity", "full", "cross"])
def test_every_trainable_parameter_gets_a_gradient(shapes_store: Path, tiny_text_model: Path, mask: str) -> None:
    """DistributedDataParallel fails at the second step if a trainable parameter gets no gradient."""
    model, *_, batch, objective = _tiny_model(shapes_store, tiny_text_model, mask=mask)
    objective(batch)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_conv_stem_features_do_not_depend_on_where_the_object_is() -> None:
    """The pooled CNN features of a frame are the same when its object moves by an even number of
    pixels (the second convolution's stride) inside the frame; the Linear part still sees where."""
    from ssbctl.model.video_encoder import PixelStem

    torch.manual_seed(0)
    stem = PixelStem(3 * 16 * 16, 24)
    frames = torch.full((2, 3, 16, 16), -1.0)
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    frames[0, 0, 3:6, 3:6] = cross  # a red plus sign at the top left
    frames[1, 0, 9:12, 7:10] = cross  # the same, 6 px lower and 4 px to the right
    pooled = stem.shape_features(frames.flatten(1))
    torch.testing.assert_close(pooled[0], pooled[1], rtol=0, atol=1e-6)
    assert not torch.allclose(stem(frames.flatten(1))[0], stem(frames.flatten(1))[1])
    square = torch.full((1, 3, 16, 16), -1.0)
    square[0, 0, 3:6, 3:6] = 1.0
    assert not torch.allclose(stem.shape_features(square.flatten(1))[0], pooled[0], atol=1e-3)


def test_cnn_stem_sees_where_but_has_no_linear_over_the_pixels() -> None:
    """Stem ``cnn``: the CNN alone, with coordinate channels. Its output tells a moved object from
    the unmoved one (motion words need where), and a plus sign from a square at the same place,
    with no weight per pixel value (the Linear over 3*s*s values a small dataset memorises)."""
    from ssbctl.model.video_encoder import PixelStem

    torch.manual_seed(0)
    stem = PixelStem(3 * 16 * 16, 24, values=False)
    assert stem.linear is None and all(3 * 16 * 16 not in p.shape for p in stem.parameters())
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    frames = torch.full((3, 3, 16, 16), -1.0)
    frames[0, 0, 3:6, 3:6] = cross
    frames[1, 0, 9:12, 7:10] = cross  # moved
    frames[2, 0, 3:6, 3:6] = 1.0  # a square where the first plus sign is
    out = stem(frames.flatten(1))  # (3, 24)
    assert out.shape == (3, 24)
    assert not torch.allclose(out[0], out[1], atol=1e-4) and not torch.allclose(out[0], out[2], atol=1e-4)
    with pytest.raises(UserError, match='stem.*"cnn"'):
        PixelStem(512, 24, values=False)


@pytest.mark.parametrize("stem", ["conv", "cnn"])
def test_pixel_stems_train_end_to_end(shapes_store: Path, tiny_text_model: Path, stem: str) -> None:
    """Through the whole model: every stem parameter gets a gradient from the loss."""
    model, *_, batch, objective = _tiny_model(shapes_store, tiny_text_model, stem=stem)
    objective(batch)["loss"].backward()
    grads = {n: p.grad for n, p in model.video.inputs.named_parameters()}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values()), grads.keys()
    assert any(n.startswith("0.linear") for n in grads) == (stem == "conv")


def test_conv_stem_needs_pixel_features() -> None:
    from ssbctl.model.video_encoder import PixelStem

    with pytest.raises(UserError, match="model.video.stem"):
        PixelStem(512, 24)


def test_pixel_stem_reads_only_the_main_expert() -> None:
    """With ``cnn`` (the demo model's stem), the main expert's frames are pixels and go through the
    CNN; a further expert (a ViT's 16 values, or 768 that would pass as 16x16 pixels) gets a Linear."""
    from ssbctl.config import VideoEncoderConfig
    from ssbctl.model.video_encoder import PixelStem, VideoEncoder

    cfg = VideoEncoderConfig(stem="cnn", hidden_dim=8, heads=2, layers=1, input_dims=(3 * 8 * 8, 16, 768))
    encoder = VideoEncoder(cfg, 8)
    assert isinstance(encoder.inputs[0], PixelStem)
    assert all(isinstance(m, torch.nn.Linear) for m in encoder.inputs[1:])
    feats = [torch.randn(2, 3, d) for d in cfg.input_dims]
    assert encoder(feats, [torch.ones(2, 3, dtype=torch.bool)] * 3).shape == (2, 8)
