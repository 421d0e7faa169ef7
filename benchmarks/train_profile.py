"""Where a CPU training step's time goes: a profile by bucket for the "shapes" and "clip-sized"
configurations of benchmarks/train_throughput.py (same trainers, fp32, CLIP-sized batch cut to
--cpu-batch), with the step's GFLOP/s against the measured matmul peak (issue 15, goal 3).

Each step runs under torch.profiler (CPU, record_shapes, no stacks) and is split as follows; the
library is not edited, the ranges come from this script:

- data: the step's pairs fetched from the trainer's dataset and collated (``Collate``) in the
  main process, inside a ``record_function`` range (the real loop does this in loader workers,
  overlapped with compute; here it is serial, so this is its full cost).
- text encoder / video encoder (incl. its attention) / support-set attention / caption decoder
  layers (self- and cross-attention, FFN) / caption vocabulary head + cross-entropy / loss
  (contrastive, normalisation and gathering of the embeddings): forward pre/post hooks on the
  model's submodules open and close a range around each forward (innermost range wins); the
  head + cross-entropy bucket is ``decoder.head`` plus ``caption_loss`` (wrapped in a range).
  Backward ops are attributed through autograd: each ``autograd::engine::evaluate_function``
  event carries the sequence number of the forward op that made its node, and goes (with
  everything below it) to that op's bucket.
- optimizer: ``clip_grad_norm_`` (wrapped in a range), ``AdamW.step`` and ``zero_grad`` (torch's
  own ``Optimizer.*`` ranges).
- autograd engine (AccumulateGrad): gradient accumulation into ``.grad`` (nodes with no forward op).
- other ops: any op outside every range above (the finiteness check, the scheduler, ...).
- other / Python overhead: the step's wall time minus the sum of all op self-times, i.e. Python,
  hooks and the profiler's own cost; the Python time inside the module ranges is given apart.

Times are per step (the mean of --steps profiled steps after --warmup unprofiled ones). GFLOP/s
use torch's FlopCounterMode count and the median step time measured without the profiler, inside
``reuse_freed_memory`` as ``Trainer.fit`` runs on the CPU (the best of two rounds; two rounds with glibc's
default malloc, interleaved with them, are printed beside it, with the page faults a step takes). The
profiled steps use the default malloc: under the profiler a reused heap fragments and takes fresh pages.

    python benchmarks/train_profile.py --steps 5 [--peak-gflops 95]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import device_check as dc
import ssbctl.objective.losses as losses
from matmul_peak import describe, matmul_peak
from ssbctl.core.memory import reuse_freed_memory
from ssbctl.data.loader import Collate

PREFIX = "bucket:"
ENGINE = "autograd::engine::evaluate_function: "
ORDER = ["data", "text encoder", "video encoder", "support-set attention", "caption decoder layers",
         "caption head + cross-entropy", "loss (contrastive, normalise, gather)", "optimizer",
         "autograd engine (AccumulateGrad)", "other ops"]


def ranged(name: str, fn: Any) -> Any:
    """``fn`` run inside a profiler range of bucket ``name``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + name):
            return fn(*args, **kwargs)
    return wrapper


def hook_ranges(trainer: Any) -> None:
    """Forward hooks that open a bucket range around each named submodule; wrapped functions."""
    model = trainer.module
    named = [(trainer.objective, "loss (contrastive, normalise, gather)"), (model.text, "text encoder"),
             (model.video, "video encoder"), (model.support, "support-set attention"),
             (model.decoder, "caption decoder layers"),
             (getattr(model.decoder, "head", None), "caption head + cross-entropy")]
    for module, name in named:
        if module is None:
            continue
        stack: list[record_function] = []

        def enter(_m: Any, _a: Any, name: str = name, stack: list = stack) -> None:
            stack.append(record_function(PREFIX + name))
            stack[-1].__enter__()

        def leave(_m: Any, _a: Any, _o: Any, stack: list = stack) -> None:
            stack.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    losses.caption_loss = ranged("caption head + cross-entropy", losses.caption_loss)
    torch.nn.utils.clip_grad_norm_ = ranged("optimizer", torch.nn.utils.clip_grad_norm_)


def bucket_of(event: Any, forward: dict[int, str]) -> str:
    """The bucket of an op: its innermost bucket range, or the forward op's bucket of its autograd node."""
    node = event
    while node is not None:
        name = node.name
        if name.startswith(PREFIX):
            return name[len(PREFIX):]
        if name.startswith("Optimizer."):
            return "optimizer"
        if name.startswith(ENGINE):
            return forward.get(node.sequence_nr, "autograd engine (AccumulateGrad)")
        node = node.cpu_parent
    return "other ops"


def attribute(events: list[Any]) -> tuple[dict[str, float], float]:
    """Op self-time (us) per bucket, and the self-time of the bucket ranges (Python inside them)."""
    forward: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(ENGINE) and not e.is_user_annotation \
                and (e.cpu_parent is None or not e.cpu_parent.name.startswith(ENGINE)):
            forward.setdefault(e.sequence_nr, bucket_of(e, {}))
    out: dict[str, float] = defaultdict(float)
    python_in_ranges = 0.0
    for e in events:
        if e.is_user_annotation or e.name.startswith("ProfilerStep"):
            if e.name.startswith(PREFIX) or e.name.startswith("Optimizer."):
                python_in_ranges += e.self_cpu_time_total
            continue
        out[bucket_of(e, forward)] += e.self_cpu_time_total
    return out, python_in_ranges


def step_batches(trainer: Any, n: int) -> list[list[int]]:
    """The pair indices of the trainer's first ``n`` batches (its own sampler)."""
    batches = list(trainer.sampler)
    return [batches[i % len(batches)] for i in range(n)]


