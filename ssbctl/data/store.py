"""The prepared-data folder: manifest, safetensors feature shards, captions and failures.

Layout (``FORMAT_VERSION`` 1)::

    manifest.json                dataset, backbone, sampling, splits, counts, decoders, shards, format_version
    features-00000.safetensors   one (T, dim) float tensor per video id
    videos.jsonl                 video_id, split, path, num_frames, shard, decoder (decord or pyav;
                                 with fallback_reason when decord could not be used)
    captions.jsonl               video_id, caption, split
    failures.jsonl               video_id, path, reason, split (videos that could not be used;
                                 stores written before split was recorded lack it)

The writer builds everything in a hidden sibling folder and renames it into place at the end,
so a prepare that dies leaves either the previous store or none, never a half-written one. It
replaces only an earlier store (see :func:`ssbctl.core.io.check_output`), never other files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from ssbctl.core.errors import DataError, UserError
from ssbctl.core.io import (
    atomic_write_json,
    atomic_write_text,
    check_output,
    fresh_dir,
    jsonl_text,
    output_path,
    read_jsonl,
    replace_dir,
    save_tensors,
)
from ssbctl.core.paths import resolve_prepared
from ssbctl.core.validate import check_rows, field, open_tensors, read_json
from ssbctl.data.backbone import FeatureSource
from ssbctl.data.video import Sampling

FORMAT_VERSION = 1
VIDEO_FIELDS = {"video_id": str, "split": str, "path": str, "num_frames": int, "shard": int}
CAPTION_FIELDS = {"video_id": str, "caption": str, "split": str}
FAILURE_FIELDS = {"video_id": str}


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """The manifest keys that readers rely on, with the right kinds (a damaged file is a DataError)."""
    backbone = field(manifest, "backbone", dict, str(path))
    dim = field(backbone, "dim", int, f"{path} backbone")
    field(backbone, "name", str, f"{path} backbone")
    if dim < 1:
        raise DataError(f"{path}: backbone dim must be positive, got {dim}")
    field(manifest, "sampling", dict, str(path))
    field(manifest, "splits", dict, str(path))
    shards = field(manifest, "shards", list, str(path))
    if not all(isinstance(s, str) and s and "/" not in s and s not in (".", "..") for s in shards):
        raise DataError(f"{path}: key 'shards' must list file names of this folder")
    ks = manifest.get("protocol", {}).get("ks", [1]) if isinstance(manifest.get("protocol", {}), dict) else None
    if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0
                                                     for k in ks):
        raise DataError(f"{path}: key 'protocol.ks' must be a list of positive integers")


class StoreWriter:
    """Collects features and captions video by video; ``commit`` makes the store appear."""

    def __init__(self, root: Path, dataset: str, backbone: FeatureSource, sampling: Sampling,
                 shard_size: int = 512, protocol: dict[str, Any] | None = None) -> None:
        self.root = output_path(root)
        check_output(self.root, "store")  # before any work: replacing anything but a store loses data
        self.tmp = fresh_dir(self.root.parent / f".{self.root.name}.writing")
        self.dataset, self.backbone, self.sampling, self.shard_size = dataset, backbone, sampling, shard_size
        self.protocol = protocol or {}
        self.videos: list[dict[str, Any]] = []
        self.captions: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._shards: list[str] = []

    def add(self, video_id: str, split: str, path: str, features: torch.Tensor, captions: list[str],
            source: dict[str, Any] | None = None) -> None:
        """Record one decoded video, its ``(T, dim)`` features and its captions; ``source`` says
        which decoder produced its frames (``decoder``, ``fallback_reason``)."""
        self._pending[video_id] = features.contiguous().float()
        self.videos.append({"video_id": video_id, "split": split, "path": path,
                            "num_frames": int(features.shape[0]), "shard": len(self._shards), **(source or {})})
        self.captions.extend({"video_id": video_id, "caption": c, "split": split} for c in captions)
        if len(self._pending) >= self.shard_size:
            self._flush()

    def fail(self, video_id: str, path: str, reason: str, split: str | None = None) -> None:
        """Record a video that could not be used, and the split it belonged to (so that evaluation
        can say that split's gallery is smaller than the protocol's); preparation goes on."""
        self.failures.append({"video_id": video_id, "path": path, "reason": reason,
                              **({"split": split} if split is not None else {})})

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"features-{len(self._shards):05d}.safetensors"
        save_tensors(self.tmp / name, self._pending)
        self._shards.append(name)
        self._pending = {}

    def commit(self) -> dict[str, Any]:
        """Write the remaining files and move the finished store into place; return the manifest."""
        self._flush()
        splits = Counter(v["split"] for v in self.videos)
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "backbone": {"name": self.backbone.name, "dim": self.backbone.dim, **self.backbone.options()},
            "sampling": asdict(self.sampling),
            "protocol": self.protocol,
            "splits": {s: {"videos": n, "captions": sum(1 for c in self.captions if c["split"] == s)}
                       for s, n in sorted(splits.items())},
            "counts": {"videos": len(self.videos), "captions": len(self.captions),
                       "failures": len(self.failures)},
            "decoders": dict(sorted(Counter(v["decoder"] for v in self.videos if "decoder" in v).items())),
            "shards": self._shards,
        }
        atomic_write_text(self.tmp / "videos.jsonl", jsonl_text(self.videos))
        atomic_write_text(self.tmp / "captions.jsonl", jsonl_text(self.captions))
        atomic_write_text(self.tmp / "failures.jsonl", jsonl_text(self.failures))
        atomic_write_json(self.tmp / "manifest.json", manifest)
        replace_dir(self.tmp, self.root, kind="store")
        return manifest


class FeatureStore:
    """Read access to a prepared-data folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise UserError(f"{self.root} is not a prepared-data folder (no manifest.json)")
        self.manifest: dict[str, Any] = read_json(manifest)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.root}: store format {self.manifest.get('format_version')} is not "
                            f"{FORMAT_VERSION}; prepare it again")
        _check_manifest(self.manifest, manifest)
        self.videos = check_rows(list(read_jsonl(self.root / "videos.jsonl")), self.root / "videos.jsonl",
                                 VIDEO_FIELDS)
        self.captions = check_rows(list(read_jsonl(self.root / "captions.jsonl")), self.root / "captions.jsonl",
                                   CAPTION_FIELDS)
        self._check_rows()

    def _check_rows(self) -> None:
        """Every video points at an existing shard; every caption at a video of its split."""
        shards = len(self.manifest["shards"])
        split_of: dict[str, str] = {}
        for n, v in enumerate(self.videos, 1):
            if not 0 <= v["shard"] < shards:
                raise DataError(f"{self.root / 'videos.jsonl'} row {n}: shard {v['shard']} does not exist "
                                f"(the manifest lists {shards})")
            split_of[v["video_id"]] = v["split"]
        for n, c in enumerate(self.captions, 1):
            if split_of.get(c["video_id"], c["split"]) != c["split"]:
                raise DataError(f"{self.root / 'captions.jsonl'} row {n}: video {c['video_id']!r} is not in "
                                f"split {c['split']!r}")

    @property
    def ks(self) -> tuple[int, ...]:
        """The recall cut-offs the dataset's protocol reports."""
        return tuple(self.manifest.get("protocol", {}).get("ks", (1, 5, 10)))

    @property
    def feature_dim(self) -> int:
        """Size of one frame's feature vector."""
        return int(self.manifest["backbone"]["dim"])

    def split_videos(self, split: str) -> list[dict[str, Any]]:
        """Video records of one split, in store order."""
        rows = [v for v in self.videos if v["split"] == split]
        if not rows:
            known = ", ".join(sorted(self.manifest["splits"]))
            raise UserError(f"split '{split}' has no videos in {self.root} (splits: {known})")
        return rows

    def split_captions(self, split: str) -> list[dict[str, Any]]:
        """Caption records of one split, in store order (a split with videos but no captions can be
        neither trained on nor evaluated: a UserError)."""
        rows = [c for c in self.captions if c["split"] == split]
        if not rows:
            raise UserError(f"split '{split}' of {self.root} has no captions; choose a split with captions")
        return rows

    def load_features(self, videos: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The ``(T, dim)`` feature tensors of ``videos``, reading each shard once."""
        by_shard: dict[int, list[int]] = {}
        for i, v in enumerate(videos):
            by_shard.setdefault(v["shard"], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(videos)
        for shard, positions in by_shard.items():
            path = self.root / self.manifest["shards"][shard]
            with open_tensors(path) as fh:
                for i in positions:
                    out[i] = self._checked(fh.get_tensor(videos[i]["video_id"]), path, videos[i]["video_id"])
        return out  # type: ignore[return-value]

    def _checked(self, features: torch.Tensor, path: Path, video_id: str) -> torch.Tensor:
        """A video's features, which must be ``(T >= 1, dim)`` floats of the manifest's dim."""
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != self.feature_dim \
                or not features.is_floating_point():
            raise DataError(f"{path}: features of {video_id!r} are {features.dtype} {tuple(features.shape)}, "
                            f"expected (frames, {self.feature_dim}) floats as manifest.json says")
        return features.float()

    def failures(self) -> list[dict[str, Any]]:
        """The videos prepare could not use (``failures.jsonl``), each with its ``split`` unless the
        store was written before that was recorded; none when the file is absent."""
        path = self.root / "failures.jsonl"
        return check_rows(list(read_jsonl(path)), path, FAILURE_FIELDS) if path.is_file() else []

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Feature size of each expert (one store is one expert)."""
        return (self.feature_dim,)

    def expert_specs(self) -> list[dict[str, Any]]:
        """Backbone and sampling of each expert: what turns a new video into model input; and what the
        features were made from (dataset, prepared folder, typical frame size of its videos when they are
        on disk), so new videos can be compared with them. A dataset's time window (``max_seconds``,
        DiDeMo's annotated first 31 s) is the dataset's protocol, not the model's: new videos are
        sampled whole."""
        from ssbctl.data.footage import typical_frame_size

        sampling = {k: v for k, v in self.manifest["sampling"].items() if k != "max_seconds"}
        sources = [Path(v["path"]) for v in self.videos if v.get("path")]
        return [{"backbone": self.manifest["backbone"], "sampling": sampling,
                 "dataset": self.manifest.get("dataset", ""), "prepared": self.root.name,
                 "frame_size": typical_frame_size(sources)}]

    def load_experts(self, videos: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
        """Features of ``videos`` per expert: ``[expert][video]`` of ``(T, dim)``."""
        return [self.load_features(videos)]


class Store(Protocol):
    """What readers of prepared data use: one :class:`FeatureStore` or :class:`ExpertStores`."""

    @property
    def root(self) -> Path: ...
    @property
    def manifest(self) -> dict[str, Any]: ...
    @property
    def videos(self) -> list[dict[str, Any]]: ...
    @property
    def captions(self) -> list[dict[str, Any]]: ...
    @property
    def ks(self) -> tuple[int, ...]: ...
    @property
    def feature_dims(self) -> tuple[int, ...]: ...
    def split_videos(self, split: str) -> list[dict[str, Any]]: ...
    def split_captions(self, split: str) -> list[dict[str, Any]]: ...
    def failures(self) -> list[dict[str, Any]]: ...
    def expert_specs(self) -> list[dict[str, Any]]: ...
    def load_experts(self, videos: list[dict[str, Any]]) -> list[list[torch.Tensor]]: ...


class ExpertStores:
    """A main store plus stores of other backbones for the same videos, each one more expert for
    the video encoder. Videos, captions, splits and the protocol are the main store's."""

    def __init__(self, roots: list[Path]) -> None:
        self.main = FeatureStore(roots[0])
        self.extra = [FeatureStore(r) for r in roots[1:]]
        for other in self.extra:
            missing = {v["video_id"] for v in self.main.videos} - {v["video_id"] for v in other.videos}
            if missing:
                raise UserError(f"{other.root} lacks {len(missing)} videos of {self.root} "
                                f"(e.g. {sorted(missing)[0]}); prepare every expert from the same data")

    @property
    def root(self) -> Path:
        """The main store's folder."""
        return self.main.root

    @property
    def manifest(self) -> dict[str, Any]:
        """The main store's manifest."""
        return self.main.manifest

    @property
    def videos(self) -> list[dict[str, Any]]:
        """The main store's video records."""
        return self.main.videos

    @property
    def captions(self) -> list[dict[str, Any]]:
        """The main store's caption records."""
        return self.main.captions

    @property
    def ks(self) -> tuple[int, ...]:
        """The recall cut-offs of the main store's protocol."""
        return self.main.ks

    def split_videos(self, split: str) -> list[dict[str, Any]]:
        """Video records of one split of the main store."""
        return self.main.split_videos(split)

    def split_captions(self, split: str) -> list[dict[str, Any]]:
        """Caption records of one split of the main store."""
        return self.main.split_captions(split)

    def failures(self) -> list[dict[str, Any]]:
        """The videos the main store's prepare could not use: the main store's videos are the
        gallery (the other experts must hold every one of them)."""
        return self.main.failures()

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Feature size of each expert, the main store's first."""
        return tuple(store.feature_dim for store in (self.main, *self.extra))

    def expert_specs(self) -> list[dict[str, Any]]:
        """Backbone and sampling of each expert, the main store's first."""
        return [spec for store in (self.main, *self.extra) for spec in store.expert_specs()]

    def load_experts(self, videos: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
        """Features of ``videos`` (main-store records) per expert: ``[expert][video]`` of ``(T, dim)``."""
        out = [self.main.load_features(videos)]
        for other in self.extra:
            rows = {v["video_id"]: v for v in other.videos}
            out.append(other.load_features([rows[v["video_id"]] for v in videos]))
        return out


def open_stores(prepared: str, experts: tuple[str, ...] = ()) -> ExpertStores:
    """The prepared data a recipe names: its main store plus any extra experts."""
    return ExpertStores([resolve_prepared(p) for p in (prepared, *experts)])
