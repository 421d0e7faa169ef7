"""A newcomer's first hour (issue 12): the three commands of the mission typed as they stand,
outside a git checkout and offline, against MSVD's publishers' files served on 127.0.0.1; and the
data safety of `ssbctl index` (adding, never silently dropping) and its honesty about footage a run
was not trained on."""

from __future__ import annotations

import functools
import json
import os
import re
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ssbctl.cli.app import main
from ssbctl.config import load_recipe
from ssbctl.core.paths import shipped_configs

import fixtures

TINY = {"model.embed_dim": 16, "model.video.hidden_dim": 16, "model.video.layers": 1, "model.video.heads": 2,
        "model.decoder.hidden_dim": 16, "model.decoder.layers": 1, "model.decoder.heads": 2,
        "model.video.dropout": 0.0, "model.decoder.dropout": 0.0, "train.batch_size": 4, "train.max_steps": 3,
        "train.log_every": 1, "data.num_workers": 0}
PER_SPLIT = {"train": 4, "val": 2, "test": 3}


class _Publisher:
    """A static web server over a folder, as the publishers' (answers HEAD with the size, GET with
    the file); counts the GET requests it answered."""

    def __init__(self, folder: Path) -> None:
        self.gets: list[str] = []
        publisher = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                publisher.gets.append(self.path)
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def msvd_as_published(folder: Path) -> dict[str, list[str]]:
    """MSVD as utexas.edu serves it: ``YouTubeClips.tar`` (``YouTubeClips/ID.avi``) and
    ``AllVideoDescriptions.txt`` (``#`` header, then ``ID caption`` lines); the first ids of each of
    the real splits, with captions in the tiny text model's words. Returns the ids by split."""
    clips, ids = folder / "clips", {}
    lines = ["# Each line of this file has a video id and one of its English descriptions", "#"]
    for split, n in PER_SPLIT.items():
        ids[split] = fixtures._head(fixtures.SHARED / "msvd" / f"{split}_list.txt", n)
        for i, vid in enumerate(ids[split]):
            fixtures.write_clip(clips / "YouTubeClips" / f"{vid}.avi", i + 10 * len(split))
            lines += [f"{vid} a man cooks", f"{vid} a person cooks {'left' if i % 2 else 'right'}"]
    served = folder / "served" / "msvd"
    served.mkdir(parents=True)
    with tarfile.open(served / "YouTubeClips.tar", "w") as tar:
        tar.add(clips / "YouTubeClips", arcname="YouTubeClips")
    (served / "AllVideoDescriptions.txt").write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture
def publisher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_Publisher, dict[str, list[str]]]]:
    ids = msvd_as_published(tmp_path / "msvd-site")
    server = _Publisher(tmp_path / "msvd-site" / "served")
    monkeypatch.setenv("SSBCTL_MIRROR", server.url)
    try:
        yield server, ids
    finally:
        server.close()