def load(trainer: Any, indices: list[int], collate: Collate) -> Any:
    with record_function(PREFIX + "data"):
        return collate([trainer.dataset[i] for i in indices])


def step_times(trainer: Any, collate: Collate, order: list[list[int]], reuse: bool) -> tuple[list[float], list[int]]:
    """Unprofiled wall seconds and minor page faults of one training step per batch of ``order``, inside
    :func:`reuse_freed_memory` (what ``Trainer.fit`` does on the CPU) or with glibc's default malloc."""
    times, faults = [], []
    with reuse_freed_memory(reuse):
        for indices in order:
            batch = collate([trainer.dataset[i] for i in indices])
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times, faults


def profile_config(trainer: Any, warmup: int, steps: int, peak: float) -> str:
    collate = Collate(trainer.tokenizer, trainer.recipe.model.text.max_tokens)
    order = step_batches(trainer, warmup + steps)
    trainer.model.train()
    medians: dict[bool, list[float]] = {False: [], True: []}
    faults: dict[bool, float] = {}
    for reuse in (False, True, False, True):  # interleaved rounds: this machine's speed drifts by the minute
        times, counts = step_times(trainer, collate, order, reuse)
        medians[reuse].append(statistics.median(times[warmup:]))
        faults[reuse] = statistics.median(counts[warmup:])
    step_s, default_s = min(medians[True]), min(medians[False])
    flops = dc.step_flops(trainer, collate([trainer.dataset[i] for i in order[0]]))
    hook_ranges(trainer)
    # glibc's default malloc here: under the profiler the reused heap fragments (its records land between
    # the large blocks) and each step takes fresh pages again, more than without reuse
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=False) as prof:
        start = time.perf_counter()
        for indices in order[warmup:]:
            trainer.train_step(load(trainer, indices, collate))
        wall = (time.perf_counter() - start) / steps * 1e6  # us per step
    events = list(prof.events())
    buckets, python_in = attribute(events)
    ops = sum(buckets.values()) / steps
    lines = [f"step (profiled) {wall / 1e3:.1f} ms, unprofiled median {step_s * 1e3:.1f} ms (best of 2 rounds, "
             f"freed memory reused as in training; glibc's default malloc {default_s * 1e3:.1f} ms, "
             f"{default_s / step_s:.2f}x); {flops / 1e9:.1f} GFLOP/step -> {flops / step_s / 1e9:.1f} GFLOP/s = "
             f"{flops / step_s / peak:.1%} of the {peak / 1e9:.0f} GFLOP/s matmul peak "
             f"(default malloc: {flops / default_s / peak:.1%}; batch {trainer.cfg.batch_size}, "
             f"{torch.get_num_threads()} threads)",
             f"minor page faults per step (median): {faults[True]:.0f} reusing freed memory, {faults[False]:.0f} "
             f"({faults[False] * resource.getpagesize() / 2**20:.0f} MiB of fresh pages) with the default malloc; "
             "the profile below is of a default-malloc step", "",
             "| bucket | ms / step | % of step |", "|---|---|---|"]
    for name in ORDER + sorted(set(buckets) - set(ORDER)):
        if name in buckets:
            lines.append(f"| {name} | {buckets[name] / steps / 1e3:.1f} | {buckets[name] / steps / wall:.1%} |")
    other = wall - ops
    lines.append(f"| other / Python overhead | {other / 1e3:.1f} | {other / wall:.1%} |")
    lines.append(f"| **step** | {wall / 1e3:.1f} | 100% |")
    lines.append(f"\n(of the Python overhead, {python_in / steps / 1e3:.1f} ms is inside the module/optimizer "
                 f"ranges; the sum of op self-times is {ops / 1e3:.1f} ms)\n")
    lines += ["top 15 ops by self CPU time:", "", "| op | calls / step | self ms / step | % of step |",
              "|---|---|---|---|"]
    averages = [a for a in prof.key_averages() if not a.is_user_annotation and not a.key.startswith(PREFIX)]
    for a in sorted(averages, key=lambda a: -a.self_cpu_time_total)[:15]:
        lines.append(f"| {a.key} | {a.count / steps:.0f} | {a.self_cpu_time_total / steps / 1e3:.1f} | "
                     f"{a.self_cpu_time_total / steps / wall:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=None, help="MiniLM tokenizer folder (default: builtin).")
    parser.add_argument("--cpu-batch", type=int, default=16, help="CLIP-sized batch on the CPU.")
    parser.add_argument("--steps", type=int, default=5, help="Profiled steps per configuration.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-gflops", type=float, default=None, help="Skip measuring the matmul peak.")
    parser.add_argument("--configs", nargs="+", default=list(dc.CONFIGS), choices=list(dc.CONFIGS))
    args = parser.parse_args()
    if args.tokenizer is None:
        from ssbctl.model.text_encoder import builtin_models

        args.tokenizer = builtin_models()["all-MiniLM-L6-v2"]
    dc.CONFIGS["clip-sized"]["batch"] = args.cpu_batch
    if args.peak_gflops is None:
        measured = matmul_peak()
        print(describe(measured), flush=True)
        args.peak_gflops = measured["peak_gflops"]
    work = Path(tempfile.mkdtemp(prefix="ssb-profile-"))
    for name in args.configs:
        trainer = dc.build_trainer(work, name, "fp32", args.tokenizer, smoke=False, device="cpu", videos=256)
        print(f"\n## {name}\n\n{profile_config(trainer, args.warmup, args.steps, args.peak_gflops * 1e9)}",
              flush=True)


if __name__ == "__main__":
    main()
