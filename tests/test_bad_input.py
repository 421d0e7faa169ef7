"""Bad input, case by case, through the real CLI: each damaged file or wrong argument gives exit
code 1 (bad data) or 2 (bad input), exactly one ``error:`` line naming the file or key, and no
traceback; the loader that reads the file reports it (never the CLI's last-resort handler)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from damage import Tiny, assert_one_error_line, build_tiny, checkpoint_of, cli, copy, hashes

Case = tuple[list[str], int, list[str]]  # argv, exit code, texts the error line names
CASES: dict[str, Callable[[Tiny, Path], Case]] = {}


def case(fn: Callable[[Tiny, Path], Case]) -> Callable[[Tiny, Path], Case]:
    CASES[fn.__name__] = fn
    return fn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shapes_store: Path, tiny_text_model: Path) -> Tiny:
    return build_tiny(tmp_path_factory, shapes_store, tiny_text_model)


def _shard(store: Path) -> Path:
    return store / "features-00000.safetensors"


def _evaluate_store(tiny: Tiny, store: Path) -> list[str]:
    return ["evaluate", tiny.run, "--data", store, "--split", "test"]


# ---------------------------------------------------------------- prepared data


@case
def shard_truncated(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    _shard(store).write_bytes(_shard(store).read_bytes()[:300])
    return _evaluate_store(tiny, store), 1, ["features-00000.safetensors"]


@case
def shard_empty(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    _shard(store).write_bytes(b"")
    return _evaluate_store(tiny, store), 1, ["features-00000.safetensors"]


@case
def shard_deleted(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    _shard(store).unlink()
    return _evaluate_store(tiny, store), 1, ["features-00000.safetensors", "missing"]


@case
def shard_huge_header(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    data = _shard(store).read_bytes()
    _shard(store).write_bytes((2 ** 40).to_bytes(8, "little") + data[8:])
    return _evaluate_store(tiny, store), 1, ["features-00000.safetensors"]


@case
def shard_wrong_dimension(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    tensors = load_file(str(_shard(store)))
    save_file({k: v[:, :-1].contiguous() for k, v in tensors.items()}, str(_shard(store)))
    return _evaluate_store(tiny, store), 1, ["features-00000.safetensors", "expected (frames, 192)"]


@case
def manifest_invalid_json(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    (store / "manifest.json").write_text('{"format_version": 1, "backbone": ')
    return _evaluate_store(tiny, store), 1, ["manifest.json", "invalid JSON"]


@case
def manifest_not_an_object(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    (store / "manifest.json").write_text("[1, 2, 3]")
    return _evaluate_store(tiny, store), 1, ["manifest.json", "list"]


@case
def manifest_wrong_shape(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "backbone": {"name": "pixels", "dim": "192"}}))
    return _evaluate_store(tiny, store), 1, ["manifest.json", "'dim'"]


@case
def captions_bad_middle_line(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    lines = (store / "captions.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"video_id": "x", "capt\n'
    (store / "captions.jsonl").write_text("".join(lines))
    return _evaluate_store(tiny, store), 1, ["captions.jsonl line 2", "invalid JSON"]


@case
def captions_not_utf8(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    (store / "captions.jsonl").write_bytes((store / "captions.jsonl").read_bytes().replace(b"circle", b"circ\xff\xfe"))
    return _evaluate_store(tiny, store), 1, ["captions.jsonl", "UTF-8"]


@case
def caption_not_a_string(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    rows = [json.loads(line) for line in (store / "captions.jsonl").read_text().splitlines()]
    rows[3]["caption"] = 42
    (store / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _evaluate_store(tiny, store), 1, ["captions.jsonl row 4", "'caption'"]


def _wider_store(tiny: Tiny, tmp: Path) -> Path:
    """A consistent store of another feature size (as another backbone would write)."""
    store = copy(tiny.store, tmp / "store")
    tensors = load_file(str(_shard(store)))
    save_file({k: torch.cat([v, v[:, :8]], dim=1) for k, v in tensors.items()}, str(_shard(store)))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["backbone"]["dim"] += 8
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


@case
def evaluate_store_of_another_dimension(tiny: Tiny, tmp: Path) -> Case:
    return _evaluate_store(tiny, _wider_store(tiny, tmp)), 2, ["features of size [200]", "trained on [192]"]


@case
def index_store_of_another_dimension(tiny: Tiny, tmp: Path) -> Case:
    return (["index", tiny.run, "--data", _wider_store(tiny, tmp), "--out", tmp / "index"], 2,
            ["features of size [200]"])


@case
def split_with_videos_but_no_captions(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    rows = [json.loads(line) for line in (store / "captions.jsonl").read_text().splitlines()]
    (store / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] != "test"))
    return _evaluate_store(tiny, store), 2, ["split 'test'", "no captions"]


@case
def train_on_damaged_store(tiny: Tiny, tmp: Path) -> Case:
    store = copy(tiny.store, tmp / "store")
    _shard(store).write_bytes(_shard(store).read_bytes()[:-100])
    return (["train", "--recipe", tiny.run / "recipe.toml", "--out", tmp / "new", "--set", f'data.prepared="{store}"'],
            1, ["features-00000.safetensors"])


# ---------------------------------------------------------------- run folders


@case
def model_weights_truncated(tiny: Tiny, tmp: Path) -> Case:
    run = copy(tiny.run, tmp / "run")
    weights = checkpoint_of(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["evaluate", run, "--split", "test"], 1, ["model.safetensors"]


@case
def model_weights_missing(tiny: Tiny, tmp: Path) -> Case:
    run = copy(tiny.run, tmp / "run")
    (checkpoint_of(run) / "model.safetensors").unlink()
    return ["evaluate", run, "--split", "test"], 1, ["model.safetensors", "missing"]


def _resume(run: Path) -> list[str]:
    return ["train", "--resume", "--out", run, "--set", "train.max_steps=6"]


@case
def trainer_state_garbage(tiny: Tiny, tmp: Path) -> Case:
    run = copy(tiny.run, tmp / "run")
    (checkpoint_of(run) / "trainer.pt").write_bytes(os.urandom(2000))
    return _resume(run), 1, ["trainer.pt", "damaged"]


class _Payload:
    """Unpickling this runs ``touch MARKER``, unless the loader refuses code (weights_only)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@case
