"""CUDA checks for ssbctl: AMP loss parity against fp32, real training steps, timings.

Needs only torch, transformers and safetensors (no decord, no hub): the prepared store is made
of random frame features with captions from the shapes templates, the text model is a random
BERT built from a config and loaded back through ``from_pretrained``, with the MiniLM tokenizer
files given by ``--tokenizer``. Runs the real ``Trainer`` step (autocast, GradScaler for fp16,
unscale before clipping) and a short ``fit`` with a checkpoint.

    bash benchmarks/device_check.sh            # on a CUDA machine; prints a Markdown report
    python benchmarks/device_check.py --smoke  # a tiny CPU run that checks the script itself
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssbctl.config import load_recipe
from ssbctl.core.io import read_jsonl
from ssbctl.core.memory import reuse_freed_memory
from ssbctl.data.backbones import Backbone
from ssbctl.data.datasets.shapes import ShapesSpec, captions, sample_scene
from ssbctl.data.loader import Collate
from ssbctl.data.store import StoreWriter
from ssbctl.data.video import Sampling
from ssbctl.engine.trainer import METRICS_FILE, Trainer

CONFIGS = {
    # the shapes recipe's model: 32x32 pixels features through the cnn stem, frozen MiniLM-sized text encoder
    "shapes": {"frames": 8, "dim": 3072, "batch": 64, "text": dict(hidden_size=384, num_hidden_layers=6,
                                                                   num_attention_heads=12, intermediate_size=1536),
               "set": ["model.text.trainable_layers=0"]},
    # CLIP-sized: 12 frames of 512-d CLIP ViT-B/32 features, BERT-base-sized text encoder fine-tuned,
    # a 4-layer width-512 video transformer and the full 30k-token decoder vocabulary
    "clip-sized": {"frames": 12, "dim": 512, "batch": 256,
                   "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                   "set": ["model.text.trainable_layers=-1", 'model.video.stem="linear"', "model.embed_dim=512",
                           "model.video.hidden_dim=512",
                           "model.video.layers=4", "model.video.heads=8", "model.decoder.hidden_dim=512",
                           "model.decoder.heads=8", 'model.decoder.vocab="full"', "model.text.max_tokens=32"]},
}


class RandomFeatures(Backbone):
    """Names the store's features in the manifest; the features themselves are random."""

    name = "random"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def options(self) -> dict:
        return {}

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        return torch.randn(len(frames), self.dim)


def make_store(root: Path, videos: int, frames: int, dim: int) -> Path:
    """A prepared store of random features with shapes-template captions (train split only)."""
    writer = StoreWriter(root, "synthetic", RandomFeatures(dim), Sampling(num_frames=frames))
    gen = torch.Generator().manual_seed(0)
    spec = ShapesSpec()
    for i in range(videos):
        rng = np.random.default_rng([0, i])
        writer.add(f"v{i:05d}", "train", "", torch.randn(frames, dim, generator=gen),
                   captions(rng, sample_scene(rng, spec), 4))
    writer.commit()
    return root


