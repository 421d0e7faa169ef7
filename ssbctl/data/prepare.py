"""Preparation: decode videos, run frozen backbones over the sampled frames, write feature stores.

Resumable and shardable. Work goes to a hidden folder beside the output
(``.NAME.partial/shard-K-of-N/``): feature chunks plus ``progress.jsonl``, a line per finished
video appended only after its features are on disk. A prepare that is killed and run again skips
what is done. ``--shard K/N`` (or RANK/WORLD_SIZE under torchrun) prepares every N-th video;
the shard that finishes last merges all of them into the final store(s), rewritten in dataset
order so that the result does not depend on sharding, interruptions or worker timing. Each
video's row records the decoder that produced its frames (decord, or PyAV when decord could not
read the file, with the reason).

The merge is guarded by ``merge.lock`` in the work folder, a file naming its holder (pid, host,
process start time). A merge that was killed leaves it behind; the next prepare on the same
host sees that the holder is gone and merges again from the untouched shard work (a merge
writes the stores whole and removes the work only at the end, so redoing it gives the same
bytes). A lock held by a process on another host is never broken: it cannot be checked from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import append_jsonl, atomic_write_json, check_output, output_path, read_jsonl, save_tensors
from ssbctl.core.paths import home
from ssbctl.data.backbone import Backbone, FeatureSource
from ssbctl.data.datasets import DatasetOptions, Protocol, VideoItem, dataset_spec
from ssbctl.data.datasets.shapes import ShapesSpec, generate
from ssbctl.data.decode_pool import DecodePool, load_features_file
from ssbctl.data.store import StoreWriter
from ssbctl.data.video import Decoded, DecodeError, Sampling

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PrepareOptions:
    """How to prepare (the same options must be used to resume or to merge shards)."""

    sampling: Sampling = Sampling()
    shard: int = 0  # this process's shard, 0-based
    num_shards: int = 1
    workers: int = 2  # decoding processes; 0 decodes in-process (no crash isolation)
    max_failures: int = -1  # fail once more videos than this could not be used; -1 = never
    chunk_size: int = 64  # videos per feature chunk in the work folder
    timeout: float = 300.0  # seconds one video may take to decode
    features: bool = False  # items point at pre-extracted feature files, not videos
    full_frames: bool = False  # decode full frames, not at the size the backbones need


def dataset_items(dataset: str, root: Path | None, annotations: Path | None, shapes: ShapesSpec | None = None,
                  progress: Progress | None = None, variant: str = "9k") -> list[VideoItem]:
    """The videos of a named dataset (generating ``shapes`` first when needed)."""
    spec = dataset_spec(dataset)
    if dataset == "shapes":
        root = root or home() / "raw" / "shapes"
        annotations = generate(root, shapes or ShapesSpec(), progress)
    return spec.read(DatasetOptions(root=root, annotations=annotations, variant=variant))


def imported_items(items: list[VideoItem], folder: Path) -> tuple[list[VideoItem], int]:
    """The items pointed at pre-extracted feature files (``VIDEO_ID.npy`` or ``.safetensors``)."""
    out, dim = [], 0
    for item in items:
        candidates = [folder / f"{item.video_id}{suffix}" for suffix in (".npy", ".safetensors")]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        out.append(dataclasses.replace(item, path=path))
        if not dim and path.is_file():
            try:
                dim = int(load_features_file(path).shape[1])
            except DecodeError:
                pass
    if not dim:
        raise UserError(f"no readable feature file (VIDEO_ID.npy or .safetensors) in {folder}")
    return out, dim


def shard_from_env() -> tuple[int, int]:
    """(shard, num_shards) from torchrun's RANK and WORLD_SIZE, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardWork:
    """One shard's resumable work folder: feature chunks per backbone and a progress log."""

    def __init__(self, folder: Path, backbones: int, chunk_size: int) -> None:
        self.folder, self.backbones, self.chunk_size = folder, backbones, chunk_size
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "progress.jsonl"
        self.done = {r["video_id"]: r for r in read_jsonl(self.log)} if self.log.is_file() else {}
        chunks = [int(p.stem.rsplit("-c", 1)[1]) for p in folder.glob("features-b0-c*.safetensors")]
        self.next_chunk = max(chunks, default=-1) + 1
        self.pending: list[tuple[str, list[torch.Tensor], dict[str, Any]]] = []

    @property
    def failures(self) -> int:
        return sum(1 for r in self.done.values() if r["status"] == "failed")

    def add(self, video_id: str, features: list[torch.Tensor], source: dict[str, Any] | None = None) -> None:
        """Queue a video's features per backbone; ``source`` (decoder, fallback_reason) goes in its row."""
        self.pending.append((video_id, features, source or {}))
        if len(self.pending) >= self.chunk_size:
            self.flush()

    def fail(self, video_id: str, reason: str) -> None:
        self._record({"video_id": video_id, "status": "failed", "reason": reason})

    def flush(self) -> None:
        """Write the pending features as one chunk per backbone, then log them as done."""
        if not self.pending:
            return
        chunk = self.next_chunk
        for b in range(self.backbones):
            path = self.folder / f"features-b{b}-c{chunk:05d}.safetensors"
            save_tensors(path, {vid: f[b].contiguous() for vid, f, _ in self.pending})
        self._record([{"video_id": vid, "status": "ok", "chunk": chunk, **source} for vid, _, source in self.pending])
        self.pending, self.next_chunk = [], chunk + 1

    def _record(self, rows: dict[str, Any] | list[dict[str, Any]]) -> None:
        rows = rows if isinstance(rows, list) else [rows]
        append_jsonl(self.log, rows)
        self.done.update((r["video_id"], r) for r in rows)

    def finish(self) -> None:
        self.flush()
        atomic_write_json(self.folder / "done.json", {"videos": len(self.done)})


