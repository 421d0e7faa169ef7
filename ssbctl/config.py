"""Recipe and model configuration: frozen dataclasses loaded from TOML and validated.

A *model config* (``models/NAME.toml``) describes the architecture. A *recipe*
(``recipes/NAME.toml``) names the prepared data, a model (by name, with overrides), the loss
and the training schedule. Unknown keys and wrong types are rejected with an error naming the
key, so a typo never trains silently with a default.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ssbctl.core.device import DEVICES
from ssbctl.core.errors import UserError
from ssbctl.core.paths import find_config

MASKS = ("none", "identity", "full", "cross")
def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _min(default: float | int, low: float | int) -> Any:
    return field(default=default, metadata={"min": low})


def _recorded(default: Any) -> Any:
    """A value training derives (from the prepared data or the tokenizer) and records in the run's
    ``run.json``: never set in a recipe, where it would only be overwritten."""
    return field(default=default, metadata={"recorded": True})


@dataclass(frozen=True)
class VideoEncoderConfig:
    """Temporal transformer over per-frame features of one or more frozen backbones (experts).

    ``kind``: ``transformer`` (MMT): the video embedding is the projected mean of the transformer's
    outputs, random at step 0. ``mean_residual`` (CLIP4Clip's seqTransf): the mean of the frame
    embeddings plus the transformer added residually, its output projection zero-initialised, so
    at step 0 the video embedding is the mean of the frame embeddings (CLIP's zero-shot video
    embedding when the frames are CLIP's projected image embeddings). An expert whose feature size
    differs from ``embed_dim`` enters the mean through a Linear (zero-initialised when another
    expert needs none, so step 0 stays that expert's mean); several experts' means are averaged.

    ``stem``: how each frame's features reach the transformer's width. ``linear``: a Linear.
    ``conv`` (for ``pixels`` features, ``3 x s x s`` values): that Linear plus a small CNN over the
    frame read as an image, pooled over positions, so what an object is does not depend on where
    it is (a Linear over pixels must learn each shape at each position). ``cnn``: that CNN alone,
    with two coordinate channels beside the colours for where things are, and no Linear over the
    pixel values (with which a small dataset's training videos are told apart by their pixels).
    ``conv`` and ``cnn`` read the main (first) expert as pixels; further experts enter through a Linear.
    """

    kind: str = _choice("transformer", ("transformer", "mean_residual"))  # how frames become the video embedding
    stem: str = _choice("linear", ("linear", "conv", "cnn"))  # a Linear; conv: + a small CNN; cnn: the CNN alone
    hidden_dim: int = _min(256, 8)  # width of the temporal transformer
    layers: int = _min(2, 1)  # transformer layers
    heads: int = _min(4, 1)  # attention heads; must divide hidden_dim
    max_frames: int = _min(64, 1)  # length of the learned position table
    dropout: float = _min(0.1, 0.0)  # dropout inside the transformer
    input_dims: tuple[int, ...] = _recorded(())  # recorded: feature size per expert, from the prepared data


@dataclass(frozen=True)
class TextEncoderConfig:
    """A pretrained `transformers` encoder, pooled and projected to the joint space."""

    pretrained: str = "builtin:all-MiniLM-L6-v2"  # hub id, local folder, or builtin:NAME
    # token states to one vector; pooler: the model's own pooler output; projected: the tower's own
    # joint-space embedding (CLIP's get_text_features, SigLIP's text head), used as it is when its
    # size is embed_dim (else through a Linear)
    pooling: str = _choice("mean", ("mean", "cls", "pooler", "projected"))
    max_tokens: int = _min(32, 4)  # captions are truncated to this many tokens
    trainable_layers: int = _min(-1, -1)  # -1: fine-tune all; 0: frozen; N: top N layers only


@dataclass(frozen=True)
class SupportSetConfig:
    """Attention from each sample's video embedding over the support set's video embeddings."""

    mask: str = _choice("cross", MASKS)  # none: contrastive only; cross: only other videos
    temperature: float = _min(0.1, 1e-4)  # softmax temperature of the attention weights
    slots: int = _min(4, 1)  # memory vectors the bottleneck hands the caption decoder


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder that reconstructs the caption from the bottleneck."""

    # light: a small transformer over the training captions' tokens (the keys below); t5: the T5 text
    # model's own pretrained decoder and vocabulary (needs a T5 text model; hidden_dim is the memory width)
    kind: str = _choice("light", ("light", "t5"))
    hidden_dim: int = _min(256, 8)  # decoder width
    layers: int = _min(2, 1)  # decoder layers
    heads: int = _min(4, 1)  # attention heads; must divide hidden_dim
    dropout: float = _min(0.1, 0.0)  # dropout inside the decoder
    vocab: str = _choice("train", ("train", "full"))  # train: tokens seen in training captions
    vocab_size: int = _recorded(0)  # recorded: decoder vocabulary size, from the captions; 0 = not yet known


@dataclass(frozen=True)
class ModelConfig:
    """The whole SSB model."""

    name: str = ""  # registered name (models/NAME.toml) this config came from
    embed_dim: int = _min(256, 8)  # joint video-text embedding size D
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    support: SupportSetConfig = field(default_factory=SupportSetConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass(frozen=True)
class LossConfig:
    """L = L_contrastive + caption_weight * L_caption."""

    contrastive: str = _choice("infonce", ("infonce", "max_margin"))  # the paper used max_margin
    margin: float = _min(0.2, 0.0)  # max_margin only
    # max_margin only: mean: the hinge averaged over the negative pairs (MMT's; its scale does not
    # grow with the batch); sum: summed over negatives and divided by the batch (ssbctl <= 0.x's)
    margin_reduction: str = _choice("mean", ("mean", "sum"))
    init_temperature: float = _min(0.07, 1e-4)  # InfoNCE: initial value of the learned temperature
    max_logit_scale: float = _min(100.0, 1.0)  # InfoNCE: clamp of 1/temperature
    caption_weight: float = _min(1.0, 0.0)  # lambda


@dataclass(frozen=True)
class DataConfig:
    """Which prepared data to train and validate on."""

    prepared: str = "shapes-pixels"  # prepared folder, or a name under $SSBCTL_HOME/data
    experts: tuple[str, ...] = ()  # more prepared folders of the same videos (other backbones)
    train_split: str = "train"  # split trained on
    eval_split: str = "val"  # split evaluated after each epoch ("" to skip)
    num_workers: int = _min(0, 0)  # DataLoader worker processes


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision and bookkeeping."""

    output_dir: str = "runs/run"  # run folder: checkpoints, resolved recipe, metrics
    epochs: int = _min(10, 1)  # passes over the (video, caption) pairs
    max_steps: int = _min(0, 0)  # stop after this many optimizer steps; 0 = run all epochs
    batch_size: int = _min(64, 2)  # GLOBAL batch of (video, caption) pairs, split over processes; = support set
    accum_steps: int = _min(1, 1)  # micro-batches per step; the loss still sees the whole batch (GradCache)
    lr: float = _min(1e-3, 0.0)  # peak learning rate of the new (non-pretrained) parameters
    text_lr: float = _min(1e-5, 0.0)  # peak learning rate of the pretrained text encoder
    weight_decay: float = _min(0.01, 0.0)  # AdamW decoupled weight decay
    warmup_steps: int = _min(50, 0)  # linear warmup, then cosine decay
    min_lr_ratio: float = _min(0.01, 0.0)  # cosine floor as a fraction of the peak
    grad_clip: float = _min(1.0, 0.0)  # max global gradient norm; 0 = off
    precision: str = _choice("bf16", ("bf16", "fp16", "fp32"))  # AMP on CUDA; CPU always fp32
    device: str = _choice("auto", DEVICES)  # auto: CUDA when present
    compile: bool = False  # wrap the model in torch.compile
    # torch.compile's backend: inductor generates kernels (minutes to compile on a CPU); eager only traces
    compile_backend: str = _choice("inductor", ("inductor", "aot_eager", "eager"))
    seed: int = 0  # seeds data order, initialisation and dropout
    log_every: int = _min(10, 1)  # steps between metrics.jsonl lines
    ckpt_every: int = _min(0, 0)  # steps between checkpoints; 0 = at the end of each epoch
    keep_checkpoints: int = _min(2, 1)  # newest checkpoints kept on disk
    # A run that makes no progress fails (TrainingError, nothing saved in the bad stretch) after this many
    # non-finite losses in a row, counted across epochs, or after a whole epoch of them if that is fewer.
    max_nonfinite: int = _min(20, 1)
    report_to: tuple[str, ...] = ()  # metric trackers besides metrics.jsonl: "tensorboard", "wandb"


@dataclass(frozen=True)
class Recipe:
    """A complete training recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------- building from dicts


def _check_type(key: str, value: Any, kind: Any) -> Any:
    """Return ``value`` as ``kind`` or raise a UserError naming ``key``."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"recipe key '{key}' must be a list, got {value!r}")
        (inner, _) = typing.get_args(kind)
        return tuple(_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind in (int, float) and isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"recipe key '{key}' must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # nan, inf and 1e400 parse as TOML floats
        raise UserError(f"recipe key '{key}' must be a finite number, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", recorded: bool = False) -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types.

    Recorded fields (see :func:`_recorded`) are accepted only with ``recorded``: when reading what
    a run wrote, never from a user's recipe or ``--set``."""
    if not isinstance(data, dict):
        raise UserError(f"recipe key '{prefix.rstrip('.')}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        if name not in fields:
            raise UserError(f"unknown recipe key '{key}'")
        kind = hints[name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, key + ".", recorded)
            continue
        meta = fields[name].metadata
        if meta.get("recorded") and not recorded:
            raise UserError(f"recipe key '{key}' is recorded by training (in the run's run.json), not set "
                            "in a recipe; remove it")
        value = _check_type(key, value, kind)
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"recipe key '{key}' must be one of {', '.join(meta['choices'])}, got {value!r}")
        if "min" in meta and value < meta["min"]:
            raise UserError(f"recipe key '{key}' must be >= {meta['min']}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain nested dict (tuples become lists) for TOML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; nested tables merge key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` as ``{"train": {"lr": 3e-4}}``; values are TOML, bare words strings."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# ---------------------------------------------------------------- files


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error or non-UTF-8 text becomes a UserError naming the file."""
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def model_dict(name: str) -> dict[str, Any]:
    """The raw table of a registered model config (by name or path)."""
    path = find_config("models", name)
    data = read_toml(path)
    if "name" in data:
        raise UserError(f"{path}: a model config has no 'name' key (its name is its file name, "
                        f"{path.stem!r}); remove it")
    return {**data, "name": path.stem}


def build_model_config(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a table that may start from a registered ``name``."""
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise UserError(f"recipe key 'model.name' must be str, got {name!r}")
    base = model_dict(name) if name else {}
    return check_model(from_dict(ModelConfig, deep_merge(base, data), "model."))


def check_model(cfg: ModelConfig) -> ModelConfig:
    """Constraints between model fields that one field's bounds cannot express; returns ``cfg``."""
    for part in ("video", "decoder"):
        sub = getattr(cfg, part)
        if sub.hidden_dim % sub.heads:
            raise UserError(f"recipe key 'model.{part}.heads' must divide model.{part}.hidden_dim="
                            f"{sub.hidden_dim}, got {sub.heads}")
    return cfg


def check_recipe(recipe: Recipe) -> Recipe:
    """Constraints between recipe fields (the model's included); returns ``recipe``."""
    check_model(recipe.model)
    train = recipe.train
    if train.accum_steps > train.batch_size:
        raise UserError(f"recipe key 'train.accum_steps' must be at most train.batch_size={train.batch_size} "
                        f"(each micro-batch needs a pair), got {train.accum_steps}")
    return recipe


def load_model_config(name: str) -> ModelConfig:
    """Load and validate ``models/NAME.toml`` (or a path)."""
    return build_model_config({"name": name})


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe by name or path, apply ``key=value`` overrides and validate it."""
    raw = read_toml(find_config("recipes", str(recipe)))
    for item in overrides:
        raw = deep_merge(raw, parse_override(item))
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict[str, Any], resolve_model: bool = True) -> Recipe:
    """Validate a whole recipe table. With ``resolve_model`` the model table starts from the
    registered config it names; a run's resolved recipe is complete and is read as it is."""
    raw = dict(raw)
    model = raw.pop("model", {})
    if not isinstance(model, dict):
        raise UserError(f"recipe key 'model' must be a table, got {model!r}")
    recipe = from_dict(Recipe, raw)
    model_cfg = build_model_config(model) if resolve_model else from_dict(ModelConfig, model, "model.", True)
    return check_recipe(dataclasses.replace(recipe, model=model_cfg))


def recorded_paths(cls: type = Recipe, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The key paths of every recorded field under ``cls`` (``("model", "video", "input_dims")``...)."""
    out: list[tuple[str, ...]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out += recorded_paths(kind, prefix + (f.name,))
        elif f.metadata.get("recorded"):
            out.append(prefix + (f.name,))
    return out


def split_recorded(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A recipe dict as (what a user can set, the recorded values), both nested dicts."""
    user = copy.deepcopy(data)
    recorded: dict[str, Any] = {}
    for path in recorded_paths():
        node, out = user, recorded
        for part in path[:-1]:
            node = node.get(part, {})
            out = out.setdefault(part, {})
        if path[-1] in node:
            out[path[-1]] = node.pop(path[-1])
    return user, recorded


def dump_toml(data: dict[str, Any], header: str = "") -> str:
    """A nested dict of scalars and lists as TOML (tomli-w escapes what TOML strings cannot hold
    raw, such as control characters), under ``header`` (comment lines)."""
    body = tomli_w.dumps(data)
    return f"{header}\n{body}" if header else body