def make_text_model(folder: Path, tokenizer_dir: Path, size: dict) -> Path:
    """A random BERT of the given size with the real tokenizer, saved for ``from_pretrained``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), **size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_trainer(work: Path, name: str, precision: str, tokenizer_dir: Path, smoke: bool,
                  device: str | None = None, videos: int = 2048, extra: tuple[str, ...] = ()) -> Trainer:
    cfg = CONFIGS[name]
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    text = dict(cfg["text"], **small) if smoke else cfg["text"]
    store = work / f"store-{name}"
    if not store.exists():
        make_store(store, 64 if smoke else videos, cfg["frames"], cfg["dim"])
    model_dir = work / f"text-{name}"
    if not model_dir.exists():
        make_text_model(model_dir, tokenizer_dir, text)
    batch = 8 if smoke else cfg["batch"]
    recipe = load_recipe("shapes", [f'data.prepared="{store}"', f'model.text.pretrained="{model_dir}"',
                                    f'train.precision="{precision}"', f"train.batch_size={batch}",
                                    'data.eval_split=""', "train.max_steps=1000000", *cfg["set"],
                                    f'train.device="{device or ("cpu" if smoke else "cuda")}"', *extra])
    run = work / f"run-{name}-{precision}-{time.monotonic_ns()}"
    return Trainer(recipe, run)


def loss_parity(trainer: Trainer) -> dict[str, float]:
    """Forward loss terms of one fixed batch under fp32, bf16 and fp16 autocast (eval mode)."""
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_size=trainer.cfg.batch_size,
                                         collate_fn=Collate(trainer.tokenizer, trainer.recipe.model.text.max_tokens))
    batch = next(iter(loader)).to(trainer.device)
    trainer.model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if dtype is not None and trainer.device.type != "cuda":
                continue
            with torch.autocast(trainer.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                terms = trainer.model(batch)
            for k, v in terms.items():
                out[f"{name}/{k}"] = float(v)
    trainer.model.train()
    return out


def peak_matmul(device: torch.device, dtype: torch.dtype, n: int = 4096, reps: int = 10, trials: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matrix product (the ceiling the training step is compared to).

    The best of ``trials`` timings, so a moment of contention on the machine does not lower it."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(trials):
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def step_flops(trainer: Trainer, batch) -> float:
    """FLOPs of one training step (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with trainer._autocast():
            terms = trainer.model(batch.to(trainer.device))
        terms["loss"].backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_steps(trainer: Trainer, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds per real training step, clips/s, and the loss first and last."""
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_sampler=trainer.sampler, num_workers=2, pin_memory=True,
                                         collate_fn=Collate(trainer.tokenizer, trainer.recipe.model.text.max_tokens))
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == min(len(trainer.sampler), warmup + steps):
            break
    trainer.model.train()
    times, losses = [], []
    with reuse_freed_memory(trainer.device.type == "cpu"):  # as Trainer.fit runs on the CPU
        for i in range(warmup + steps):
            batch = batches[i % len(batches)]
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            terms, _ = trainer.train_step(batch)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            losses.append(float(terms["loss"]) if terms else float("nan"))
    step_s = statistics.median(times)
    flops = step_flops(trainer, batches[0])
    return {"step_ms": 1000 * step_s, "clips_per_s": trainer.cfg.batch_size / step_s,
            "gflop_per_step": flops / 1e9, "achieved_tflops": flops / step_s / 1e12,
            "loss_first": losses[0], "loss_last": losses[-1],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else 0.0}


ACCUM = 4  # micro-batches per step in the accumulation timing


def time_accumulated(work: Path, name: str, precision: str, tokenizer_dir: Path, smoke: bool, warmup: int,
                     steps: int, device: str | None = None, videos: int = 2048) -> dict[str, float]:
    """``time_steps`` of the same global batch split into ``ACCUM`` micro-batches (GradCache)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(work, name, precision, tokenizer_dir, smoke, device, videos,
                            extra=(f"train.accum_steps={ACCUM}",))
    timing = time_steps(trainer, warmup=warmup, steps=steps)
    print(f"# {name} {precision} accum {ACCUM}: {json.dumps(timing)}", file=sys.stderr, flush=True)
    return timing


def short_fit(work: Path, tokenizer_dir: Path, smoke: bool) -> dict:
    """A real ``fit`` (bf16 on CUDA, 4 loader workers) for 30 steps with a checkpoint, then resume
    for 10 more; reports the share of the time the loop waited for batches."""
    workers = 0 if smoke else 4
    trainer = build_trainer(work, "shapes", "bf16", tokenizer_dir, smoke,
                            extra=(f"data.num_workers={workers}", "train.log_every=10"))
    trainer.total_steps = 30
    first = trainer.fit()
    resumed = Trainer(dataclasses.replace(trainer.recipe, train=dataclasses.replace(trainer.cfg, max_steps=40)),
                      trainer.run_dir, resume=True).fit()
    waits = [r["data_wait"] for r in read_jsonl(trainer.run_dir / METRICS_FILE) if "data_wait" in r]
    return {"first_steps": first["steps"], "resumed_to": resumed["steps"], "nonfinite": resumed["nonfinite_steps"],
            "loader_workers": workers, "data_wait": statistics.mean(waits) if waits else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="Folder with the MiniLM tokenizer files.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes on the CPU (checks the script).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("device_check: CUDA is not available")
    with tempfile.TemporaryDirectory(prefix="ssb-device-") as work:  # removed afterwards, even on failure
        report = measure(Path(work), args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def measure(work: Path, args: argparse.Namespace) -> dict:
    """Every measurement, with its data and runs under ``work``."""
    report: dict = {"torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    precisions = ["fp32"] if args.smoke or not torch.cuda.is_available() else ["fp32", "bf16", "fp16"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    report["peak_tflops"] = {p: peak_matmul(device, dtypes[p], 1024 if device.type == "cpu" else 8192) / 1e12
                             for p in precisions}
    for name in CONFIGS:
        parity = loss_parity(build_trainer(work, name, "fp32", args.tokenizer, args.smoke))
        report[f"{name}/parity"] = parity
        print(f"# {name} loss parity: {json.dumps(parity)}", file=sys.stderr, flush=True)
        for precision in precisions:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            timing = time_steps(build_trainer(work, name, precision, args.tokenizer, args.smoke),
                                warmup=2 if args.smoke else 10, steps=3 if args.smoke else 30)
            report[f"{name}/{precision}"] = timing
            print(f"# {name} {precision}: {json.dumps(timing)}", file=sys.stderr, flush=True)
        precision = precisions[1] if len(precisions) > 1 else "fp32"
        report[f"{name}/{precision}/accum{ACCUM}"] = time_accumulated(
            work, name, precision, args.tokenizer, args.smoke,
            warmup=2 if args.smoke else 5, steps=3 if args.smoke else 15)
    report["fit_and_resume"] = short_fit(work, args.tokenizer, args.smoke)
    return report


def print_report(report: dict) -> None:
    print(f"device: {report['device']}, torch {report['torch']}; measured matmul peak TFLOP/s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in report["peak_tflops"].items()))
    for name in CONFIGS:
        parity = report[f"{name}/parity"]
        ref = parity["fp32/loss"]
        diffs = ", ".join(f"{p} {abs(parity[f'{p}/loss'] - ref) / abs(ref):.2e}"
                          for p in ("bf16", "fp16") if f"{p}/loss" in parity)
        print(f"\n{name}: fp32 loss {ref:.4f}; relative difference of the AMP loss: {diffs or 'n/a'}")
        print("| precision | step ms | clips/s | speed-up vs fp32 | TFLOP/s | of matmul peak | peak GiB "
              "| loss first -> last |")
        print("|---|---|---|---|---|---|---|---|")
        base = report[f"{name}/fp32"]["clips_per_s"]
        for p in ("fp32", "bf16", "fp16"):
            if f"{name}/{p}" in report:
                t = report[f"{name}/{p}"]
                peak = report["peak_tflops"].get(p, report["peak_tflops"]["fp32"])
                print(f"| {p} | {t['step_ms']:.1f} | {t['clips_per_s']:.0f} | {t['clips_per_s'] / base:.2f}x | "
                      f"{t['achieved_tflops']:.3f} | {t['achieved_tflops'] / peak:.1%} | "
                      f"{t['peak_mem_gib']:.2f} | {t['loss_first']:.3f} -> {t['loss_last']:.3f} |")
    rows = [(key.split("/")[0], key.split("/")[1]) for key in report if key.endswith(f"/accum{ACCUM}")]
    if rows:
        print(f"\ngradient accumulation: the same global batch in {ACCUM} micro-batches (GradCache) against one")
        print("| config | precision | step ms, 1 -> 4 | time ratio | peak GiB, 1 -> 4 |")
        print("|---|---|---|---|---|")
        for name, p in rows:
            one, four = report[f"{name}/{p}"], report[f"{name}/{p}/accum{ACCUM}"]
            print(f"| {name} | {p} | {one['step_ms']:.1f} -> {four['step_ms']:.1f} | "
                  f"{four['step_ms'] / one['step_ms']:.2f}x | " + (
                      f"{one['peak_mem_gib']:.2f} -> {four['peak_mem_gib']:.2f} |" if one["peak_mem_gib"]
                      else "n/a (CPU) |"))
    if "fit_and_resume" in report:
        print(f"\nfit + resume: {report['fit_and_resume']}")


if __name__ == "__main__":
    main()
