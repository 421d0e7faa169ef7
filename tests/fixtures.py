"""Builders of small datasets in their publishers' real layouts, with generated video files, tiny
random stand-ins (text models, feature stores), and helpers shared by the tests that launch processes."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from ssbctl.data.datasets.shapes import ShapesSpec, render, sample_scene, write_mp4

SHARED = Path(__file__).resolve().parents[1] / "ssbctl" / "data" / "splits"
SPEC = ShapesSpec(frame_size=32, min_seconds=1.0, max_seconds=1.5)


def write_clip(path: Path, seed: int) -> Path:
    """A short real video (H.264; an .avi gets MPEG-4 in AVI) of a shapes scene."""
    rng = np.random.default_rng([seed, 99])
    frames = render(rng, sample_scene(rng, SPEC), SPEC.frame_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".avi":
        import av

        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    else:
        write_mp4(path, frames, 8)
    return path


def _head(path: Path, n: int) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()][:n]


def msrvtt(root: Path, n_train: int = 4, n_test: int = 3) -> Path:
    """MSRVTT_data.json, cut-down 9k and JSFUSION files from the real ones, videos/all/videoN.mp4."""
    train_ids = _head(SHARED / "msrvtt" / "MSRVTT_train.9k.csv", n_train + 1)[1:]
    test_rows = _head(SHARED / "msrvtt" / "MSRVTT_JSFUSION_test.csv", n_test + 1)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "MSRVTT_train.9k.csv").write_text("\n".join(["video_id", *train_ids]) + "\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(test_rows) + "\n")
    test_ids = [r.split(",")[2] for r in test_rows[1:]]
    sentences = [{"video_id": v, "caption": f"caption {k} of {v}", "sen_id": i}
                 for i, (v, k) in enumerate((v, k) for v in train_ids + test_ids for k in range(3))]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [{"video_id": v} for v in train_ids + test_ids],
                                                       "sentences": sentences}))
    for i, vid in enumerate(train_ids + test_ids):
        write_clip(root / "videos" / "all" / f"{vid}.mp4", i)
    return root


def msvd(root: Path, per_split: int = 2) -> Path:
    """raw-captions.pkl, the first ids of the real split lists, YouTubeClips/<id>.avi."""
    caps = {}
    for split in ("train", "val", "test"):
        ids = _head(SHARED / "msvd" / f"{split}_list.txt", per_split)
        (root / f"{split}_list.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_list.txt").write_text("\n".join(ids) + "\n")
        for i, vid in enumerate(ids):
            caps[vid] = [["a", "man", "is", "cooking", str(i)], ["someone", "cooks", split]]
            write_clip(root / "YouTubeClips" / f"{vid}.avi", hash(vid) % 1000)
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(caps))
    return root


def vatex(root: Path, per_split: int = 2) -> Path:
    """vatex_*_v1.0.json with 10 English captions each, HGR-style split lists, videos by videoID."""
    entries = {"train": [], "val": [], "test": []}
    for split in entries:
        for i in range(per_split):
            vid = f"{split}Vid{i:02d}_000010_000020"
            entries[split].append({"videoID": vid, "enCap": [f"{split} caption {k}" for k in range(10)],
                                   "chCap": ["中文"] * 10})
            write_clip(root / "videos" / f"{vid}.mp4", i + 10 * len(split))
        (root / f"{split}_list.txt").write_text("\n".join(e["videoID"] for e in entries[split]) + "\n")
    (root / "vatex_training_v1.0.json").write_text(json.dumps(entries["train"]))
    (root / "vatex_validation_v1.0.json").write_text(json.dumps(entries["val"] + entries["test"]))
    return root


def activitynet(root: Path, per_split: int = 2) -> Path:
    """train.json / val_1.json keyed by real v_ ids; half the files named without the v_ prefix."""
    for split, lst in (("train", "train_list.txt"), ("val_1", "val_1_list.txt")):
        ids = _head(SHARED / "activitynet" / lst, per_split)
        data = {vid: {"duration": 10.0, "timestamps": [[0, 4], [4, 10]],
                      "sentences": [f" {vid} starts.", f"Then {split} ends. "]} for vid in ids}
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.json").write_text(json.dumps(data))
        for i, vid in enumerate(ids):
            name = vid if i % 2 == 0 else vid[2:]
            write_clip(root / "videos" / f"{name}.mp4", i + 7)
    return root


def didemo(root: Path) -> Path:
    """train_data.json / test_data.json lists (CLIP4Clip layout) and their videos."""
    for split, vids in (("train", ["a1@N1_111.mov", "b2@N2_222.mp4"]), ("test", ["c3@N3_333.avi"])):
        rows = [{"video": v, "description": f"sentence {k} of {v}", "times": [[0, 1]]} for v in vids for k in range(2)]
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_data.json").write_text(json.dumps(rows))
        for i, v in enumerate(vids):
            write_clip(root / "videos" / f"{v}.mp4", i + 3)
    return root


def misbehaving_decode(path: Path, sampling: dict, features: bool, decoders: tuple[str, ...] | None = None):
    """The real decoder, except that it dies on ``crash.mp4`` and hangs on ``hang.mp4`` (run in a
    worker), whichever decoders it is asked to use."""
    import os
    import time

    from ssbctl.data.decode_pool import decode_job

    if path.name == "crash.mp4":
        os._exit(139)
    if path.name == "hang.mp4":
        time.sleep(600)
    return decode_job(path, sampling, features, decoders)


def tiny_text_model(folder: Path, family: str, dropout: float | None = None, seq2seq: bool = False) -> Path:
    """A random 1-layer text model of ``family`` (bert, t5, clip) with a small word-level tokenizer;
    ``dropout`` replaces the family's default dropout rates (0.0: deterministic outputs); ``seq2seq``
    (t5): a whole T5 with its decoder (what ``model.decoder.kind = "t5"`` needs), not the encoder alone."""
    import torch
    import transformers

    fast = word_tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=len(fast), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    rates = {"t5": ("dropout_rate",), "clip": ("attention_dropout",),
             "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob")}[family]
    common.update({} if dropout is None else dict.fromkeys(rates, dropout))
    if family == "t5":
        t5 = transformers.T5ForConditionalGeneration if seq2seq else transformers.T5EncoderModel
        model = t5(transformers.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                         decoder_start_token_id=0, **common))
    elif family == "clip":  # with CLIP's text projection (512-d, as CLIPTextConfig's default), as CLIP has
        model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=64, **common))
    else:
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, **common))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def word_tokenizer() -> Any:
    """A fast word-level tokenizer over the shapes captions' words: ``<s> ... </s>``, pad id 0."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(
        "a the red green blue yellow purple white small large big little tiny circle ball square box "
        "triangle cross moves to left right up down grows shrinks spins still follows towards person cooks "
        "man".split()))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def tiny_dual_encoder(folder: Path, family: str = "clip", projection_dim: int = 16) -> Path:
    """A random whole ``CLIPModel`` (or ``SiglipModel``: ``family="siglip"``) with 1-layer towers, a
    joint space of ``projection_dim`` (SigLIP: its text width), the word tokenizer and a 32x32 image
    processor, saved with ``save_pretrained`` as a hub checkpoint folder is laid out."""
    import torch
    import transformers

    fast = word_tokenizer()
    torch.manual_seed(0)
    tower = dict(num_hidden_layers=1, num_attention_heads=2)
    text = dict(vocab_size=len(fast), pad_token_id=0, bos_token_id=2, eos_token_id=3, max_position_embeddings=64,
                intermediate_size=32, **tower)
    vision = dict(hidden_size=32, intermediate_size=64, image_size=32, patch_size=8, **tower)
    if family == "clip":
        model: Any = transformers.CLIPModel(transformers.CLIPConfig(
            text_config={**text, "hidden_size": 24}, vision_config=vision, projection_dim=projection_dim))
        processor: Any = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32})
    else:  # SigLIP's text head keeps the text width; its image head the vision width: both projection_dim
        model = transformers.SiglipModel(transformers.SiglipConfig(
            text_config={**text, "hidden_size": projection_dim},
            vision_config={**vision, "hidden_size": projection_dim}))
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def decord_aborts_decode(path: Path, sampling: dict, features: bool, decoders: tuple[str, ...] | None = None):
    """The real decoder, except that the process aborts while decord would run (as decord can on
    a file FFmpeg reads); asked for PyAV alone, it decodes (run in a worker)."""
    import os

    from ssbctl.data.decode_pool import decode_job

    if decoders is None or "decord" in decoders:
        os.abort()
    return decode_job(path, sampling, features, decoders)


