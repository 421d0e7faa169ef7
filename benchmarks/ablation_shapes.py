"""Ablation of the support-set mask on the synthetic shapes dataset.

Trains the shapes recipe with masks none (contrastive only), identity (plain captioning),
full and cross on the same prepared data and the same seeds, then prints the test metrics
side by side (mean and spread over seeds). ``--set`` overrides the recipe for every run
(``--set loss.contrastive=max_margin`` trains with the paper's hinge, averaged over negatives).

    python benchmarks/ablation_shapes.py --seeds 0 1 2 --epochs 15
    python benchmarks/ablation_shapes.py --seeds 0 1 2 --epochs 12 --set loss.contrastive=max_margin --work W

With ``--work``, each finished run's metrics are kept there (``result-MASK-SEED.json``) and the
table so far is printed after every run: a rerun with the same folder skips what is done and
resumes a run it stopped in.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.evaluation.evaluate import evaluate_split
from ssbctl.inference.run import load_run
from ssbctl.training import train

MASKS = ("none", "identity", "full", "cross")
KEYS = ("R1", "R5", "R10", "MdR")


def run_one(data: Path, out: Path, mask: str, seed: int, epochs: int, extra: list[str]) -> dict:
    """Train one mask and seed into ``out`` and evaluate it on the test split; the metrics are kept
    beside it as JSON. A run stopped there before is resumed from its last checkpoint (on the CPU
    that ends with the weights of an uninterrupted run), one without a checkpoint started over."""
    done = out.parent / f"result-{mask}-{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())
    resume = latest_checkpoint(out) is not None
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    recipe = load_recipe("shapes", [f'data.prepared="{data}"', f'model.support.mask="{mask}"',
                                    f"train.seed={seed}", f"train.epochs={epochs}", 'data.eval_split=""', *extra])
    summary = train(recipe, out, resume=resume)
    if summary["stopped_by"] is not None:  # a stopped run is resumed by the next rerun, never scored
        raise SystemExit(f"stopped by {summary['stopped_by']} in {out}; rerun to resume")
    loaded = load_run(out)
    result = evaluate_split(loaded.model, loaded.tokenizer, FeatureStore(data), "test", loaded.device)
    done.write_text(json.dumps(result))
    return result


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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Recipe override for every run (repeatable).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ssb-ablation-"))
    data = work / "data"
    if not (data / "manifest.json").is_file():
        items = dataset_items("shapes", work / "raw", None, ShapesSpec(num_videos=args.num_videos))
        prepare_items(items, data, "shapes", build_backbone("pixels"), Sampling())
    results: dict[str, list[dict]] = {m: [] for m in args.masks}
    for seed in args.seeds:
        for mask in args.masks:
            start = time.time()
            results[mask].append(run_one(data, work / f"run-{mask}-{seed}", mask, seed, args.epochs, args.overrides))
            t2v = results[mask][-1]["t2v"]
            print(f"# seed {seed} mask {mask}: t2v R@1 {t2v['R1']:.1f} R@5 {t2v['R5']:.1f} "
                  f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
            print_table(results, args, seed)


def print_table(results: dict[str, list[dict]], args: argparse.Namespace, seed: int) -> None:
    """The table of the runs done so far (every mask of the seeds before ``seed``, some of ``seed``)."""
    done = {mask: rows for mask, rows in results.items() if rows}
    n = next(iter(done.values()))[0]
    seeds = args.seeds[:args.seeds.index(seed) + 1]
    print(f"shapes test split: {n['n_queries']} captions x {n['n_videos']} videos; {args.num_videos} clips, "
          f"{args.epochs} epochs, seeds {seeds} (runs per mask: {', '.join(f'{m} {len(r)}' for m, r in done.items())})"
          f"{'; --set ' + ' '.join(args.overrides) if args.overrides else ''}; mean±stdev over seeds")
    header = " | ".join(f"t2v {k}" for k in KEYS) + " | " + " | ".join(f"v2t {k}" for k in KEYS)
    print(f"| mask     | {header} |")
    print("|" + "---|" * (1 + 2 * len(KEYS)))
    for mask, rows in done.items():
        cells = [fmt([r[d][k] for r in rows]) for d in ("t2v", "v2t") for k in KEYS]
        print(f"| {mask:8s} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