def work_root(out: Path) -> Path:
    """Where the unfinished work of a prepare into ``out`` lives (beside it, whatever ``out`` is:
    ``.`` names the current folder, whose scratch must not go inside it)."""
    out = output_path(out)
    return out.parent / f".{out.name}.partial"


def _check_settings(root: Path, settings: dict[str, Any]) -> None:
    path = root / "settings.json"
    if path.is_file():
        if json.loads(path.read_text()) != settings:
            raise UserError(f"an unfinished prepare with other settings is in {root}; "
                            f"rerun it with the same options or delete that folder")
    else:
        atomic_write_json(path, settings)


def prepare(dataset: str, items: list[VideoItem], backbones: list[FeatureSource], outs: list[Path],
            opts: PrepareOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Prepare this process's shard; merge when every shard is done. Returns a summary."""
    if not 0 <= opts.shard < opts.num_shards:
        raise UserError(f"--shard must be K/N with 0 <= K < N, got {opts.shard}/{opts.num_shards}")
    if not items:  # a store of nothing: refused before any scratch folder is made
        raise UserError(f"{dataset}: there are no videos to prepare")
    outs = [output_path(out) for out in outs]
    for out in outs:  # only an earlier store may be replaced: refuse before any work
        check_output(out, "store")
    opts = at_backbone_size(opts, backbones)
    root = work_root(outs[0])
    root.mkdir(parents=True, exist_ok=True)
    _check_settings(root, {"dataset": dataset, "backbones": [[b.name, b.options()] for b in backbones],
                           "sampling": asdict(opts.sampling), "outs": [str(o) for o in outs],
                           "videos": len(items), "features": opts.features})
    work = ShardWork(root / f"shard-{opts.shard}-of-{opts.num_shards}", len(backbones), opts.chunk_size)
    mine = [it for i, it in enumerate(items) if i % opts.num_shards == opts.shard]
    with threads_beside(opts.workers):
        _run_shard(mine, backbones, work, opts, progress)
    summary: dict[str, Any] = {"shard": f"{opts.shard}/{opts.num_shards}", "videos": len(mine),
                               "failures": work.failures, "merged": False}
    if _all_done(root, opts.num_shards):
        holder = _take_merge_lock(root)
        if holder is not None:
            summary["merging_elsewhere"] = {**holder, "lock": str(root / LOCK_FILE)}
            return summary
        try:
            summary["manifests"] = merge(dataset, items, backbones, outs, opts)
        except BaseException:
            _release_merge_lock(root)
            raise
        summary["merged"] = True
    return summary


def at_backbone_size(opts: PrepareOptions, backbones: list[FeatureSource]) -> PrepareOptions:
    """``opts`` with frames decoded at the largest size any of ``backbones`` needs (recorded in the
    store's sampling, so a run decodes new videos the same way); unchanged for full frames, for
    imported features, or when a backbone does not say its size."""
    if opts.full_frames or opts.features or opts.sampling.short_side is not None:
        return opts
    sides = [b.decode_side() for b in backbones]
    known = [side for side in sides if side is not None]
    if not sides or len(known) < len(sides):
        return opts
    return dataclasses.replace(opts, sampling=dataclasses.replace(opts.sampling, short_side=max(known)))


@contextmanager
def threads_beside(workers: int) -> Iterator[None]:
    """torch's threads in this process while ``workers`` decoding processes run: the CPUs they leave
    (at least one, never more than before). Both at once on every core made the backbone's work
    here 3-8x slower (OpenMP threads spinning against the decoders): on 2 cores, with 2 workers,
    the whole prepare ran at 0.8x a single process's decoding speed instead of 1.2x."""
    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > 0:
        torch.set_num_threads(max(1, min(before, cpus - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_shard(items: list[VideoItem], backbones: list[FeatureSource], work: ShardWork, opts: PrepareOptions,
               progress: Progress | None) -> None:
    todo = [it for it in items if it.video_id not in work.done]
    done = len(items) - len(todo)
    _check_failures(work, opts)  # failures of earlier, interrupted runs count too
    pool = DecodePool(opts.sampling, opts.workers, opts.timeout, opts.features)
    for key, decoded, reason in pool.map((i, it.path) for i, it in enumerate(todo)):
        item = todo[key]
        if decoded is not None:
            try:
                features = [_encode(b, decoded.frames, opts.features) for b in backbones]
                work.add(item.video_id, features, _source(decoded))
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            work.fail(item.video_id, reason)
            _check_failures(work, opts)
        done += 1
        if progress:
            progress(done, len(items))
    work.finish()


def _source(decoded: Decoded) -> dict[str, Any]:
    """What a store row says about where a video's frames came from."""
    if decoded.decoder is None:
        return {}
    return {"decoder": decoded.decoder, **({"fallback_reason": decoded.fallback_reason}
                                           if decoded.fallback_reason else {})}


def _check_failures(work: ShardWork, opts: PrepareOptions) -> None:
    """Stop once more videos of this shard are unusable than ``--max-failures`` allows (counting
    those recorded by earlier runs, so that a rerun does not start the count afresh)."""
    if 0 <= opts.max_failures < work.failures:
        work.flush()
        raise DataError(f"{work.failures} videos could not be used (--max-failures {opts.max_failures}); "
                        f"see {work.log}")


def _encode(source: FeatureSource, frames: Any, imported: bool) -> torch.Tensor:
    """Features of one video: computed by a backbone, or the imported array itself."""
    if not imported:
        if not isinstance(source, Backbone):
            raise TypeError(f"{source.name} features are imported, not computed from frames")
        return source.encode(frames)
    features = torch.from_numpy(frames)
    if features.shape[1] != source.dim:
        raise ValueError(f"feature size {features.shape[1]} is not {source.dim}")
    if not torch.isfinite(features).all():
        raise ValueError("non-finite features")
    return features.float()


def _all_done(root: Path, num_shards: int) -> bool:
    return all((root / f"shard-{k}-of-{num_shards}" / "done.json").is_file() for k in range(num_shards))


LOCK_FILE = "merge.lock"


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process named by a lock may still be running (on another host: assume so)."""
    if "pid" not in holder:  # a lock without owner: the folder an older ssbctl made, or unreadable
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = _process_start(int(holder["pid"]))
    return holder.get("started") is None or started is None or started == holder["started"]


def _read_lock(lock: Path) -> dict[str, Any] | None:
    """The lock's holder; ``{}`` when it names none; None when there is no lock."""
    if lock.is_dir():
        return {}
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _create_lock(lock: Path, holder: dict[str, Any]) -> bool:
    """Create ``lock`` holding ``holder``, complete at once (hard link of a written file); False if taken."""
    tmp = lock.with_name(f"{lock.name}.{holder['token']}.tmp")
    tmp.write_text(json.dumps(holder))
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _break_lock(lock: Path, stale: dict[str, Any]) -> None:
    """Remove a lock whose holder is gone; should another process have replaced it with a live
    lock in the meantime, put that one back."""
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != stale and aside.is_file():
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
    _remove(aside)


def _take_merge_lock(root: Path) -> dict[str, Any] | None:
    """Become the merging process: None when the lock is ours, else who holds it.

    A lock left by a process that is gone (killed mid-merge) is broken and taken over."""
    lock = root / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
            "token": uuid.uuid4().hex}
    holder: dict[str, Any] | None = None
    for _ in range(5):
        if _create_lock(lock, mine):
            return None
        holder = _read_lock(lock)
        if holder is not None and _holder_alive(holder):
            return holder
        if holder is not None:
            _break_lock(lock, holder)
    return holder or {}


def _release_merge_lock(root: Path) -> None:
    """Give the lock up after a merge that failed (one that succeeds removes the whole work folder)."""
    (root / LOCK_FILE).unlink(missing_ok=True)


class ChunkFiles:
    """The work folder's feature chunks, opened as the merge reads them, at most ``limit`` at a time
    (least recently used closed first). A safetensors file is memory-mapped and every page read
    stays resident while it is open: keeping all of them open made the merge's memory grow with the
    dataset's features. Dataset order reads each shard's chunks in turn, so a few suffice."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: OrderedDict[Path, Any] = OrderedDict()

    def get(self, path: Path) -> Any:
        """The open handle of ``path`` (closing the least recently used first when at the limit)."""
        if path in self.open:
            self.open.move_to_end(path)
        else:
            while len(self.open) >= self.limit:
                self.open.popitem(last=False)  # dropping the handle unmaps the file
            self.open[path] = safe_open(str(path), framework="pt")
        return self.open[path]


def merge(dataset: str, items: list[VideoItem], backbones: list[FeatureSource], outs: list[Path],
          opts: PrepareOptions) -> list[dict[str, Any]]:
    """Write the final store of each backbone from all shards, in dataset order; remove the work."""
    root = work_root(outs[0])
    rows: dict[str, dict[str, Any]] = {}
    for k in range(opts.num_shards):
        folder = root / f"shard-{k}-of-{opts.num_shards}"
        if not (folder / "done.json").is_file():
            raise UserError(f"shard {k}/{opts.num_shards} has not finished ({folder})")
        for row in read_jsonl(folder / "progress.jsonl"):
            rows[row["video_id"]] = {**row, "folder": folder}
    protocol = asdict(dataset_spec(dataset).protocol)
    manifests = []
    for b, (backbone, out) in enumerate(zip(backbones, outs)):
        writer = StoreWriter(out, dataset, backbone, opts.sampling, protocol=protocol)
        handles = ChunkFiles(2 * opts.num_shards + 2)
        for item in items:
            row = rows[item.video_id]
            if row["status"] == "failed":
                writer.fail(item.video_id, str(item.path), row["reason"], item.split)
                continue
            chunk = row["folder"] / f"features-b{b}-c{row['chunk']:05d}.safetensors"
            writer.add(item.video_id, item.split, str(item.path), handles.get(chunk).get_tensor(item.video_id),
                       item.captions, source={k: row[k] for k in ("decoder", "fallback_reason") if k in row})
        manifest = writer.commit()
        manifests.append({**manifest, "out": str(out), "failed": writer.failures})
    _remove_work(root)
    return manifests


def _remove_work(root: Path) -> None:
    """Remove the work folder as a whole: renamed aside first, so a kill halfway through the
    deletion cannot leave a half-deleted work folder that a later prepare would resume from."""
    trash = root.with_name(f"{root.name}.removing")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(root, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prepare_items(items: list[VideoItem], out: Path, dataset: str, backbone: FeatureSource, sampling: Sampling,
                  progress: Progress | None = None, workers: int = 0) -> dict[str, Any]:
    """Prepare ``items`` unsharded with one backbone; the store's manifest plus a ``failed`` list."""
    summary = prepare(dataset, items, [backbone], [Path(out)],
                      PrepareOptions(sampling=sampling, workers=workers), progress)
    if not summary["merged"]:
        raise UserError(merging_elsewhere_message(summary["merging_elsewhere"]))
    return summary["manifests"][0]


def merging_elsewhere_message(holder: dict[str, Any]) -> str:
    """Why this prepare did not write the store: another process holds the merge lock."""
    who = f"process {holder['pid']} on {holder.get('host')}" if "pid" in holder else "another process"
    return (f"{who} is merging this prepare (lock {holder['lock']}); if it is no longer running, "
            f"delete that file and run the prepare again")


__all__ = ["PrepareOptions", "Protocol", "dataset_items", "imported_items", "merge", "merging_elsewhere_message",
           "prepare", "prepare_items", "shard_from_env"]