CAPTION_WORDS = {  # all in tiny_text_model's vocabulary
    "size": ["small", "large", "big", "little", "tiny"],
    "colour": ["red", "green", "blue", "yellow", "purple", "white"],
    "shape": ["circle", "ball", "square", "box", "triangle", "cross"],
    "motion": ["moves to the left", "moves to the right", "moves up", "moves down", "grows", "shrinks", "spins"],
}


def random_stores(roots: list[Path], dims: list[int], splits: dict[str, int], captions_per_video: int = 2,
                  max_frames: int = 6, seed: int = 0) -> list[Path]:
    """Prepared stores of random features, one per expert (``roots[e]`` with ``dims[e]``-d frames),
    for the same videos: ``splits`` maps split -> number of videos; each video gets 1..max_frames
    frames and ``captions_per_video`` captions made of tiny_text_model's words."""
    import torch

    from ssbctl.data.backbones import ImportedFeatures
    from ssbctl.data.store import StoreWriter
    from ssbctl.data.video import Sampling

    rng = np.random.default_rng(seed)
    writers = [StoreWriter(root, "random", ImportedFeatures(dim, "random"), Sampling(num_frames=max_frames))
               for root, dim in zip(roots, dims)]
    gen = torch.Generator().manual_seed(seed)
    for split, count in splits.items():
        for i in range(count):
            vid, frames = f"{split}-{i:03d}", int(rng.integers(1, max_frames + 1))
            captions = [" ".join(["a", *(str(rng.choice(words)) for words in CAPTION_WORDS.values())])
                        for _ in range(captions_per_video)]
            for writer, dim in zip(writers, dims):
                writer.add(vid, split, f"{vid}.mp4", torch.randn(frames, dim, generator=gen), captions)
    for writer in writers:
        writer.commit()
    return roots


