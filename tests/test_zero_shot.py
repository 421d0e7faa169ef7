"""Step 0 is the dual encoder's zero-shot model (issue 11, item 1).

With the CLIP model config, before any training the model's text embedding is
``CLIPModel.get_text_features`` and its video embedding the normalised mean of
``get_image_features`` over the frames (features written by ``ssbctl prepare --backbone clip``);
the same for SigLIP. ``ssbctl evaluate --zero-shot`` scores that model, and a short training run
starts from it instead of below it. Everything uses a tiny random ``CLIPModel``/``SiglipModel``
saved with ``save_pretrained``, offline.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssbctl.cli.app import main
from ssbctl.config import LossConfig, load_model_config
from ssbctl.core.errors import UserError
from ssbctl.data.hf_backbones import HFImageBackbone
from ssbctl.data.loader import Collate
from ssbctl.model.embed import embed_features, embed_texts
from ssbctl.model.ssb import SSBModel, build_model

import fixtures

CAPTIONS = ["a red circle moves to the left", "a big blue box spins", "a tiny white triangle grows",
            "a person cooks", "the small green cross moves up"]
CPU = torch.device("cpu")
EQUAL = 0.99999  # cosine the issue asks for: equal up to float32 rounding of different op orders


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.tiny_dual_encoder(tmp_path_factory.mktemp("tiny_clip"), "clip")


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.tiny_dual_encoder(tmp_path_factory.mktemp("tiny_siglip"), "siglip")


def _step0(pretrained: Path, input_dims: tuple[int, ...] = (16,)) -> tuple[SSBModel, Any]:
    """The shipped ``ssb-clip-b32`` config, shrunk (joint space 16 = the tiny model's), untrained."""
    cfg = load_model_config("ssb-clip-b32")
    tiny = dataclasses.replace(
        cfg, embed_dim=16, video=dataclasses.replace(cfg.video, hidden_dim=16, layers=1, heads=2),
        text=dataclasses.replace(cfg.text, pretrained=str(pretrained), max_tokens=16),
        decoder=dataclasses.replace(cfg.decoder, hidden_dim=16, layers=1, heads=2))
    torch.manual_seed(0)
    model, tokenizer, _ = build_model(tiny, LossConfig(), input_dims, CAPTIONS)
    return model.eval(), tokenizer


def _tensor(out: Any) -> torch.Tensor:
    """``get_*_features``' result: a tensor (or, in some transformers versions, an output object)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).tolist()


def _videos() -> list[np.ndarray]:
    """Three clips of random frames, of 5, 2 and 7 frames (padding and masks are exercised)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (n, 40, 48, 3), dtype=np.uint8) for n in (5, 2, 7)]


def _reference(family: str, folder: Path) -> tuple[Any, Any]:
    import transformers

    if family == "clip":
        return (transformers.CLIPModel.from_pretrained(folder).eval(),
                transformers.CLIPImageProcessor.from_pretrained(folder))
    return (transformers.SiglipModel.from_pretrained(folder).eval(),
            transformers.SiglipImageProcessor.from_pretrained(folder))


@torch.no_grad()
def _video_cosines(family: str, folder: Path, model: SSBModel) -> list[float]:
    """Per clip: cosine(model's video embedding of the backbone's features, normalised mean of the
    reference model's ``get_image_features`` over the clip's frames)."""
    reference, processor = _reference(family, folder)
    backbone = HFImageBackbone(str(folder), kind=family, device="cpu")
    videos = _videos()
    embedded = embed_features(model, [[backbone.encode(v) for v in videos]], CPU)
    want = torch.stack([F.normalize(_tensor(reference.get_image_features(
        pixel_values=processor(images=list(v), return_tensors="pt")["pixel_values"])).mean(0), dim=-1)
        for v in videos])
    return _cosines(embedded, want)


@torch.no_grad()
def test_step0_text_embedding_is_clip_get_text_features(tiny_clip: Path) -> None:
    """Each caption alone (no padding) through ``CLIPModel.get_text_features``, against the model's
    embedding of all of them in one padded batch (as evaluation embeds them)."""
    model, tokenizer = _step0(tiny_clip)
    reference, _ = _reference("clip", tiny_clip)
    embedded = embed_texts(model, tokenizer, CAPTIONS, CPU)
    want = torch.cat([_tensor(reference.get_text_features(**tokenizer(c, return_tensors="pt"))) for c in CAPTIONS])
    assert min(_cosines(embedded, want)) > EQUAL, _cosines(embedded, want)


