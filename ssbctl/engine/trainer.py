"""The training loop: AdamW with warmup and cosine decay, AMP on CUDA, checkpoints and resume.

A resumed run continues the exact sequence of batches and random numbers of the run it
continues: the sampler order depends only on (seed, epoch), the position in the epoch is saved,
and every RNG state is checkpointed. On the CPU a killed-and-resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from ssbctl.config import Recipe, TrainConfig
from ssbctl.core.distributed import any_rank, average_gradients, barrier, gather_objects, in_group, setup, teardown
from ssbctl.core.errors import DataError, TrainingError, UserError
from ssbctl.core.io import append_jsonl, atomic_write_text, jsonl_text, read_jsonl
from ssbctl.core.memory import reuse_freed_memory
from ssbctl.core.validate import field as require
from ssbctl.data.batch import Batch
from ssbctl.data.loader import (
    Collate,
    EpochBatchSampler,
    PairDataset,
    check_finite_features,
    check_global_batch,
    split_pairs,
)
from ssbctl.data.store import Store, open_stores
from ssbctl.engine.accumulate import Embed, accumulated_backward
from ssbctl.engine.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    remap_optimizer_state,
    save_checkpoint,
)
from ssbctl.engine.reporting import open_sinks
from ssbctl.engine.rng import rng_states, set_rng_states
from ssbctl.engine.run import build_run_model, check_store_fits, read_run_recipe, write_recipe, write_run_files
from ssbctl.model.ssb import SSBModel, build_model
from ssbctl.model.t5_decoder import PRETRAINED_PREFIXES as PRETRAINED_DECODER
from ssbctl.objective.grad_norms import as_metrics
from ssbctl.objective.step import SSBObjective

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_METRICS_FILE = "metrics.superseded.jsonl"


# Per-epoch validation, ``(model, tokenizer, store, split, device) -> metrics`` (with ``t2v``'s R1, R5,
# R10, MdR), e.g. ``ssbctl.evaluation.evaluate.evaluate_split``: passed in, the engine sits below it.
Evaluate = Callable[[SSBModel, Any, Store, str, torch.device], dict[str, Any]]


class Reporter(Protocol):
    """Where the trainer reports progress (the CLI draws a rich progress bar)."""

    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, terms: dict[str, float] | None, clips_per_s: float) -> None: ...
    def note(self, text: str) -> None: ...
    def stop(self) -> None: ...


class SilentReporter:
    """Reports nothing (library use and tests)."""

    def start(self, total: int, done: int) -> None: ...
    def step(self, step: int, terms: dict[str, float] | None, clips_per_s: float) -> None: ...
    def note(self, text: str) -> None: ...
    def stop(self) -> None: ...


@dataclass
class TrainState:
    """Where training stands; saved as ``state.json`` in every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    nonfinite_steps: int = 0  # batches skipped because the loss was not finite


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. AMP is for CUDA: the CPU always trains in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: SSBModel,
                  legacy: bool = False) -> dict[tuple[bool, bool], list[tuple[str, torch.nn.Parameter]]]:
    """Trainable ``(name, parameter)`` pairs by (pretrained text backbone, exempt from decay), in
    the optimizer's group order. ``legacy``: as checkpoints without ``param_names`` grouped them,
    when every parameter outside the text encoder was trained (the temperature under max-margin
    and the identity mask's query and key included)."""
    groups: dict[tuple[bool, bool], list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or (legacy and not name.startswith("text.")):
            key = (name.startswith(("text.backbone.", *PRETRAINED_DECODER)), p.ndim < 2)
            groups.setdefault(key, []).append((name, p))
    return dict(sorted(groups.items()))


def optimizer_param_names(model: SSBModel, legacy: bool = False) -> list[list[str]]:
    """The names of :func:`build_optimizer`'s parameters, group by group (saved with its state)."""
    return [[name for name, _ in ps] for ps in _param_groups(model, legacy).values()]


def build_optimizer(model: SSBModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the pretrained text backbone (and T5 decoder) at ``text_lr``; no decay on biases, norms, scales.

    The fused kernel where this torch has one for the parameters' device (CUDA; the CPU from
    torch 2.4): one kernel per step instead of a dozen ops per tensor, 3x faster here for 20M
    parameters (benchmarks/train_profile.py: the optimizer was half a CLIP-sized CPU step)."""
    groups = [{"params": [p for _, p in ps], "lr": cfg.text_lr if pretrained else cfg.lr,
               "weight_decay": 0.0 if no_decay else cfg.weight_decay}
              for (pretrained, no_decay), ps in _param_groups(model).items()]
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or torch version
        return torch.optim.AdamW(groups)


def check_training_batch(recipe: Recipe, store: Store, world: int) -> None:
    """Refuse a recipe whose global batch the training split cannot fill or the processes cannot share."""
    split = recipe.data.train_split
    pairs = len(split_pairs(store, split))
    check_global_batch(recipe.train.batch_size, pairs, world, f"split '{split}' of {store.root}")
    per_process = recipe.train.batch_size // world
    if recipe.train.accum_steps > per_process:  # each micro-batch of a process's share needs a pair
        raise UserError(f"recipe key 'train.accum_steps' must be at most {per_process} (the pairs of one "
                        f"batch per process), got {recipe.train.accum_steps}")




class Trainer:
    """Trains ``recipe`` into ``run_dir``; ``fit`` runs to the end or until stopped by a signal.
    ``evaluate``, when given, validates on ``data.eval_split`` after every epoch (``metrics.jsonl``)."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False,
                 reporter: Reporter | None = None, evaluate: Evaluate | None = None, source: str | None = None) -> None:
        self.cfg = recipe.train
        self.evaluate = evaluate
        self.run_dir = Path(run_dir)
        self.dist, self.device = setup(self.cfg.device)
        self.reporter = (reporter or SilentReporter()) if self.dist.is_main else SilentReporter()
        self.sinks = open_sinks(self.cfg.report_to if self.dist.is_main else (), self.run_dir / METRICS_FILE, recipe)
        self.amp = amp_dtype(self.cfg.precision, self.device)
        self.store = open_stores(recipe.data.prepared, recipe.data.experts)
        check_training_batch(recipe, self.store, self.dist.world)  # before loading features or models
        check_splits(self.store, recipe)  # before any work: a misspelled eval split would cost an epoch
        self.dataset = PairDataset(self.store, recipe.data.train_split)  # checks its features are finite
        if recipe.data.eval_split and evaluate is not None:  # so can the evaluation after every epoch
            videos = self.store.split_videos(recipe.data.eval_split)
            check_finite_features(self.store, videos, self.store.load_experts(videos), recipe.data.eval_split)
        checkpoint = self._checkpoint_to_resume(resume)
        torch.manual_seed(self.cfg.seed)
        if checkpoint is None:
            model, self.tokenizer, model_cfg = build_model(
                recipe.model, recipe.loss, self.store.feature_dims, self.dataset.captions)
            recipe = dataclasses.replace(recipe, model=model_cfg)
            if self.dist.is_main:
                write_run_files(self.run_dir, recipe, self.tokenizer, model.text.backbone.config,
                                self.store.expert_specs(), source)
        else:  # the architecture is the run's own, whatever model the given recipe names
            recipe = dataclasses.replace(recipe, model=read_run_recipe(self.run_dir).model)
            check_store_fits(self.run_dir, recipe, self.store)
            model, self.tokenizer = build_run_model(self.run_dir, recipe)
        barrier()
        self.recipe = recipe
        self.module: SSBModel = model.to(self.device)  # what checkpoints save and the optimizer trains
        self.objective = SSBObjective(self.module, recipe.loss)  # forward(batch) -> the loss terms
        self.model = self._wrap(self.objective)
        # Accumulation embeds micro-batches with the model's embed, never the wrapped forward: compile that.
        compile_embed = self.cfg.compile and self.cfg.accum_steps > 1
        self.embed: Embed = (torch.compile(self.module.embed, backend=self.cfg.compile_backend) if compile_embed
                             else self.module.embed)
        self.sampler = EpochBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed,
                                         self.dist.rank, self.dist.world)
        self.steps_per_epoch = len(self.sampler.batches())
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.module, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.cfg))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.state = TrainState()
        self.saved_step = -1
        self.bad_streak = 0  # non-finite losses in a row, across epochs (the weights have not moved since)
        self.stop_signal: int | None = None  # the signal this process received
        self.stopping = False  # all ranks agreed to stop (see _agree); the loop tests only this
        if checkpoint is not None:
            # Everything the resume reads is checked before anything in the run folder is rewritten.
            metrics = self._read_metrics() if self.dist.is_main else []
            self._restore(checkpoint)
            if self.dist.is_main:
                self._rewind_metrics(metrics)
                write_recipe(self.run_dir, recipe)  # overrides given on resume (more epochs) are kept
        self.module.text.warm_cache(self.tokenizer, self.dataset.captions)

    # ------------------------------------------------------------ setup and state

    def _wrap(self, module: SSBObjective) -> torch.nn.Module:
        """The objective in DistributedDataParallel under torchrun, then ``torch.compile`` if the
        recipe asks (its forward is the one that uses every trained parameter)."""
        model: torch.nn.Module = module
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if self.cfg.compile and self.cfg.accum_steps > 1:
            return model  # accumulation never calls this forward: it compiles the model's embed (self.embed)
        # torch.compile's stubs promise a callable; given a Module it returns one (OptimizedModule).
        return (torch.compile(model, backend=self.cfg.compile_backend)  # type: ignore[return-value]
                if self.cfg.compile else model)

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        found = latest_checkpoint(self.run_dir)
        if resume and found is None:
            raise UserError(f"nothing to resume: {self.run_dir} has no checkpoint")
        if not resume and found is not None:
            raise UserError(f"{self.run_dir} already has checkpoints; pass --resume to continue it "
                            f"or choose another --out")
        return found

    def _restore(self, checkpoint: Path) -> None:
        load_weights(self.module, checkpoint)
        trainer, state = load_trainer_state(checkpoint)
        rng = trainer["rng"]
        if len(rng) != self.dist.world:
            raise UserError(f"{checkpoint} was written by {len(rng)} processes; resume it with as many")
        try:
            saved_names = trainer.get("param_names") or optimizer_param_names(self.module, legacy=True)
            kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(remap_optimizer_state(
                trainer["optimizer"], saved_names, optimizer_param_names(self.module), checkpoint))
            for group, kernel in zip(self.optimizer.param_groups, kernels):  # this machine's kernel, not the saver's
                group.update(kernel)
            self.scheduler.load_state_dict(trainer["scheduler"])
            self.scaler.load_state_dict(trainer["scaler"])
            set_rng_states(rng[self.dist.rank])
            self.state = TrainState(**state["trainer"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise DataError(f"{checkpoint}: trainer.pt or state.json does not fit this run "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in dataclasses.asdict(self.state).values()):
            raise DataError(f"{checkpoint / 'state.json'}: key 'trainer' must hold non-negative integers")
        self.saved_step = self.state.step
        self.reporter.note(f"resumed from {checkpoint.name} (epoch {self.state.epoch + 1}, "
                           f"step {self.state.step})")

    def _read_metrics(self) -> list[dict[str, Any]] | None:
        """The rows of ``metrics.jsonl`` (None when there is none); a damaged file is a DataError."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return None
        rows = list(read_jsonl(path))
        for n, row in enumerate(rows, 1):
            if "step" in row:
                require(row, "step", int, f"{path} row {n}")
        return rows

    def _rewind_metrics(self, rows: list[dict[str, Any]] | None) -> None:
        """Move rows logged after the resumed checkpoint (by the part of the run that was lost) to
        ``metrics.superseded.jsonl``, so ``metrics.jsonl`` holds one curve; drops a torn last line."""
        path = self.run_dir / METRICS_FILE
        if rows is None:
            return
        later = [r for r in rows if r.get("step", 0) > self.state.step]
        if later:
            append_jsonl(self.run_dir / SUPERSEDED_METRICS_FILE, later)
        atomic_write_text(path, jsonl_text(r for r in rows if r.get("step", 0) <= self.state.step))

    def save(self) -> None:
        """Write a checkpoint of the current step (rank 0 writes; every rank's RNG state goes in).

        Weights that are no longer finite are never written: training fails instead."""
        flags = torch.stack([~torch.isfinite(p.detach()).all() for p in self.module.parameters()])
        if any_rank(flags.any()[None])[0]:
            raise TrainingError(f"the weights became non-finite by step {self.state.step}; nothing saved "
                                f"(lower train.lr or check the data)")
        rng = gather_objects(rng_states())
        if self.dist.is_main:
            trainer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "scaler": self.scaler.state_dict(), "rng": rng,
                       "param_names": optimizer_param_names(self.module)}
            save_checkpoint(self.run_dir, self.module, trainer,
                            {"step": self.state.step, "world": self.dist.world,
                             "trainer": dataclasses.asdict(self.state)}, self.cfg.keep_checkpoints)
        self.saved_step = self.state.step

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or a stop signal); return a summary."""
        loader = DataLoader(self.dataset, batch_sampler=self.sampler,
                            collate_fn=Collate(self.tokenizer, self.recipe.model.text.max_tokens),
                            num_workers=self.recipe.data.num_workers,
                            pin_memory=self.device.type == "cuda",
                            persistent_workers=self.recipe.data.num_workers > 0,
                            prefetch_factor=4 if self.recipe.data.num_workers > 0 else None,
                            generator=torch.Generator())  # keeps worker seeding off the global RNG
        self.model.train()
        self.reporter.start(self.total_steps, self.state.step)
        last_eval: dict[str, Any] | None = None
        # on the CPU each step's large activations and gradients reuse the last step's memory (ssbctl.core.memory)
        with _StopOnSignal(self), warnings.catch_warnings(), reuse_freed_memory(self.device.type == "cpu"):
            # fp16: a step skipped for overflowing gradients still advances the schedule, which
            # stays keyed to the step count; torch's warning about that order is expected here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            while self.state.step < self.total_steps and not self.stopping:
                self.sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)
                self._run_epoch(loader)
                if self.state.batch_in_epoch >= self.steps_per_epoch:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    last_eval = self._end_of_epoch() or last_eval
            if self.saved_step != self.state.step:
                self.save()
        barrier()
        self.reporter.stop()
        self.sinks.close()
        return {"run_dir": str(self.run_dir), "rank": self.dist.rank, "steps": self.state.step,
                "epochs": self.state.epoch,
                "nonfinite_steps": self.state.nonfinite_steps, "eval": last_eval,
                "stopped_by": signal.Signals(self.stop_signal).name
                if self.stopping and self.stop_signal is not None else None}

    def _run_epoch(self, loader: DataLoader) -> None:
        window: dict[str, torch.Tensor] = {}  # loss terms summed on the device: read back only when logged
        count, clips, waited, tick = 0, 0, 0.0, time.perf_counter()
        for batch, wait in _timed(loader):
            waited += wait
            terms, stop = self.train_step(batch)
            self.state.batch_in_epoch += 1
            if stop:  # every rank agreed on this at the same step (see _agree)
                self.stopping, self.stop_signal = True, self.stop_signal or signal.SIGTERM
            if terms is None:
                self._count_bad()
                if stop:
                    return
                continue
            self.bad_streak = 0
            for k, v in terms.items():
                window[k] = window[k] + v if k in window else v
            count, clips = count + 1, clips + batch.input_ids.shape[0]
            logged = self.state.step % self.cfg.log_every == 0
            elapsed = max(time.perf_counter() - tick, 1e-9)
            means = {k: float(v) / count for k, v in window.items()} if logged else None
            self.reporter.step(self.state.step, means and {**means, **self._learning_rates()}, clips / elapsed)
            if means is not None:  # logged
                self._log(means, clips / elapsed, waited / elapsed)
                window, count, clips, waited, tick = {}, 0, 0, 0.0, time.perf_counter()
            if self.cfg.ckpt_every and self.state.step % self.cfg.ckpt_every == 0:
                self.save()
            if stop or self.state.step >= self.total_steps:
                return

    def _count_bad(self) -> None:
        """Fail once the loss has been non-finite ``max_nonfinite`` times in a row, or for a whole
        epoch's worth of batches if that is fewer: the run is making no progress. The streak runs
        across epochs, so short epochs cannot reset it; every rank counts the same agreed flags."""
        self.bad_streak += 1
        limit = min(self.cfg.max_nonfinite, self.steps_per_epoch)
        if self.bad_streak >= limit:
            raise TrainingError(f"loss was non-finite {self.bad_streak} times in a row at step "
                                f"{self.state.step}; lower train.lr or check the data")

    def train_step(self, batch: Batch) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """One optimizer step, and whether to stop after it.

        The terms are None (and nothing is updated) when the loss is not finite."""
        batch = batch.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        logged = (self.state.step + 1) % self.cfg.log_every == 0  # measure the terms' gradients for its row
        self.objective.grad_probe = (self.scaler.get_scale() if self.scaler.is_enabled() else 1.0) if logged else None
        terms = self._backward(batch)
        bad, stop = self._agree(terms["loss"])
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_steps += 1
            self.reporter.note(f"step {self.state.step + 1}: non-finite loss, batch skipped")
            return None, stop
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state.step += 1
        return {**{k: v.detach() for k, v in terms.items()}, "grad_norm": grad_norm.detach()}, stop

    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(skip this step: the loss is not finite, stop after it: a signal came) on every rank alike.

        The step's one host-device synchronisation. A signal reaches the ranks at slightly
        different moments; deciding both together keeps every rank at the same step and the
        same sequence of collectives."""
        stop = torch.tensor(self.stop_signal is not None).to(self.device, non_blocking=True)
        bad, stop_anywhere = any_rank(torch.stack([~torch.isfinite(loss.detach()), stop]))
        return bad, stop_anywhere

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _backward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward and backward of one (global) batch, whole or in ``accum_steps`` micro-batches."""
        if self.cfg.accum_steps == 1:
            with self._autocast():
                terms = self.model(batch)
            self.scaler.scale(terms["loss"]).backward()
            return terms
        terms = accumulated_backward(self.objective, batch, self.cfg.accum_steps, self.scaler.scale, self._autocast,
                                     self.embed)
        average_gradients(self.module.parameters())  # DDP's hooks only follow its own forward
        return terms

    # ------------------------------------------------------------ bookkeeping

    def _log(self, terms: dict[str, float], clips_per_s: float, data_wait: float) -> None:
        """One metrics row; ``data_wait`` is the share of the time spent waiting for batches."""
        if not self.dist.is_main:
            return
        row = {"step": self.state.step, "epoch": self.state.epoch, **self._learning_rates(),
               **terms, **as_metrics(self.objective.take_grad_norms()),
               "clips_per_s": clips_per_s * self.dist.world, "data_wait": data_wait, "time": time.time()}
        if self.module.temperature is not None:  # InfoNCE's learned temperature; max-margin has none
            row["temperature"] = self.module.temperature
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        self.sinks.append(row)

    def _learning_rates(self) -> dict[str, float]:
        """``lr``: the rate of the model's own parameters (``train.lr`` on its schedule); ``lr_text``:
        that of the pretrained text encoder (``train.text_lr``), present only while it trains.

        Groups are told apart by their parameters, not their order or a saved name, so this
        holds for checkpoints written before, too."""
        text = {id(p) for p in self.module.text.backbone.parameters()}
        rates: dict[str, float] = {}
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            rates.setdefault("lr_text" if id(group["params"][0]) in text else "lr", float(lr))
        return rates

    def _end_of_epoch(self) -> dict[str, Any] | None:
        result = None
        split = self.recipe.data.eval_split
        if split and self.evaluate is not None and self.dist.is_main:
            result = self.evaluate(self.module, self.tokenizer, self.store, split, self.device)
            self.sinks.append({"step": self.state.step, "epoch": self.state.epoch, "eval": result})
            t2v = result["t2v"]
            self.reporter.note(f"epoch {self.state.epoch}: {split} text-to-video R@1 {t2v['R1']:.1f} "
                               f"R@5 {t2v['R5']:.1f} R@10 {t2v['R10']:.1f} MdR {t2v['MdR']:g}")
        barrier()
        if not self.cfg.ckpt_every and not self.bad_streak:  # mid-streak the weights may be what broke
            self.save()
        return result


def check_splits(store: Any, recipe: Recipe) -> None:
    """Both splits the recipe names exist in its prepared data (a UserError naming the key)."""
    for key in ("train_split", "eval_split"):
        split = getattr(recipe.data, key)
        if split and not any(v["split"] == split for v in store.videos):
            known = ", ".join(sorted({v["split"] for v in store.videos}))
            raise UserError(f"recipe key 'data.{key}': split '{split}' has no videos in {store.root} "
                            f"(splits: {known})")


def _timed(loader: DataLoader) -> Iterator[tuple[Batch, float]]:
    """The loader's batches, each with the seconds spent waiting for it (the model idles meanwhile)."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


class _StopOnSignal:
    """While training, SIGTERM and SIGINT ask the loop to checkpoint and return cleanly."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.trainer.stop_signal = signum
        self.trainer.reporter.note(f"{signal.Signals(signum).name}: saving a checkpoint, then stopping")

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(recipe: Recipe, run_dir: Path, resume: bool = False, reporter: Reporter | None = None,
          evaluate: Evaluate | None = None, source: str | None = None) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir`` (continuing its latest checkpoint with ``resume``; see ``Trainer``);
    ``source`` names the recipe it came from (recorded in ``run.json``).

    Under torchrun, the process group this call joins is left before it returns (or raises):
    every rank passed the last barrier of ``fit``, and a process must not exit with gloo alive."""
    joins = not in_group()
    try:
        return Trainer(recipe, run_dir, resume, reporter, evaluate, source).fit()
    finally:
        if joins:
            teardown()