def trainer_state_malicious_pickle(tiny: Tiny, tmp: Path) -> Case:
    run = copy(tiny.run, tmp / "run")
    torch.save({"optimizer": _Payload(tmp / "pwned")}, checkpoint_of(run) / "trainer.pt")
    return _resume(run), 1, ["trainer.pt", "damaged"]


@case
def trainer_state_raw_pickle(tiny: Tiny, tmp: Path) -> Case:
    run = copy(tiny.run, tmp / "run")
    (checkpoint_of(run) / "trainer.pt").write_bytes(pickle.dumps(_Payload(tmp / "pwned")))
    return _resume(run), 1, ["trainer.pt"]


@case
def text_encoder_missing(tiny: Tiny, tmp: Path) -> Case:
    run = copy(tiny.run, tmp / "run")
    for p in sorted((run / "text_encoder").iterdir()):
        p.unlink()
    (run / "text_encoder").rmdir()
    return ["evaluate", run, "--split", "test"], 1, ["text_encoder"]


@case
def metrics_damaged_on_resume(tiny: Tiny, tmp: Path) -> Case:
    run = copy(tiny.run, tmp / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:10] + "\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    return _resume(run), 1, ["metrics.jsonl line 2"]


@case
def recipe_not_utf8(tiny: Tiny, tmp: Path) -> Case:
    recipe = tmp / "mine.toml"
    recipe.write_bytes((tiny.run / "recipe.toml").read_bytes().replace(b"# Resolved", b"# R\xe9solved"))
    return ["train", "--recipe", recipe, "--out", tmp / "new"], 2, ["mine.toml", "UTF-8"]


# ---------------------------------------------------------------- indexes and retrieval