def test_step0_video_embedding_is_mean_of_clip_image_features(tiny_clip: Path) -> None:
    model, _ = _step0(tiny_clip)
    cosines = _video_cosines("clip", tiny_clip, model)
    assert min(cosines) > EQUAL, cosines


@torch.no_grad()
def test_step0_is_siglip_zero_shot(tiny_siglip: Path) -> None:
    """SigLIP: its text tower with its own head, its image tower's pooled (head) embedding. SigLIP
    pools the last token, so the reference sees the same padded batch as the model."""
    model, tokenizer = _step0(tiny_siglip)
    reference, _ = _reference("siglip", tiny_siglip)
    ids, mask = Collate(tokenizer, 16).tokenize(CAPTIONS)
    want = _tensor(reference.get_text_features(input_ids=ids, attention_mask=mask))
    text = _cosines(model.encode_text(ids, mask), want)
    assert min(text) > EQUAL, text
    video = _video_cosines("siglip", tiny_siglip, model)
    assert min(video) > EQUAL, video


def test_step0_with_a_second_expert_of_another_size_is_still_the_clip_expert_mean(tiny_clip: Path) -> None:
    """A second expert (12-d, not the joint size) enters through a zero-initialised Linear: step 0
    stays CLIP's mean, and that Linear gets a gradient from the first step (it can learn)."""
    model, _ = _step0(tiny_clip, input_dims=(16, 12))
    clip_feats = [torch.randn(n, 16) for n in (4, 2)]
    other = [torch.randn(n, 12) for n in (4, 2)]
    embedded = embed_features(model, [clip_feats, other], CPU)
    want = F.normalize(torch.stack([f.mean(0) for f in clip_feats]), dim=-1)
    assert min(_cosines(embedded, want)) > EQUAL
    model.train()
    video = model.encode_video([torch.randn(2, 3, 16), torch.randn(2, 3, 12)], [torch.ones(2, 3, dtype=torch.bool)] * 2)
    video.sum().backward()
    assert model.video.bases is not None and float(model.video.bases[1].weight.grad.abs().sum()) > 0


def test_projected_pooling_needs_a_dual_encoder_with_its_projection(tiny_text_model: Path, tmp_path: Path) -> None:
    """A text model without a trained joint-space projection is one clear UserError, not a random one."""
    import transformers

    cfg = load_model_config("ssb-clip-b32")
    with pytest.raises(UserError, match="needs a CLIP or SigLIP text model"):
        build_model(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained=str(tiny_text_model))),
                    LossConfig(), (16,), CAPTIONS)
    bare = tmp_path / "clip-text-only"
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64)).save_pretrained(bare)
    fixtures.word_tokenizer().save_pretrained(bare)
    with pytest.raises(UserError, match="no trained text projection"):
        build_model(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained=str(bare))),
                    LossConfig(), (16,), CAPTIONS)


# ------------------------------------------------------------------ the CLI at step 0 and after training


