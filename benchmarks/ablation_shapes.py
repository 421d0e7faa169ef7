"""Ablation of the support-set mask on the synthetic shapes dataset.

Trains the shapes recipe with masks none (contrastive only), identity (plain captioning),
full and cross on the same prepared data and the same seeds, then prints the test metrics
side by side (mean and spread over seeds).

    python benchmarks/ablation_shapes.py --seeds 0 1 2 --epochs 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ssbctl.config import load_recipe
from ssbctl.data.backbones import build_backbone
from ssbctl.data.datasets.shapes import ShapesSpec
from ssbctl.data.prepare import dataset_items, prepare_items
from ssbctl.data.store import FeatureStore
from ssbctl.data.video import Sampling
from ssbctl.inference.run import load_run
from ssbctl.training import train
from ssbctl.evaluation.evaluate import evaluate_split

MASKS = ("none", "identity", "full", "cross")
KEYS = ("R1", "R5", "R10", "MdR")


def run_one(data: Path, out: Path, mask: str, seed: int, epochs: int) -> dict:
    recipe = load_recipe("shapes", [f'data.prepared="{data}"', f'model.support.mask="{mask}"',
                                    f"train.seed={seed}", f"train.epochs={epochs}", 'data.eval_split=""'])
    train(recipe, out)
    loaded = load_run(out)
    return evaluate_split(loaded.model, loaded.tokenizer, FeatureStore(data), "test", loaded.device)


def fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:5.1f}" + (f"±{statistics.stdev(values):4.1f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-videos", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--work", type=Path, default=None, help="Folder for data and runs (default: a temp folder).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ssb-ablation-"))
    data = work / "data"
    items = dataset_items("shapes", work / "raw", None, ShapesSpec(num_videos=args.num_videos))
    prepare_items(items, data, "shapes", build_backbone("pixels"), Sampling())
    results: dict[str, list[dict]] = {m: [] for m in args.masks}
    for seed in args.seeds:
        for mask in args.masks:
            start = time.time()
            results[mask].append(run_one(data, work / f"run-{mask}-{seed}", mask, seed, args.epochs))
            t2v = results[mask][-1]["t2v"]
            print(f"# seed {seed} mask {mask}: t2v R@1 {t2v['R1']:.1f} R@5 {t2v['R5']:.1f} "
                  f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    n = results[args.masks[0]][0]
    print(f"shapes test split: {n['n_queries']} captions x {n['n_videos']} videos; {args.num_videos} clips, "
          f"{args.epochs} epochs, seeds {args.seeds}; mean±stdev over seeds")
    header = " | ".join(f"t2v {k}" for k in KEYS) + " | " + " | ".join(f"v2t {k}" for k in KEYS)
    print(f"| mask     | {header} |")
    print("|" + "---|" * (1 + 2 * len(KEYS)))
    for mask, rows in results.items():
        cells = [fmt([r[d][k] for r in rows]) for d in ("t2v", "v2t") for k in KEYS]
        print(f"| {mask:8s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
