"""Protocols comparable with the published tables: both video-to-text conventions against
hand-computed ranks, DiDeMo's 31-second cut, and the warning when a split lost videos at prepare.

The similarity matrices below are written out by hand: with ``video`` the identity, ``text @
video.T`` is ``text`` itself, so each text row *is* that caption's similarities to the videos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssbctl.cli.app import main
from ssbctl.data.backbones import build_backbone
from ssbctl.data.datasets import read_custom
from ssbctl.data.datasets.shapes import write_mp4
from ssbctl.data.prepare import prepare_items
from ssbctl.data.store import FeatureStore
from ssbctl.data.video import Sampling
from ssbctl.evaluation.metrics import retrieval_metrics, t2v_ranks, v2t_group_max_ranks, v2t_ranks

from damage import Tiny, build_tiny, cli

# captions a0 a1 (video 0), b0 b1 b2 (video 1), c0 (video 2); columns: similarity to videos 0, 1, 2
SIMS = torch.tensor([[0.90, 0.60, 0.40],   # a0
                     [0.20, 0.55, 0.45],   # a1
                     [0.80, 0.30, 0.42],   # b0
                     [0.85, 0.50, 0.41],   # b1
                     [0.70, 0.10, 0.00],   # b2
                     [0.95, 0.20, 0.40]],  # c0
                    dtype=torch.float64)
OWNER = torch.tensor([0, 0, 1, 1, 1, 2])
EYE = torch.eye(3, dtype=torch.float64)


def test_hand_computed_ranks_of_both_conventions() -> None:
    # video 0 (column 0): own best a0 .90; c0 .95 beats it; groups: B max .85, C .95 -> mmt 2, clip4clip 2
    # video 1 (column 1): own best b1 .50; a0 .60, a1 .55 beat it (one group A .60)  -> mmt 3, clip4clip 2
    # video 2 (column 2): own c0 .40; a0 .40 (a tie: counts against), a1 .45, b0 .42, b1 .41 -> mmt 5;
    #                     groups A .45, B .42                                          -> clip4clip 3
    assert v2t_ranks(SIMS, EYE, OWNER).tolist() == [2, 3, 5]
    assert v2t_group_max_ranks(SIMS, EYE, OWNER).tolist() == [2, 2, 3]
    assert t2v_ranks(SIMS, EYE, OWNER).tolist() == [1, 3, 3, 2, 2, 2]


def test_hand_computed_summaries_differ_beyond_r1() -> None:
    m = retrieval_metrics(SIMS, EYE, OWNER, ks=(1, 2, 3))
    assert m["v2t_convention"] == "clip4clip"  # the default: the CLIP tables the README compares with
    assert m["v2t"] == m["v2t_clip4clip"] == pytest.approx({"R1": 0.0, "R2": 200 / 3, "R3": 100.0,
                                                            "MdR": 2.0, "MnR": 7 / 3})
    assert m["v2t_mmt"] == pytest.approx({"R1": 0.0, "R2": 100 / 3, "R3": 200 / 3, "MdR": 3.0, "MnR": 10 / 3})
    assert m["t2v"] == pytest.approx({"R1": 100 / 6, "R2": 400 / 6, "R3": 100.0, "MdR": 2.0, "MnR": 13 / 6})
    chosen = retrieval_metrics(SIMS, EYE, OWNER, ks=(1, 2, 3), v2t_convention="mmt")
    assert chosen["v2t_convention"] == "mmt" and chosen["v2t"] == chosen["v2t_mmt"] == m["v2t_mmt"]
    assert chosen["v2t_clip4clip"] == m["v2t_clip4clip"] and chosen["t2v"] == m["t2v"]
    with pytest.raises(ValueError, match="clip4clip, mmt"):
        retrieval_metrics(SIMS, EYE, OWNER, v2t_convention="best")


def test_a_tied_group_counts_once_against_the_model() -> None:
    # video 0's one caption scores .5; video 1's two captions both score .5 for video 0
    text = torch.tensor([[0.5, 0.0], [0.5, 0.9], [0.5, 0.8]], dtype=torch.float64)
    owner = torch.tensor([0, 1, 1])
    eye = torch.eye(2, dtype=torch.float64)
    assert v2t_group_max_ranks(text, eye, owner).tolist() == [2, 1]  # one tied group: rank 2, not 1 or 3
    assert v2t_ranks(text, eye, owner).tolist() == [3, 1]  # two tied captions


def test_one_caption_per_video_gives_one_block() -> None:
    single = retrieval_metrics(SIMS[[0, 2, 5]], EYE, torch.tensor([0, 1, 2]))
    assert single["v2t_convention"] == "clip4clip"
    assert "v2t_mmt" not in single and "v2t_clip4clip" not in single
    assert v2t_ranks(SIMS[[0, 2, 5]], EYE, torch.tensor([0, 1, 2])).tolist() == \
        v2t_group_max_ranks(SIMS[[0, 2, 5]], EYE, torch.tensor([0, 1, 2])).tolist()


def _reference_group_max(sims: list[list[float]], owner: list[int]) -> list[int]:
    """CLIP4Clip's convention written plainly: each captioned video's own group against every other
    group, a group scoring its best caption; ties against the model."""
    groups = sorted(set(owner))
    score = {(v, g): max(sims[c][v] for c in range(len(owner)) if owner[c] == g) for v in groups for g in groups}
    return [1 + sum(score[v, g] >= score[v, v] for g in groups if g != v) for v in groups]


def test_group_max_matches_a_plain_reference_and_agrees_with_mmt_at_r1() -> None:
    torch.manual_seed(3)
    video = F.normalize(torch.randn(23, 6, dtype=torch.float64), dim=-1)
    owner = torch.randint(0, 20, (70,))  # videos 20-22 have no caption: no query, no candidate group
    text = F.normalize(video[owner] + 0.9 * torch.randn(70, 6, dtype=torch.float64), dim=-1)
    expected = _reference_group_max((text @ video.t()).tolist(), owner.tolist())
    for chunk in (1, 4, 1000):
        assert v2t_group_max_ranks(text, video, owner, chunk=chunk).tolist() == expected
    mmt = v2t_ranks(text, video, owner)
    group = torch.tensor(expected)
    assert torch.equal(mmt == 1, group == 1) and bool((mmt >= group).all())
    assert bool((mmt > group).any())  # a test that can tell them apart


def test_non_finite_scores_rank_last_in_the_group_convention() -> None:
    text = SIMS.clone()
    text[5] = float("nan")  # video 2's only caption: its group scores -inf, below every real group
    assert v2t_group_max_ranks(text, EYE, OWNER).tolist() == [1, 2, 3]
    text[4, 0] = float("inf")  # an Inf for video 0 counts as -inf too: B's max is then .85 < .90
    assert v2t_group_max_ranks(text, EYE, OWNER)[0].item() == 1


# ---------------------------------------------------------------- through `ssbctl evaluate`


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shapes_store: Path, tiny_text_model: Path) -> Tiny:
    return build_tiny(tmp_path_factory, shapes_store, tiny_text_model)


def test_evaluate_names_the_convention_and_reports_both(tiny: Tiny) -> None:
    default = cli(["evaluate", str(tiny.run), "--split", "test", "--json"])
    assert default.code == 0, default.err
    result = json.loads(default.out)
    assert result["v2t_convention"] == "clip4clip" and result["v2t"] == result["v2t_clip4clip"]
    assert result["lost_videos"] == 0 and "warning" not in default.err
    assert result["v2t_mmt"]["R1"] == result["v2t_clip4clip"]["R1"]
    assert result["v2t_mmt"]["MnR"] >= result["v2t_clip4clip"]["MnR"]
    mmt = cli(["evaluate", str(tiny.run), "--split", "test", "--json", "--v2t", "mmt"])
    assert mmt.code == 0, mmt.err
    chosen = json.loads(mmt.out)
    assert chosen["v2t_convention"] == "mmt" and chosen["v2t"] == chosen["v2t_mmt"] == result["v2t_mmt"]
    table = cli(["evaluate", str(tiny.run), "--split", "test"])
    assert table.code == 0 and "video-to-text, clip4clip" in table.out and "video-to-text, mmt" in table.out
    assert table.out.index("video-to-text, clip4clip") < table.out.index("video-to-text, mmt")
    bad = cli(["evaluate", str(tiny.run), "--v2t", "best"])
    assert bad.code == 2 and bad.err.strip() == "error: --v2t must be one of clip4clip, mmt, got 'best'"


def test_evaluate_warns_when_the_split_lost_videos(tiny: Tiny, shapes_raw: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(shapes_raw, raw)
    items = read_custom(raw / "captions.jsonl")
    lost = [it for it in items if it.split == "test"][:2] + [it for it in items if it.split == "train"][:1]
    for item in lost:
        item.path.unlink()  # prepare records these as failures ("missing file")
    store = tmp_path / "store"
    prepare_items(read_custom(raw / "captions.jsonl"), store, "shapes", build_backbone("pixels", size=8),
                  Sampling(num_frames=4))
    assert {f["video_id"]: f["split"] for f in FeatureStore(store).failures()} == \
        {it.video_id: it.split for it in lost}
    test = cli(["evaluate", str(tiny.run), "--data", str(store), "--split", "test", "--json"])
    assert test.code == 0, test.err
    assert json.loads(test.out)["lost_videos"] == 2
    assert test.err.startswith("warning: 2 videos of split 'test' could not be used at prepare time")
    assert "the gallery has 4 videos instead of 6" in test.err and len(test.err.strip().splitlines()) == 1
    train = cli(["evaluate", str(tiny.run), "--data", str(store), "--split", "train"])
    assert train.code == 0 and "warning: 1 video of split 'train'" in train.err
    val = cli(["evaluate", str(tiny.run), "--data", str(store), "--split", "val", "--json"])
    assert val.code == 0 and "warning" not in val.err and json.loads(val.out)["lost_videos"] == 0
    # a store written before failures recorded their split: every failure may be this split's
    rows = [json.loads(line) for line in (store / "failures.jsonl").read_text().splitlines()]
    (store / "failures.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                                                  for r in rows))
    old = cli(["evaluate", str(tiny.run), "--data", str(store), "--split", "val"])
    assert old.code == 0 and "warning: 3 videos of this store could not be used" in old.err
    assert "does not record their splits" in old.err


# ---------------------------------------------------------------- DiDeMo's first 31 seconds


def test_sampling_window_keeps_the_first_seconds() -> None:
    # 40 s at 30 fps: frame i is at i/30 s; the window keeps frames 0..930 (31.0 s)
    cut = Sampling(mode="fps", num_frames=64, fps=1.0, max_seconds=31.0)
    assert cut.indices(1200, 30.0) == list(range(0, 931, 30))  # seconds 0..31: 32 frames, as CLIP4Clip
    assert Sampling(mode="fps", num_frames=64, fps=1.0).indices(1200, 30.0) == list(range(0, 1200, 30))
    assert cut.indices(300, 30.0) == list(range(0, 300, 30))  # a 10 s video is not affected
    uniform = Sampling(mode="uniform", num_frames=4, max_seconds=31.0).indices(1200, 30.0)
    assert max(uniform) <= 930 and uniform == [116, 349, 581, 814]
    assert cut.indices(1200, 0.0) == Sampling(mode="fps", num_frames=64).indices(1200, 0.0)  # rate unknown


def _solid_video(path: Path, seconds: int, fps: int = 2) -> None:
    frames = np.stack([np.full((16, 16, 3), (7 * i) % 256, np.uint8) for i in range(seconds * fps)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames, fps)


def test_didemo_videos_are_cut_to_their_first_31_seconds(tmp_path: Path, capsys) -> None:
    root = tmp_path / "didemo"
    root.mkdir()
    for split, video in (("train", "long@N1_1.mp4"), ("test", "short@N2_2.mp4")):
        rows = [{"video": video, "description": f"moment {k}.", "times": [[k, k]]} for k in range(2)]
        (root / f"{split}_data.json").write_text(json.dumps(rows))
    _solid_video(root / "videos" / "long@N1_1.mp4", 40)
    _solid_video(root / "videos" / "short@N2_2.mp4", 10)
    out = tmp_path / "store"
    assert main(["prepare", "didemo", "--root", str(root), "--out", str(out), "--backbone", "pixels",
                 "--pixel-size", "8", "--workers", "0", "--json"]) == 0
    capsys.readouterr()
    store = FeatureStore(out)
    frames = {v["video_id"]: v["num_frames"] for v in store.videos}
    assert frames == {"long@N1_1.mp4": 32, "short@N2_2.mp4": 10}  # 0..31 s at 1 fps; 40 without the cut
    assert store.manifest["protocol"]["max_seconds"] == 31.0 and store.manifest["sampling"]["max_seconds"] == 31.0
    assert "max_seconds" not in store.expert_specs()[0]["sampling"]  # new videos are embedded whole
    # the same video under a protocol without a window (ActivityNet) keeps all 40 seconds
    anet = tmp_path / "anet"
    for split in ("train", "val_1"):
        data = {f"v_{split}": {"duration": 40.0, "timestamps": [[0, 40]], "sentences": ["a moment."]}}
        (anet / "videos").mkdir(parents=True, exist_ok=True)
        (anet / f"{split}.json").write_text(json.dumps(data))
        shutil.copy(root / "videos" / "long@N1_1.mp4", anet / "videos" / f"v_{split}.mp4")
    assert main(["prepare", "activitynet", "--root", str(anet), "--out", str(tmp_path / "anet-store"),
                 "--backbone", "pixels", "--pixel-size", "8", "--workers", "0", "--json"]) == 0
    capsys.readouterr()
    assert {v["num_frames"] for v in FeatureStore(tmp_path / "anet-store").videos} == {40}