@pytest.fixture(scope="module")
def clip_shapes(shapes_raw: Path, tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shapes clips prepared with the tiny CLIP's vision tower (3 frames each)."""
    out = tmp_path_factory.mktemp("clip_shapes") / "shapes-clip"
    assert main(["prepare", "custom", "--annotations", str(shapes_raw / "captions.jsonl"), "--out", str(out),
                 "--backbone", f"clip:{tiny_clip}", "--frames", "3", "--workers", "0", "--json"]) == 0
    return out


def _sets(store: Path, clip: Path, out: Path) -> list[str]:
    """The shapes recipe on the CLIP model config, shrunk to the tiny CLIP (joint space 16)."""
    values: dict[str, Any] = {
        "model.name": "ssb-clip-b32", "model.text.pretrained": str(clip), "data.prepared": str(store),
        "train.output_dir": str(out), "model.embed_dim": 16, "model.video.hidden_dim": 16, "model.video.layers": 1,
        "model.video.heads": 2, "model.decoder.hidden_dim": 16, "model.decoder.layers": 1, "model.decoder.heads": 2,
        "model.text.max_tokens": 16, "train.batch_size": 8, "train.epochs": 2, "train.warmup_steps": 2,
        "train.lr": 1e-3, "train.text_lr": 1e-4}
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _evaluate(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["evaluate", *argv, "--split", "train", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_at_step0_and_a_two_epoch_run_does_not_fall_below_it(
        clip_shapes: Path, tiny_clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ssbctl evaluate --zero-shot`` prints the CLIP baseline (table and --json); a run trained two
    epochs from it scores at least as well on its own training split (up to one caption, see TOLERANCE),
    and ``evaluate RUN --zero-shot`` is that run's own step 0 (the same numbers)."""
    sets = [a for s in _sets(clip_shapes, tiny_clip, tmp_path / "run") for a in ("--set", s)]
    assert main(["evaluate", "--zero-shot", "--recipe", "shapes", *sets, "--split", "train"]) == 0
    table = capsys.readouterr().out
    assert "zero-shot" in table and "R@1" in table and "captions x" in table, table
    step0 = _evaluate(capsys, "--zero-shot", "--recipe", "shapes", *sets)
    assert step0["n_queries"] == 36 and step0["n_videos"] == 12

    assert main(["train", "--recipe", "shapes", *sets, "--out", str(tmp_path / "run"), "--json"]) == 0
    capsys.readouterr()
    trained = _evaluate(capsys, str(tmp_path / "run"))
    assert _evaluate(capsys, str(tmp_path / "run"), "--zero-shot") == step0
    # TOLERANCE: one caption of the 36 (100/36 points). Training optimises the contrastive loss, not
    # the rank of each caption: a caption whose correct video sits on a rank boundary can cross it
    # while the loss falls. What the test rules out is a run that starts by destroying CLIP's alignment.
    tolerance = 100.0 / step0["n_queries"] + 1e-9
    for direction in ("t2v", "v2t"):
        for k in ("R1", "R5"):
            assert trained[direction][k] >= step0[direction][k] - tolerance, (direction, k, step0, trained)


def test_evaluate_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Conflicting or missing sources are one error line, exit 2."""
    for argv in (["--zero-shot"], ["--recipe", "shapes"], ["--zero-shot", str(tmp_path), "--recipe", "shapes"],
                 ["--zero-shot", "--recipe", "shapes", "--checkpoint", "1"]):
        assert main(["evaluate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_a_run_of_the_previous_clip_architecture_still_loads(tiny_clip: Path, tmp_path: Path) -> None:
    """Runs trained before ``model.video.kind`` and ``pooling = "projected"`` existed recorded
    ``pooling = "pooler"`` and no ``kind``: they load as the architecture they trained (MMT's
    transformer, CLIP's unprojected pooler output and a Linear), with their own weights."""
    from ssbctl.config import Recipe
    from ssbctl.engine.checkpoint import save_checkpoint
    from ssbctl.engine.run import RECIPE_FILE, write_recipe, write_run_files
    from ssbctl.inference.run import load_run

    cfg = load_model_config("ssb-clip-b32")
    old = dataclasses.replace(
        cfg, embed_dim=16, video=dataclasses.replace(cfg.video, kind="transformer", hidden_dim=16, layers=1, heads=2),
        text=dataclasses.replace(cfg.text, pooling="pooler", pretrained=str(tiny_clip), max_tokens=16),
        decoder=dataclasses.replace(cfg.decoder, hidden_dim=16, layers=1, heads=2))
    torch.manual_seed(0)
    model, tokenizer, resolved = build_model(old, LossConfig(), (16,), CAPTIONS)
    run = tmp_path / "old-run"
    write_run_files(run, Recipe(model=resolved), tokenizer, model.text.backbone.config, [])
    write_recipe(run, Recipe(model=resolved))
    lines = (run / RECIPE_FILE).read_text().splitlines()
    (run / RECIPE_FILE).write_text("\n".join(x for x in lines if not x.startswith("kind =")) + "\n")
    assert 'kind = "transformer"' in "\n".join(lines) and "kind =" not in (run / RECIPE_FILE).read_text()
    save_checkpoint(run, model, {}, {"step": 1}, keep=1)
    loaded = load_run(run, device="cpu")
    assert loaded.recipe.model.video.kind == "transformer" and loaded.model.video.bases is None
    assert isinstance(loaded.model.text.proj, torch.nn.Linear)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(CAPTIONS), embed_texts(model.eval(), tokenizer, CAPTIONS, CPU))


def test_an_image_model_decodes_frames_at_its_processor_size(tiny_clip: Path, tiny_siglip: Path) -> None:
    """prepare decodes at the side the image processor resizes to (CLIP: the shorter side;
    SigLIP: its square), so the processor's own resize of full frames is skipped."""
    assert HFImageBackbone(str(tiny_clip), kind="clip", device="cpu").decode_side() == 32
    assert HFImageBackbone(str(tiny_siglip), kind="hf", device="cpu").decode_side() == 32
