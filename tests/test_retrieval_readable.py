"""Readable results (issue 12): flags that conflict are refused, piped tables are whole TSV with
captions and splits, the contact sheet is a strip over time, the heatmap is a labelled matplotlib
figure, and the Python API takes one string, one path and a 1-D query."""

from __future__ import annotations

import io
import json
import os
import pydoc
import sys
from pathlib import Path

import pytest
import torch

import ssbctl
from ssbctl.core.io import jsonl_text, read_jsonl

from damage import Tiny, assert_one_error_line, build_tiny, cli, copy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shapes_store: Path, tiny_text_model: Path) -> Tiny:
    return build_tiny(tmp_path_factory, shapes_store, tiny_text_model)


def _clip(tiny: Tiny) -> Path:
    return Path(next(read_jsonl(tiny.index / "videos.jsonl"))["path"])


def _first_captions(store: Path) -> dict[str, str]:
    first: dict[str, str] = {}
    for row in read_jsonl(store / "captions.jsonl"):
        first.setdefault(row["video_id"], row["caption"])
    return first


# ---------------------------------------------------------------- conflicting flags


@pytest.mark.parametrize("extra, expect", [
    (["--video", "CLIP", "--caption-bank", "BANK", "--sheet", "OUT"], "--sheet"),
    (["--video", "CLIP", "--caption-bank", "BANK", "--explain", "OUT"], "--explain"),
    (["--video", "CLIP", "--caption-bank", "BANK", "--backend", "faiss"], "--backend"),
    (["--video", "CLIP", "--dual-softmax", "BANK"], "--dual-softmax"),
    (["-q", "a red circle", "--queries", "BANK"], "--queries"),
    (["--queries", "-", "--dual-softmax", "-"], "standard input"),
])
def test_conflicting_or_ignored_flags_are_refused(tiny: Tiny, tmp_path: Path, extra: list[str], expect: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each combination used to run (exit 0) while silently dropping one flag: no sheet written,
    no re-ranking, the query file ignored, stdin read twice."""
    bank = tmp_path / "bank.txt"
    bank.write_text("a red circle moves to the left\na blue square spins\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red circle\n"))
    names = {"CLIP": str(_clip(tiny)), "BANK": str(bank), "OUT": str(tmp_path / "out.png")}
    result = cli(["retrieve", "--index", tiny.index, *[names.get(a, a) for a in extra]])
    assert_one_error_line(result, 2, expect)
    assert not (tmp_path / "out.png").exists()


def test_query_dash_reads_the_query_from_stdin(tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    typed = cli(["retrieve", "-q", "a red circle moves to the left", "--index", tiny.index, "-k", "4", "--json"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red circle moves\n  to the left\n"))
    piped = cli(["retrieve", "-q", "-", "--index", tiny.index, "-k", "4", "--json"])
    assert typed.code == piped.code == 0, piped.err
    assert json.loads(piped.out) == json.loads(typed.out)  # searched for the text, not for "-"
    monkeypatch.setattr(sys, "stdin", io.StringIO(" \n"))
    assert_one_error_line(cli(["retrieve", "-q", "-", "--index", tiny.index]), 2, "--query is empty")


# ---------------------------------------------------------------- tables


def test_piped_results_are_tsv_with_whole_paths_split_and_caption(tiny: Tiny, tmp_path: Path) -> None:
    """stdout is not a terminal here: one header, one row per hit, paths of 250 characters whole."""
    index = copy(tiny.index, tmp_path / "index")
    rows = list(read_jsonl(index / "videos.jsonl"))
    deep = "/data/" + "/".join(["a-rather-long-folder-name"] * 9)
    for row in rows:
        row["path"] = f"{deep}/{row['video_id']}.mp4"
    (index / "videos.jsonl").write_text(jsonl_text(rows))
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle moves to the left\na blue square spins\n")
    result = cli(["retrieve", "--queries", queries, "--index", index, "-k", "3"])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    header = lines[0].split("\t")
    assert header == ["query", "rank", "video_id", "split", "caption", "score", "path"]
    table = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert len(table) == 6 and all(len(line.split("\t")) == len(header) for line in lines)
    assert [r["query"] for r in table] == ["a red circle moves to the left"] * 3 + ["a blue square spins"] * 3
    assert [r["rank"] for r in table] == ["1", "2", "3"] * 2
    captions = _first_captions(tiny.store)
    for r in table:
        assert r["path"] == f"{deep}/{r['video_id']}.mp4"  # whole, not cut to the terminal's width
        assert r["split"] == "test" and r["caption"] == captions[r["video_id"]]
        float(r["score"])


def test_table_on_a_terminal_wraps_long_values_instead_of_cutting_them(tiny: Tiny, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import ssbctl.cli.retrieve as retrieve

    screen = io.StringIO()
    monkeypatch.setattr(retrieve, "out", Console(file=screen, force_terminal=True, width=100, color_system=None))
    result = cli(["retrieve", "-q", "a red circle", "--index", tiny.index, "-k", "2"])
    assert result.code == 0, result.err
    shown = screen.getvalue()
    assert "top 2 for 'a red circle'" in shown and "caption" in shown and "split" in shown and "…" not in shown
    # a wrapped row spans several lines, each holding a piece of every column: read the path column down
    lines = shown.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("┃")).strip("┃").split("┃")]
    column = header.index("path")
    paths = "".join(line.strip("│").split("│")[column].strip() for line in lines if line.startswith("│"))
    hit = json.loads(cli(["retrieve", "-q", "a red circle", "--index", tiny.index, "-k", "1", "--json"]).out)[0]
    assert hit["path"] in paths, (hit["path"], paths)


# ---------------------------------------------------------------- pictures


def test_contact_sheet_shows_each_result_as_frames_over_time(tiny: Tiny, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from ssbctl.data.video import Sampling, read_frames
    from ssbctl.retrieval.render import CELL, FRAMES, GAP, LINE, PAD, sheet_size

    k = 6  # the whole test split: one of its clips stays still, the others move
    result = cli(["retrieve", "-q", "a red circle moves to the left", "--index", tiny.index, "-k", str(k),
                  "--sheet", tmp_path / "sheet.png", "--json"])
    assert result.code == 0, result.err
    hits = json.loads(result.out)
    assert FRAMES >= 4
    with Image.open(tmp_path / "sheet.png") as png:
        assert png.size == sheet_size(1, k, FRAMES)
        sheet = np.asarray(png.convert("RGB"))
    moving = []
    for r, hit in enumerate(hits):
        frames = read_frames(Path(hit["path"]), Sampling(num_frames=FRAMES))
        scale = CELL // 32  # 32x32 clips: enlarged by a whole factor, pixel for pixel
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = frames.shape[1:3]
        top = PAD + LINE + r * (LINE + CELL + GAP) + LINE + (CELL - h) // 2
        shown = [sheet[top:top + h, PAD + f * (CELL + GAP) + (CELL - w) // 2:][:, :w] for f in range(FRAMES)]
        for f in range(FRAMES):
            np.testing.assert_array_equal(shown[f], frames[f])  # frame f of the video, in time order
        moving.append(not np.array_equal(shown[0], shown[-1]))
    assert len(hits) == k and sum(moving) >= k - 1, "the strips show the motion, not one frame repeated"


def test_heatmap_is_a_labelled_figure_with_a_colour_bar() -> None:
    from matplotlib.colorbar import Colorbar

    from ssbctl.retrieval.render import heatmap_figure, heatmap_size, shorten_middle

    long_id = "msrvtt-" + "x" * 60 + "-video7012"
    labels = ["video1", long_id, "video3"]
    weights = [[0.0, 0.75, 0.25], [0.5, 0.0, 0.5], [0.1, 0.9, 0.0]]
    fig = heatmap_figure(weights, labels, "support-set attention (cross) for 'a man cooks'")
    ax, bar_ax = fig.axes
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == "#1 video1" and ticks[2] == "#3 video3"  # whole labels, by retrieval rank
    assert ticks[1].startswith("#2 msrvtt-x") and ticks[1].endswith("-video7012") and "…" in ticks[1]
    assert shorten_middle(long_id) == ticks[1][3:] and len(ticks[1]) < len(long_id)
    assert "attending" in ax.get_ylabel() and "attended to" in ax.get_xlabel()
    assert "a man cooks" in ax.get_title()
    assert isinstance(ax.images[0].colorbar, Colorbar) and ax.images[0].colorbar.ax is bar_ax
    assert "attention weight" in bar_ax.get_ylabel()
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 8
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{w:.2f}" for row in weights for w in row)
    width, height = heatmap_size(3)
    assert width >= 700 and height >= 550  # legible, not a 40-pixel-cell thumbnail


def test_explain_json_carries_the_attention_and_ranks_are_retrieval_ranks(tiny: Tiny, tmp_path: Path) -> None:
    from PIL import Image

    from ssbctl.retrieval.render import heatmap_size

    result = cli(["retrieve", "-q", "a big blue square spins", "--index", tiny.index, "-k", "4",
                  "--explain", tmp_path / "why.png", "--json"])
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["query"] == "a big blue square spins" and len(doc["results"]) == 4
    explain = doc["explain"]
    ids = [h["video_id"] for h in doc["results"]]
    assert explain["videos"] == ids and explain["png"] == str(tmp_path / "why.png")
    weights = torch.tensor(explain["weights"], dtype=torch.float64)
    assert weights.shape == (4, 4)
    torch.testing.assert_close(weights.sum(1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-5)
    assert explain["draws_on"] and all(ids[d["rank"] - 1] == d["video_id"] for d in explain["draws_on"])
    assert [d["weight"] for d in explain["draws_on"]] == sorted((d["weight"] for d in explain["draws_on"]),
                                                                reverse=True)
    with Image.open(tmp_path / "why.png") as png:
        assert png.format == "PNG" and png.size == heatmap_size(4)
    piped = cli(["retrieve", "-q", "a big blue square spins", "--index", tiny.index, "-k", "4",
                 "--explain", tmp_path / "why.png"])
    assert piped.code == 0 and piped.out.startswith("query\trank\tvideo_id")  # the draws-on table: stderr
    assert "draws on" in piped.err


# ---------------------------------------------------------------- Python API


def test_python_api_one_string_one_path_one_query(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ssbctl.load(tiny.run)
    one = run.encode_text("a red circle moves to the left")
    assert one.shape == (run.model.cfg.embed_dim,)  # one embedding, not one per character
    torch.testing.assert_close(one, run.encode_text(["a red circle moves to the left"])[0])
    clip = _clip(tiny)
    for path in (str(clip), clip):
        video = run.encode_video(path)
        assert video.shape == (run.model.cfg.embed_dim,)
    torch.testing.assert_close(video, run.encode_video([clip])[0])

    monkeypatch.setenv("HOME", str(tmp_path))
    copy(tiny.index, tmp_path / "my-index")
    index = ssbctl.Index.load("~/my-index")
    assert index.folder == tmp_path / "my-index"
    hits = index.search(one, k=3)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits == index.search(one.unsqueeze(0), k=3)[0]
    assert index.search(video, k=1)[0]["video_id"] == index.videos[0]["video_id"]  # a video finds itself

    for obj in (run, index):
        text = repr(obj)
        assert len(text) < 200 and "\n" not in text, text
    assert str(tiny.run) in repr(run) and "my-index" in repr(index) and f"{len(index.videos)} videos" in repr(index)


def test_help_and_dir_show_the_library_entry_points() -> None:
    assert {"load", "Index"} <= set(dir(ssbctl))
    text = pydoc.render_doc(ssbctl, renderer=pydoc.plaintext)
    assert "load = load_run(" in text and "class Index" in text
    assert os.path.basename(ssbctl.__file__) == "__init__.py"
