"""Each dataset in its real layout goes through `ssbctl prepare` with a tiny random CLIP vision
model saved to disk and loaded back through `from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssbctl.cli.app import main
from ssbctl.core.errors import UserError
from ssbctl.data.datasets.msrvtt import read_test_pairs
from ssbctl.data.datasets.msvd import load_plain_pickle
from ssbctl.data.store import FeatureStore

import fixtures


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer CLIP vision tower (projection 24) with its image processor, saved to disk."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _prepare(dataset: str, root: Path, out: Path, clip: Path, capsys, *extra: str) -> FeatureStore:
    code = main(["prepare", dataset, "--root", str(root), "--out", str(out), "--backbone", f"clip:{clip}",
                 "--workers", "0", "--json", *extra])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["merged"]
    return FeatureStore(out)


def test_real_jsfusion_file_has_exactly_1000_pairs() -> None:
    pairs = read_test_pairs(fixtures.SHARED / "msrvtt" / "MSRVTT_JSFUSION_test.csv")
    assert len(pairs) == 1000 and len({v for v, _ in pairs}) == 1000
    assert pairs[0] == ("video9770", "a person is connecting something to system")


def test_msrvtt(tmp_path: Path, tiny_clip: Path, capsys) -> None:
    store = _prepare("msrvtt", fixtures.msrvtt(tmp_path / "msrvtt"), tmp_path / "out", tiny_clip, capsys)
    assert store.manifest["splits"] == {"test": {"videos": 3, "captions": 3}, "train": {"videos": 4, "captions": 12}}
    test_caps = [c["caption"] for c in store.split_captions("test")]
    assert test_caps[0] == "a person is connecting something to system"  # the JSFUSION sentence, not data.json's
    assert store.manifest["backbone"]["name"] == "clip" and store.feature_dim == 24
    assert store.manifest["sampling"] == {"mode": "fps", "num_frames": 12, "fps": 1.0, "max_seconds": None,
                                         "short_side": 32}  # decoded at the tiny CLIP processor's size
    feats = store.load_features(store.split_videos("train"))
    assert all(f.shape[1] == 24 and 1 <= f.shape[0] <= 12 and torch.isfinite(f).all() for f in feats)
    assert store.ks == (1, 5, 10)
    assert main(["prepare", "msrvtt", "--root", str(tmp_path / "msrvtt"), "--split", "7k"]) == 2
    assert "MSRVTT_train.7k.csv not found" in capsys.readouterr().err


def test_msvd_avi_files_and_pickled_token_lists(tmp_path: Path, tiny_clip: Path, capsys) -> None:
    store = _prepare("msvd", fixtures.msvd(tmp_path / "msvd"), tmp_path / "out", tiny_clip, capsys)
    assert {s: c["videos"] for s, c in store.manifest["splits"].items()} == {"train": 2, "val": 2, "test": 2}
    assert store.split_captions("train")[0]["caption"] == "a man is cooking 0"
    assert store.manifest["counts"]["failures"] == 0


def test_vatex_ten_captions_per_video(tmp_path: Path, tiny_clip: Path, capsys) -> None:
    store = _prepare("vatex", fixtures.vatex(tmp_path / "vatex"), tmp_path / "out", tiny_clip, capsys)
    assert store.manifest["splits"]["test"] == {"videos": 2, "captions": 20}


def test_activitynet_paragraphs_and_v_prefix(tmp_path: Path, tiny_clip: Path, capsys) -> None:
    store = _prepare("activitynet", fixtures.activitynet(tmp_path / "anet"), tmp_path / "out", tiny_clip, capsys,
                     "--frames", "64")
    assert store.manifest["counts"] == {"videos": 4, "captions": 4, "failures": 0}
    caption = store.split_captions("val_1")[0]
    assert caption["caption"] == f"{caption['video_id']} starts. Then val_1 ends."
    assert store.ks == (1, 5, 10, 50) and store.manifest["protocol"]["paragraph"] is True


def test_didemo_paragraphs(tmp_path: Path, tiny_clip: Path, capsys) -> None:
    store = _prepare("didemo", fixtures.didemo(tmp_path / "didemo"), tmp_path / "out", tiny_clip, capsys)
    assert store.manifest["splits"] == {"test": {"videos": 1, "captions": 1}, "train": {"videos": 2, "captions": 2}}
    assert store.split_captions("test")[0]["caption"] == "sentence 0 of c3@N3_333.avi sentence 1 of c3@N3_333.avi"


def test_missing_videos_are_recorded(tmp_path: Path, tiny_clip: Path, capsys) -> None:
    root = fixtures.msrvtt(tmp_path / "msrvtt")
    (root / "videos" / "all" / "video9771.mp4").unlink()
    store = _prepare("msrvtt", root, tmp_path / "out", tiny_clip, capsys)
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [(f["video_id"], f["reason"]) for f in failures] == [("video9771", "missing file")]
    assert store.manifest["splits"]["test"]["videos"] == 2


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    import pickle

    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"vid": Evil()}))
    with pytest.raises(UserError, match="refused or unreadable pickle.*posix.system|refusing"):
        load_plain_pickle(path)
    assert not marker.exists()


def test_missing_annotation_files_are_user_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "msrvtt", "--root", str(tmp_path / "empty")]) == 2
    assert "MSRVTT_data.json not found" in capsys.readouterr().err
    assert main(["prepare", "didemo"]) == 2  # no --root, nothing in $SSBCTL_HOME/raw/didemo, no full download
    assert "didemo: no data in" in capsys.readouterr().err
    assert main(["prepare", "vatex", "--root", str(tmp_path / "empty")]) == 2


def test_hf_automodel_backbone_and_imported_features(tmp_path: Path, tiny_vit: Path, capsys) -> None:
    folder = tiny_vit
    root = fixtures.msvd(tmp_path / "msvd", per_split=1)
    code = main(["prepare", "msvd", "--root", str(root), "--out", str(tmp_path / "vit"), "--backbone", f"hf:{folder}",
                 "--backbone", "pixels", "--pixel-size", "4", "--workers", "0", "--json"])
    assert code == 0
    manifests = json.loads(capsys.readouterr().out)["manifests"]
    assert [m["backbone"]["dim"] for m in manifests] == [16, 48]
    assert [Path(m["out"]).name for m in manifests] == [f"vit-{folder.name}", "vit-pixels"]
    # the same features imported from .npy files give the same store contents
    store = FeatureStore(tmp_path / f"vit-{folder.name}")
    feats_dir = tmp_path / "npy"
    feats_dir.mkdir()
    import numpy as np

    for video, feats in zip(store.videos, store.load_features(store.videos)):
        np.save(feats_dir / f"{video['video_id']}.npy", feats.numpy())
    assert main(["prepare", "msvd", "--root", str(root), "--out", str(tmp_path / "imported"),
                 "--features", str(feats_dir), "--workers", "0", "--json"]) == 0
    imported = FeatureStore(tmp_path / "imported")
    assert imported.manifest["backbone"]["name"] == "imported"
    for a, b in zip(store.load_features(store.videos), imported.load_features(imported.videos)):
        assert torch.equal(a, b)


def test_shapes_clips_are_the_same_bytes_every_time(tmp_path: Path) -> None:
    """Same spec and seed, same files: the demo's numbers depend on it. x264's macroblock-tree rate
    control made about 1 clip in 10 differ between runs on a loaded machine."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from ssbctl.data.datasets.shapes import ShapesSpec, generate

    spec = ShapesSpec(num_videos=16)

    def digests(root: Path) -> list[str]:
        generate(root, spec)
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "videos").glob("*.mp4"))]

    with ThreadPoolExecutor(3) as pool:  # side by side, as under load
        runs = list(pool.map(digests, [tmp_path / "a", tmp_path / "b", tmp_path / "c"]))
    assert len(runs[0]) == 16 and runs[0] == runs[1] == runs[2]


def test_imported_features_are_a_source_that_computes_nothing() -> None:
    """Imported features have no ``encode``: they are a FeatureSource, not a Backbone whose
    encode raises."""
    from ssbctl.data.backbone import Backbone, FeatureSource
    from ssbctl.data.backbones import ImportedFeatures, PixelsBackbone

    imported = ImportedFeatures(12, "/feats")
    assert isinstance(imported, FeatureSource) and not isinstance(imported, Backbone)
    assert not hasattr(imported, "encode") and imported.options() == {"source": "/feats"}
    assert isinstance(PixelsBackbone(4), Backbone)