def _videos_folder(tmp: Path, names: list[str]) -> Path:
    from fixtures import write_clip

    folder = tmp / "videos"
    for i, name in enumerate(names):
        write_clip(folder / name, i)
    return folder


@case
def videos_symlink_out_of_folder(tiny: Tiny, tmp: Path) -> Case:
    folder = _videos_folder(tmp, ["a.mp4"])
    outside = _videos_folder(tmp / "elsewhere", ["b.mp4"]) / "b.mp4"
    (folder / "link.mp4").symlink_to(outside)
    return ["index", tiny.run, "--videos", folder, "--out", tmp / "index"], 2, ["link.mp4", "outside"]


@case
def videos_file_name_not_utf8(tiny: Tiny, tmp: Path) -> Case:
    folder = _videos_folder(tmp, ["a.mp4"])
    os.rename(folder / "a.mp4", os.fsencode(folder) + b"/caf\xe9.mp4")
    return ["index", tiny.run, "--videos", folder, "--out", tmp / "index"], 2, ["caf\\xe9.mp4", "not UTF-8"]


@case
def index_rows_and_embeddings_disagree(tiny: Tiny, tmp: Path) -> Case:
    index = copy(tiny.index, tmp / "index")
    lines = (index / "videos.jsonl").read_text().splitlines(keepends=True)
    (index / "videos.jsonl").write_text("".join(lines[:-1]))
    return ["retrieve", "--query", "a red circle", "--index", index], 1, ["embeddings", "rows in videos.jsonl"]


@case
def index_json_missing_key(tiny: Tiny, tmp: Path) -> Case:
    index = copy(tiny.index, tmp / "index")
    meta = json.loads((index / "index.json").read_text())
    del meta["run"]
    (index / "index.json").write_text(json.dumps(meta))
    return ["retrieve", "--query", "a red circle", "--index", index], 1, ["index.json", "'run'"]


@case
def index_json_invalid(tiny: Tiny, tmp: Path) -> Case:
    index = copy(tiny.index, tmp / "index")
    (index / "index.json").write_text("{ nope")
    return ["retrieve", "--query", "a red circle", "--index", index], 1, ["index.json", "invalid JSON"]


@case
def sheet_is_a_folder(tiny: Tiny, tmp: Path) -> Case:
    return ["retrieve", "--query", "a red circle", "--index", tiny.index, "--sheet", tmp], 2, ["--sheet", "folder"]


def _empty_index(tiny: Tiny, tmp: Path) -> Path:
    """An index of no videos, of the tiny run (the CLI refuses to build one: a library caller can)."""
    from ssbctl.retrieval.index import Index

    built = Index.load(tiny.index)
    Index(built.embeddings[:0], [], built.meta).save(tmp / "empty")
    return tmp / "empty"


@case
def explain_on_empty_index(tiny: Tiny, tmp: Path) -> Case:
    return (["retrieve", "--query", "a circle", "--index", _empty_index(tiny, tmp), "--explain", tmp / "why.png"], 2,
            ["index is empty"])


@case
def faiss_on_empty_index(tiny: Tiny, tmp: Path) -> Case:
    (tmp / "none").mkdir()  # refused before any index (or faiss index) is built
    args = ["index", tiny.run, "--videos", tmp / "none", "--out", tmp / "empty", "--faiss", "ivf"]
    return args, 2, ["none", "no video files"]


@case
def queries_file_not_utf8(tiny: Tiny, tmp: Path) -> Case:
    (tmp / "q.txt").write_bytes(b"a red circle\nun caf\xe9\n")
    return ["retrieve", "--queries", tmp / "q.txt", "--index", tiny.index], 2, ["q.txt", "UTF-8"]


# ---------------------------------------------------------------- custom annotations


def _prepare_custom(tmp: Path, text: bytes) -> list[str]:
    _videos_folder(tmp, ["a.mp4"])
    (tmp / "ann.jsonl").write_bytes(text)
    return ["prepare", "custom", "--annotations", tmp / "ann.jsonl", "--out", tmp / "prepared", "--workers", "0"]


