"""The retrieval product on a trained tiny run: search, incremental video indexing, pictures, API."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import ssbctl
from ssbctl.cli.app import main
from ssbctl.config import load_recipe
from ssbctl.data.store import FeatureStore
from ssbctl.inference.run import load_run
from ssbctl.retrieval.build import index_store
from ssbctl.retrieval.index import Index
from ssbctl.retrieval.render import heatmap_size, sheet_size
from ssbctl.training import train


@pytest.fixture(scope="module")
def trained(shapes_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small shapes model (frozen real MiniLM) trained until it knows the 12 training videos;
    and an index of the training videos, with thumbnails."""
    root = tmp_path_factory.mktemp("trained")
    recipe = load_recipe("shapes", [f'data.prepared="{shapes_store}"', "model.embed_dim=64",
                                    "model.video.hidden_dim=64",
                                    "model.decoder.hidden_dim=64", "model.video.dropout=0.0", "train.batch_size=12",
                                    "train.max_steps=80", "train.warmup_steps=5", "train.lr=3e-3",
                                    'data.eval_split=""', "model.support.slots=2"])
    train(recipe, root / "run")
    run = load_run(root / "run")
    index_store(run, FeatureStore(shapes_store), ["train"]).save(root / "index")
    return root / "run", root / "index"


def test_own_caption_finds_its_video_and_search_equals_brute_force(trained, shapes_store: Path) -> None:
    run_dir, index_dir = trained
    run, index = ssbctl.load(run_dir), ssbctl.Index.load(index_dir)
    captions = FeatureStore(shapes_store).split_captions("train")
    queries = run.encode_text([c["caption"] for c in captions])
    hits = index.search(queries, k=3)
    top1 = sum(h[0]["video_id"] == c["video_id"] for h, c in zip(hits, captions)) / len(captions)
    top3 = sum(any(x["video_id"] == c["video_id"] for x in h) for h, c in zip(hits, captions)) / len(captions)
    assert top1 >= 0.7 and top3 >= 0.9, (top1, top3)
    brute = torch.argsort(queries @ index.embeddings.t(), dim=1, descending=True)[:, :3]
    assert [[index.videos[i]["video_id"] for i in row] for row in brute.tolist()] == \
        [[x["video_id"] for x in h] for h in hits]