def write_recipe(path: Path, overrides: list[str], recipe: str = "shapes") -> Path:
    """A recipe file equal to the shipped ``recipe`` with ``overrides``, as a user would write it."""
    from ssbctl.config import deep_merge, dump_toml, parse_override, read_toml
    from ssbctl.core.paths import find_config

    raw = read_toml(find_config("recipes", recipe))
    for item in overrides:
        raw = deep_merge(raw, parse_override(item))
    path.write_text(dump_toml(raw, f"# Launch:\n#   ssbctl train --recipe {path}"))
    return path


def children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    return [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]


def communicate_or_reap(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc.communicate``; on a timeout (ranks hung in a collective) kill its whole tree first."""
    import contextlib
    import os
    import signal

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree, todo = [], [proc.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children(pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise


class GradientRecorder:
    """A trainer reporter that keeps each step's gradients (as the optimizer used them: averaged
    over ranks and clipped) in float64, and saves them to ``path`` when training stops."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.module: Any = None  # the trainer's unwrapped model, set once the trainer exists
        self.steps: dict[int, dict[str, Any]] = {}

    def start(self, total: int, done: int) -> None: ...
    def note(self, text: str) -> None: ...

    def step(self, step: int, terms: dict[str, float] | None, clips_per_s: float) -> None:
        import torch

        self.steps[step] = {name: p.grad.detach().to(torch.float64).clone()
                            for name, p in self.module.named_parameters() if p.grad is not None}

    def stop(self) -> None:
        import torch

        torch.save(self.steps, self.path)


def train_recording_gradients(recipe: str, overrides: list[str], run_dir: Path, grads: Path) -> dict[str, Any]:
    """Train the shipped ``recipe`` with ``overrides`` into ``run_dir``; rank 0 saves every
    step's gradients to ``grads``. Runs alike in one process and under torchrun."""
    from ssbctl.config import load_recipe
    from ssbctl.engine.trainer import Trainer
    from ssbctl.evaluation.evaluate import evaluate_split

    recorder = GradientRecorder(grads)
    trainer = Trainer(load_recipe(recipe, overrides), Path(run_dir), reporter=recorder, evaluate=evaluate_split)
    recorder.module = trainer.module
    return trainer.fit()