@case
def custom_row_not_an_object(tiny: Tiny, tmp: Path) -> Case:
    return _prepare_custom(tmp, b'{"video": "videos/a.mp4", "caption": "a dog"}\n["videos/a.mp4", "x"]\n'), 2, \
        ["ann.jsonl:2", "JSON object"]


@case
def custom_numeric_video(tiny: Tiny, tmp: Path) -> Case:
    return _prepare_custom(tmp, b'{"video": 5, "caption": "a dog"}\n'), 2, ["row 1", "'video'"]


@case
def custom_not_utf8(tiny: Tiny, tmp: Path) -> Case:
    return _prepare_custom(tmp, b'{"video": "videos/a.mp4", "caption": "caf\xe9"}\n'), 2, ["ann.jsonl", "UTF-8"]


@case
def custom_blank_caption(tiny: Tiny, tmp: Path) -> Case:
    return _prepare_custom(tmp, b'{"video": "videos/a.mp4", "caption": "   "}\n'), 2, ["row 1", "'caption'"]


@case
def custom_list_caption(tiny: Tiny, tmp: Path) -> Case:
    return _prepare_custom(tmp, b'{"video": "videos/a.mp4", "caption": ["a", "dog"]}\n'), 2, ["row 1", "'caption'"]


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_error_line(name: str, tiny: Tiny, tmp_path: Path) -> None:
    argv, code, expect = CASES[name](tiny, tmp_path)
    before = hashes(tiny.store, tiny.run, tiny.index)
    result = cli(argv)
    assert_one_error_line(result, code, *expect)
    assert hashes(tiny.store, tiny.run, tiny.index) == before, "a shared input was modified"
    assert not (tmp_path / "pwned").exists(), "unpickling trainer.pt ran code"


def test_failed_resume_rewrites_nothing(tiny: Tiny, tmp_path: Path) -> None:
    """A resume that fails on a damaged metrics.jsonl leaves the run folder as it was (recipe.toml
    included, though the override would change it)."""
    argv, code, _ = metrics_damaged_on_resume(tiny, tmp_path)
    run = tmp_path / "run"
    before = hashes(run)
    assert_one_error_line(cli(argv), code)
    assert hashes(run) == before


def test_markup_in_queries_and_paths_is_printed_literally(tiny: Tiny, tmp_path: Path) -> None:
    """Square brackets in a query, an indexed path, a skipped path or a run folder are text, not markup."""
    folder = _videos_folder(tmp_path, ["[/x] clip.mp4"])
    (folder / "[/bad].mp4").write_bytes(b"not a video")
    index = tmp_path / "index[/i]"
    built = cli(["index", tiny.run, "--videos", folder, "--out", index])
    assert built.code == 0, built.err
    assert "[/bad].mp4" in built.err and "[/i]" in built.out
    found = cli(["retrieve", "--query", "a [/x] circle [bold]", "--index", index])
    assert found.code == 0, found.err
    assert "[/x] circle [bold]" in found.out and "[/x] clip" in found.out
    run = copy(tiny.run, tmp_path / "run[/r]")
    evaluated = cli(["evaluate", run, "--split", "test"])
    assert evaluated.code == 0, evaluated.err
    assert f"[{checkpoint_of(run).name}]" in evaluated.out and "run[/r]" in evaluated.out


# ---------------------------------------------------------------- several processes


def _ssbctl(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssbctl", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("kind", ["launcher", "workers"])
def test_nproc_user_error_is_one_line(kind: str, tiny: Tiny, tmp_path: Path) -> None:
    """Under --nproc a user error is one line with exit code 2: found by the launcher before it
    spawns workers, or by the workers (resuming a 1-process run with 2), which report it once."""
    run = copy(tiny.run, tmp_path / "run")
    if kind == "launcher":
        proc = _ssbctl("train", "--recipe", "shapes", "--set", "train.nope=1", "--nproc", "2")
        expect = "unknown recipe key 'train.nope'"
    else:
        proc = _ssbctl("train", "--resume", "--out", run, "--set", "train.max_steps=6", "--nproc", "2")
        expect = "written by 1 processes"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