def test_sheet_and_explain_are_pngs_of_the_expected_size(trained, tmp_path: Path, capsys) -> None:
    from PIL import Image

    _, index_dir = trained
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle moves to the left\na big blue square spins\n")
    assert main(["retrieve", "--queries", str(queries), "--index", str(index_dir), "-k", "4",
                 "--sheet", str(tmp_path / "sheet.png"), "--explain", str(tmp_path / "why.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in result] == queries.read_text().split("\n")[:2] and len(result[0]["results"]) == 4
    with Image.open(tmp_path / "sheet.png") as img:
        assert img.format == "PNG" and img.size == sheet_size(2, 4)
        assert len(set(img.convert("RGB").getdata())) > 50, "thumbnails, not an empty canvas"
    with Image.open(tmp_path / "why.png") as img:
        assert img.format == "PNG" and img.size == heatmap_size(4)


def test_explain_shows_cross_attention(trained) -> None:
    from ssbctl.retrieval.explain import support_attention

    run_dir, index_dir = trained
    run, index = ssbctl.load(run_dir), Index.load(index_dir)
    result = support_attention(run, index, run.encode_text(["a red circle moves to the left"]), k=5)
    weights = torch.tensor(result["weights"])
    assert weights.shape == (5, 5) and torch.all(weights.diagonal() == 0)  # cross: never itself
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    assert result["draws_on"][0]["weight"] == max(weights[0].tolist())


def test_explain_with_an_ivf_index_uses_only_the_videos_found(trained, tmp_path: Path) -> None:
    """With one of 4 IVF cells probed, fewer than k=12 videos are found: the support set is those,
    not padded with the last video (faiss's row -1)."""
    from ssbctl.retrieval.ann import build_ann
    from ssbctl.retrieval.explain import support_attention

    run_dir, index_dir = trained
    shutil.copytree(index_dir, tmp_path / "index")
    index = Index.load(tmp_path / "index")
    build_ann(index.embeddings, tmp_path / "index", factory="IVF4,Flat", nprobe=1, sample=12, k=5)
    index.backend = "faiss"
    run = ssbctl.load(run_dir)
    query = run.encode_text(["a red circle moves to the left"])
    found = [index.videos[r]["video_id"] for r in index.top(query, 12)[1][0].tolist()]
    assert 0 < len(found) < 12 and len(set(found)) == len(found)
    result = support_attention(run, index, query, k=12)
    assert result["videos"] == found
    assert torch.tensor(result["weights"]).shape == (len(found), len(found))


def test_dual_softmax_reports_both_scores(trained, tmp_path: Path, capsys) -> None:
    _, index_dir = trained
    bank = tmp_path / "bank.txt"
    bank.write_text("a green cross falls\na small white box grows\na purple ball rises\n")
    assert main(["retrieve", "--query", "a red circle moves to the left", "--index", str(index_dir),
                 "--dual-softmax", str(bank), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all({"score", "ds_score"} <= h.keys() for h in hits)
    assert hits[0]["ds_score"] >= hits[1]["ds_score"] >= hits[2]["ds_score"]


def test_incremental_video_index_and_video_queries(trained, shapes_raw: Path, tmp_path: Path, capsys) -> None:
    run_dir, _ = trained
    folder = tmp_path / "my videos"
    (folder / "sub").mkdir(parents=True)
    clips = sorted((shapes_raw / "videos").glob("*.mp4"))
    for clip in clips[:2]:
        shutil.copy(clip, folder / clip.name)
    shutil.copy(clips[2], folder / "sub" / "c.webm.mp4")
    (folder / "broken.mkv").write_bytes(b"\x1aE\xdf\xa3 not really matroska")
    index = tmp_path / "idx"

    def run_index() -> dict:
        assert main(["index", str(run_dir), "--videos", str(folder), "--out", str(index), "--json",
                     "--workers", "1"]) == 0
        return json.loads(capsys.readouterr().out)

    first = run_index()
    assert (first["videos"], first["embedded"], first["reused"]) == (3, 3, 0)
    assert [f["path"].endswith("broken.mkv") for f in first["failed"]] == [True]
    assert len((index / "failures.jsonl").read_text().splitlines()) == 1
    assert len(list((index / "thumbs").glob("*.png"))) == 3

    shutil.copy(clips[3], folder / "new.mp4")
    second = run_index()
    assert (second["videos"], second["embedded"], second["reused"]) == (4, 1, 3)
    time.sleep(0.01)
    os.utime(folder / clips[0].name)  # touched: embedded again
    (folder / "sub" / "c.webm.mp4").unlink()
    third = run_index()
    assert (third["videos"], third["embedded"], third["reused"]) == (3, 1, 2)
    idx = Index.load(index)
    assert len(list((index / "thumbs").glob("*.png"))) == 3 and idx.embeddings.shape[0] == 3

    # video to video: a file finds itself first
    assert main(["retrieve", "--video", str(folder / "new.mp4"), "--index", str(index), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["video_id"] == "new" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # video to text from a caption bank
    bank = tmp_path / "captions.txt"
    bank.write_text("a red circle moves to the left\na blue square spins\na tiny green cross falls\n")
    assert main(["retrieve", "--video", str(folder / "new.mp4"), "--caption-bank", str(bank), "--index", str(index),
                 "-k", "2", "--json"]) == 0
    captions = json.loads(capsys.readouterr().out)
    assert [c["rank"] for c in captions] == [1, 2] and captions[0]["score"] >= captions[1]["score"]


def test_python_api_encodes_videos_like_the_index(trained, shapes_store: Path) -> None:
    run_dir, index_dir = trained
    run, index = ssbctl.load(run_dir), Index.load(index_dir)
    first = index.videos[0]
    emb = run.encode_video([first["path"]])
    assert emb.shape == (1, 64)
    torch.testing.assert_close(emb[0], index.embeddings[0], rtol=1e-4, atol=1e-5)


def test_retrieve_argument_errors(trained, capsys) -> None:
    _, index_dir = trained
    assert main(["retrieve", "--index", str(index_dir)]) == 2
    assert "give --query/--queries or --video" in capsys.readouterr().err
    assert main(["retrieve", "--query", "x", "--caption-bank", "b.txt", "--index", str(index_dir)]) == 2
