"""Shapes generation, decoding with decord, frame sampling, the feature store, corrupt videos."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ssbctl.core.errors import UserError
from ssbctl.data.backbones import build_backbone
from ssbctl.data.datasets import read_custom
from ssbctl.data.datasets.shapes import ShapesSpec, generate
from ssbctl.data.prepare import prepare_items
from ssbctl.data.store import ExpertStores, FeatureStore
from ssbctl.data.video import DecodeError, Sampling, read_frames

from conftest import TINY_SPEC


def test_shapes_are_real_videos_with_paraphrased_captions(shapes_raw: Path) -> None:
    items = read_custom(shapes_raw / "captions.jsonl")
    assert len(items) == TINY_SPEC.num_videos
    frames = read_frames(items[0].path, Sampling(num_frames=5))
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert frames.std() > 5, "not a blank video"
    assert all(len(i.captions) == 3 and len(set(i.captions)) == 3 for i in items)
    # videos share meaning: some caption words recur across many videos
    words = Counter(w for i in items for w in set(" ".join(i.captions).split()))
    assert max(words[w] for w in ("red", "green", "blue", "yellow", "purple", "white")) >= 3


def test_shapes_is_deterministic_and_split_by_video(tmp_path: Path, shapes_raw: Path) -> None:
    again = tmp_path / "again"
    generate(again, TINY_SPEC)
    assert (again / "captions.jsonl").read_text() == (shapes_raw / "captions.jsonl").read_text()
    items = read_custom(again / "captions.jsonl")
    splits = Counter(i.split for i in items)
    assert splits == {"train": 12, "val": 6, "test": 6}
    other = tmp_path / "other"
    generate(other, ShapesSpec(**{**TINY_SPEC.__dict__, "seed": 1}))
    assert (other / "captions.jsonl").read_text() != (again / "captions.jsonl").read_text()


@pytest.mark.parametrize("mode, total, fps, expect", [
    ("uniform", 10, 8.0, [1, 3, 6, 8]),  # segment centres: 1.25, 3.75, 6.25, 8.75 -> floor
    ("uniform", 2, 8.0, [0, 0, 1, 1]),  # short video: frames repeat
    ("fps", 24, 8.0, [0, 8, 16]),  # 1 frame a second of a 3 s clip
    ("fps", 80, 8.0, [10, 30, 50, 70]),  # 10 s at 1 fps is 10 frames: thinned to 4 segment centres
])
def test_frame_sampling(mode: str, total: int, fps: float, expect: list[int]) -> None:
    assert Sampling(mode=mode, num_frames=4, fps=1.0).indices(total, fps) == expect


def test_pixels_backbone_shapes_and_range() -> None:
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    frames[:, :, :16, 0] = 255
    feats = build_backbone("pixels", size=4).encode(frames)
    assert feats.shape == (3, 48) and feats.dtype == torch.float32
    assert feats.min() == -1.0 and feats.max() == 1.0
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("resnet-9000")


def test_store_round_trip(shapes_store: Path) -> None:
    store = FeatureStore(shapes_store)
    manifest = json.loads((shapes_store / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["backbone"] == {"name": "pixels", "dim": 192, "size": 8}
    assert manifest["splits"]["train"] == {"videos": 12, "captions": 36}
    videos = store.split_videos("test")
    feats = store.load_features(videos)
    assert len(feats) == 6 and all(f.shape == (4, 192) for f in feats)
    assert {c["video_id"] for c in store.split_captions("test")} == {v["video_id"] for v in videos}
    with pytest.raises(UserError, match="split 'nope'"):
        store.split_videos("nope")


def test_expert_stores_hold_their_stores_instead_of_being_one(shapes_store: Path) -> None:
    """ExpertStores composes FeatureStores (issue 10): no FeatureStore method it does not mean to
    offer (``load_features`` of the main store alone) leaks through; it reads videos, captions and
    splits from the main store and features from every store, expert by expert."""
    stores = ExpertStores([shapes_store, shapes_store])
    assert not isinstance(stores, FeatureStore) and not hasattr(stores, "load_features")
    main = FeatureStore(shapes_store)
    assert stores.root == main.root and stores.videos == main.videos and stores.ks == main.ks
    assert stores.split_captions("test") == main.split_captions("test")
    assert stores.feature_dims == (192, 192) and len(stores.expert_specs()) == 2
    videos = stores.split_videos("test")
    experts = stores.load_experts(videos)
    assert len(experts) == 2 and all(torch.equal(a, b) for a, b in zip(*experts))
    assert all(torch.equal(a, b) for a, b in zip(experts[0], main.load_features(videos)))


def test_corrupt_missing_and_empty_videos_are_recorded_and_the_run_goes_on(shapes_raw: Path, tmp_path: Path) -> None:
    good = read_custom(shapes_raw / "captions.jsonl")[:3]
    bad = tmp_path / "videos"
    bad.mkdir()
    (bad / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 50)
    (bad / "empty.mp4").write_bytes(b"")
    truncated = (good[0].path.read_bytes())[:300]
    (bad / "truncated.mp4").write_bytes(truncated)
    rows = [{"video": str(p.path), "caption": p.captions[0], "split": "train"} for p in good]
    rows += [{"video": f"videos/{n}.mp4", "caption": "a broken clip", "split": "train"}
             for n in ("garbage", "empty", "truncated", "missing")]
    ann = tmp_path / "captions.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    manifest = prepare_items(read_custom(ann), out, "custom", build_backbone("pixels", size=4), Sampling(num_frames=2))
    assert manifest["counts"] == {"videos": 3, "captions": 3, "failures": 4}
    failures = {r["video_id"]: r["reason"] for r in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert set(failures) == {"garbage", "empty", "truncated", "missing"}
    assert failures["empty"] == "empty file" and failures["missing"] == "missing file"
    assert failures["garbage"].startswith("decode error")
    assert len(FeatureStore(out).split_videos("train")) == 3


def test_read_frames_errors_are_decode_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(b"nonsense" * 100)
    with pytest.raises(DecodeError):
        read_frames(path, Sampling())


def test_custom_annotations_are_validated(tmp_path: Path) -> None:
    ann = tmp_path / "a.jsonl"
    ann.write_text('{"video": "a.mp4"}\n')
    with pytest.raises(UserError, match="row 1 needs 'video' and 'caption'"):
        read_custom(ann)
    ann.write_text("not json\n")
    with pytest.raises(UserError, match="invalid JSON"):
        read_custom(ann)
    csv = tmp_path / "a.csv"
    csv.write_text("video,caption\nclips/a.mp4,a dog runs\nclips/a.mp4,a dog is running\nclips/b.mp4,a cat\n")
    items = read_custom(csv)
    assert [(i.video_id, i.split, len(i.captions)) for i in items] == [("a", "all", 2), ("b", "all", 1)]