def _sets(values: dict[str, object]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def test_the_three_commands_as_typed(publisher, tmp_path: Path, tiny_vit: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys) -> None:
    server, ids = publisher
    home = Path(os.environ["SSBCTL_HOME"])
    monkeypatch.chdir(tmp_path)  # not a git checkout: no recipes/ folder here
    assert not (tmp_path / "recipes").exists()

    # 1. `ssbctl prepare msvd`: downloads what MSVD's publishers serve into $SSBCTL_HOME/raw/msvd after saying
    # what and how big, and picks the backbone `--recipe msvd` trains on (CLIP, whose weights this offline
    # machine lacks: the command stops there, after the download).
    main(["prepare", "msvd"])
    said = capsys.readouterr().err
    tar_size = (tmp_path / "msvd-site" / "served" / "msvd" / "YouTubeClips.tar").stat().st_size
    assert re.search(r"YouTubeClips\.tar \([0-9.]+ kB\)", said) and "AllVideoDescriptions.txt (" in said, said
    assert f"{tar_size / 1000:.1f} kB" in said
    assert "backbone: clip (none given)" in said
    assert str(home / "data" / load_recipe("msvd").data.prepared) in said  # the folder `--recipe msvd` reads
    raw = home / "raw" / "msvd"
    assert sorted(p.stem for p in (raw / "YouTubeClips").iterdir()) == sorted(sum(ids.values(), []))
    assert (raw / "AllVideoDescriptions.txt").is_file()
    assert sorted(server.gets) == ["/msvd/AllVideoDescriptions.txt", "/msvd/YouTubeClips.tar"]

    # ... and with a stand-in for CLIP's weights, into the folder the recipes read (no second download).
    prepared = home / "data" / "msvd-clip-vit-base-patch32"
    assert main(["prepare", "msvd", "--backbone", f"hf:{tiny_vit}", "--out", str(prepared), "--workers", "0"]) == 0
    assert len(server.gets) == 2
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert {s: c["videos"] for s, c in manifest["splits"].items()} == PER_SPLIT
    capsys.readouterr()

    # 2. `ssbctl train --recipe recipes/msrvtt.toml` from a folder without recipes: the shipped recipe, said so
    # (pointed at the MSVD data just prepared, with tiny stand-ins for the models).
    text = fixtures.tiny_text_model(tmp_path / "text", "clip", dropout=0.0)
    run_dir = tmp_path / "runs" / "msrvtt"
    assert main(["train", "--recipe", "recipes/msrvtt.toml", "--out", str(run_dir),
                 *_sets({**TINY, "model.text.pretrained": str(text), "data.prepared": prepared.name})]) == 0
    done = capsys.readouterr()
    assert "using the shipped recipe 'msrvtt'" in done.err
    assert f"indexed the {PER_SPLIT['test']} test videos -> {run_dir / 'index'}" in done.out

    experts = json.loads((run_dir / "experts.json").read_text())
    assert experts[0]["dataset"] == "msvd" and experts[0]["prepared"] == prepared.name
    assert experts[0]["frame_size"] == [32, 32]  # the fixture's clips

    # 3. `ssbctl retrieve --query "a man cooks"` searches that run's test videos, and says which index.
    assert main(["retrieve", "--query", "a man cooks"]) == 0
    result = capsys.readouterr()
    assert f"searching {(run_dir / 'index').resolve()}" in result.err.replace("\n", "")
    found = set(re.findall(r"[\w-]{11}_\d+_\d+", result.out))
    assert found and found <= set(ids["test"]), result.out


def test_default_backbone_is_the_one_each_recipe_trains_on() -> None:
    from ssbctl.cli.prepare import _chosen_backbones, backbone_spec_tag
    from ssbctl.data.datasets import DATASETS

    for name in sorted(set(shipped_configs("recipes")) & set(DATASETS)):
        recipe = load_recipe(name)
        chosen = _chosen_backbones(name, named_out=True)
        assert [f"{name}-{backbone_spec_tag(s)}" for s in chosen] == [recipe.data.prepared, *recipe.data.experts]
    assert _chosen_backbones("msvd", named_out=True) == ["clip"]


@pytest.mark.parametrize("dataset, needle", [("msrvtt", "MSRVTT_data.json"), ("activitynet", "val_1.json"),
                                             ("vatex", "vatex_training_v1.0.json")])
def test_what_cannot_be_downloaded_is_said_in_one_line(dataset: str, needle: str, capsys) -> None:
    assert main(["prepare", dataset]) == 2
    said = capsys.readouterr().err.strip()
    root = Path(os.environ["SSBCTL_HOME"]) / "raw" / dataset
    assert said.startswith(f"error: {dataset}: no data in {root}; put ") and needle in said, said
    assert "--root" in said and len(said.splitlines()) == 1


def test_recipe_path_outside_a_checkout_is_the_shipped_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--recipe", "recipes/msrvtt.toml"]) == 2
    said = capsys.readouterr().err
    assert f"recipes/msrvtt.toml is not in {tmp_path}; using the shipped recipe 'msrvtt'" in said.replace("\n", "")
    assert "msrvtt-clip-vit-base-patch32" in said  # it went on with the shipped recipe's prepared data


def test_prepare_custom_says_which_backbone(shapes_raw: Path, tmp_path: Path, capsys) -> None:
    assert main(["prepare", "custom", "--annotations", str(shapes_raw / "captions.jsonl"), "--out",
                 str(tmp_path / "mine"), "--workers", "0"]) == 0
    said = capsys.readouterr().err.replace("\n", " ")
    assert "backbone: pixels (none given)" in said and "--backbone clip" in said
