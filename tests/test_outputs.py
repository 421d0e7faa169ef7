"""``--out`` never loses data: only an earlier output of the same kind is replaced, one command
writes an output at a time (a lock with stale-holder takeover), and --max-failures holds on reruns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssbctl.cli.app import main
from ssbctl.core import io as ssbctl_io

from conftest import tiny_overrides
from fixtures import write_recipe as _write_recipe

PREP = ["--pixel-size", "8", "--frames", "4", "--workers", "0"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The one ``error:`` line on stderr (after any progress bars), which names each of ``needles``."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


@pytest.fixture
def my_clips(shapes_raw: Path, tmp_path: Path) -> Path:
    """A user's folder: four clips and the captions file that lists them."""
    folder = tmp_path / "my"
    (folder / "videos").mkdir(parents=True)
    rows = [json.loads(line) for line in (shapes_raw / "captions.jsonl").read_text().splitlines()]
    clips = sorted({r["video"] for r in rows})[:4]
    rows = [r for r in rows if r["video"] in clips]
    for clip in clips:
        shutil.copy(shapes_raw / clip, folder / clip)
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ---------------------------------------------------------------- prepare --out

def test_prepare_into_the_folder_of_its_own_annotations_changes_nothing(my_clips: Path, capsys) -> None:
    before = _snapshot(my_clips)
    code = main(["prepare", "custom", "--annotations", str(my_clips / "captions.jsonl"), "--out", str(my_clips), *PREP])
    assert code == 2
    _one_line_error(capsys, str(my_clips))
    assert _snapshot(my_clips) == before
    assert sorted(p.name for p in my_clips.parent.iterdir()) == ["my"]  # no work or lock left beside it


def test_prepare_refuses_other_content_a_file_and_an_index(my_clips: Path, tmp_path: Path, capsys) -> None:
    annotations = tmp_path / "captions.jsonl"
    shutil.copy(my_clips / "captions.jsonl", annotations)
    text = tmp_path / "notes.txt"
    text.write_text("mine\n")
    index = tmp_path / "index"
    index.mkdir()
    (index / "index.json").write_text(json.dumps({"format_version": 1, "count": 0, "dim": 4}))
    for target, needle in ((my_clips, "is not empty"), (text, "not a folder"), (index, "holds an index")):
        before = _snapshot(tmp_path)
        assert main(["prepare", "custom", "--annotations", str(annotations), "--out", str(target), *PREP]) == 2
        _one_line_error(capsys, str(target), needle)
        assert _snapshot(tmp_path) == before


def test_prepare_uses_an_empty_folder_and_replaces_only_its_own_store(my_clips: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "store"
    out.mkdir()

    def prepare(target: Path) -> int:
        return main(["prepare", "custom", "--annotations", str(my_clips / "captions.jsonl"), "--out", str(target),
                     *PREP])

    assert prepare(out) == 0
    first = _snapshot(out)
    assert "manifest.json" in first
    assert prepare(out) == 0  # an earlier store is replaced by the new one
    assert _snapshot(out) == first
    legacy = tmp_path / "legacy"  # a store written before stores were marked is still recognised
    shutil.copytree(out, legacy)
    (legacy / ".ssbctl-kind").unlink()
    assert prepare(legacy) == 0 and _snapshot(legacy) == first


# ---------------------------------------------------------------- index --out

def test_index_into_the_video_folder_or_the_run_changes_nothing(tiny_run: Path, my_clips: Path, capsys) -> None:
    videos = my_clips / "videos"
    for target in (videos, tiny_run, my_clips):
        run_before, clips_before = _snapshot(tiny_run), _snapshot(my_clips)
        assert main(["index", str(tiny_run), "--videos", str(videos), "--out", str(target), "--workers", "0"]) == 2
        _one_line_error(capsys, str(target))
        assert _snapshot(tiny_run) == run_before and _snapshot(my_clips) == clips_before
    assert main(["index", str(tiny_run), "--out", str(tiny_run)]) == 2  # the prepared-data form too
    _one_line_error(capsys, str(tiny_run))
    assert (tiny_run / "checkpoints" / "latest").is_file()


def test_index_inside_the_video_folder_keeps_every_video(tiny_run: Path, my_clips: Path, capsys) -> None:
    videos = my_clips / "videos"
    (videos / "sub").mkdir()
    shutil.copy(next(videos.glob("*.mp4")), videos / "sub" / "extra.mp4")
    clips_before = _snapshot(videos)
    args = ["index", str(tiny_run), "--videos", str(videos), "--workers", "0", "--json"]
    assert main([*args, "--out", str(videos / "sub")]) == 2  # a subfolder holding videos
    _one_line_error(capsys, str(videos / "sub"))
    for _ in range(2):  # built, then updated in place
        assert main([*args, "--out", str(videos / "idx")]) == 0
        assert json.loads(capsys.readouterr().out)["videos"] == 5
    assert {k: v for k, v in _snapshot(videos).items() if not k.startswith("idx")} == clips_before


# ---------------------------------------------------------------- train and demo --out

def test_train_into_a_folder_of_other_content_or_a_store_changes_nothing(shapes_store: Path, tiny_text_model: Path,
                                                                         tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    recipe = _write_recipe(mine / "recipe.toml", tiny_overrides(shapes_store, tiny_text_model, mine,
                                                                **{"train.max_steps": 1}))
    (mine / "notes.txt").write_text("keep me\n")
    for target in (mine, shapes_store):
        before = _snapshot(target)
        assert main(["train", "--recipe", str(recipe), "--out", str(target)]) == 2
        _one_line_error(capsys, str(target))
        assert _snapshot(target) == before


def test_demo_into_a_folder_of_other_content_changes_nothing(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "thesis.txt").write_text("years of work\n")
    assert main(["demo", "--out", str(mine), "--num-videos", "12", "--set", "train.max_steps=1"]) == 2
    _one_line_error(capsys, str(mine))
    assert _snapshot(mine) == {"run/thesis.txt": b"years of work\n"}


# ---------------------------------------------------------------- one writer per output

_HOLDER = """
import sys
from pathlib import Path
from ssbctl.core.io import output_lock
with output_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _hold(target: Path, tag: str = "") -> subprocess.Popen:
    """Another process holding the lock of ``target`` until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target), tag], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def _release(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_second_writer_of_an_output_is_refused_naming_the_holder(my_clips: Path, tiny_run: Path, shapes_store: Path,
                                                                 tiny_text_model: Path, tmp_path: Path, capsys) -> None:
    store, index, run = tmp_path / "store", tmp_path / "index", tmp_path / "run"
    prep = ["prepare", "custom", "--annotations", str(my_clips / "captions.jsonl"), *PREP]
    recipe = _write_recipe(tmp_path / "tiny.toml", tiny_overrides(shapes_store, tiny_text_model, run))
    for target, argv in ((store, [*prep, "--out", str(store)]), (index, ["index", str(tiny_run), "--out", str(index)]),
                         (run, ["train", "--recipe", str(recipe), "--out", str(run)]),
                         (run, ["train", "--recipe", str(recipe), "--out", str(run), "--nproc", "2"])):
        holder = _hold(target)
        try:
            assert main(argv) == 2
            _one_line_error(capsys, str(target), "in use", f"pid {holder.pid} on {socket.gethostname()}")
            assert not target.exists()
        finally:
            _release(holder)
    assert main([*prep, "--out", str(store)]) == 0  # released: the next one runs
    assert not ssbctl_io.lock_path(store).exists()


def test_shards_of_one_output_run_side_by_side(my_clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    prep = ["prepare", "custom", "--annotations", str(my_clips / "captions.jsonl"), "--out", str(out), *PREP]
    holder = _hold(out, "shard-0-of-2")
    try:
        assert main([*prep, "--shard", "1/2"]) == 0
        assert main([*prep, "--shard", "0/2"]) == 2
    finally:
        _release(holder)
    assert main([*prep, "--shard", "0/2"]) == 0 and (out / "manifest.json").is_file()


def test_lock_of_a_killed_holder_is_taken_over(my_clips: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    holder = _hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    stale = json.loads(ssbctl_io.lock_path(out).read_text())
    assert stale["pid"] == holder.pid and stale["host"] == socket.gethostname()
    proc = subprocess.run([sys.executable, "-m", "ssbctl", "prepare", "custom", "--annotations",
                           str(my_clips / "captions.jsonl"), "--out", str(out), *PREP],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").is_file() and not ssbctl_io.lock_path(out).exists()


def test_lock_file_naming_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    from ssbctl.core.io import output_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "out"
    ssbctl_io.lock_path(target).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    with output_lock(target) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path: Path) -> None:
    from ssbctl.core.errors import UserError
    from ssbctl.core.io import output_lock

    target = tmp_path / "out"
    ssbctl_io.lock_path(target).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": 0}))
    with pytest.raises(UserError, match="elsewhere.example"):
        with output_lock(target):
            pass
    assert ssbctl_io.lock_path(target).exists()


def test_train_holds_the_run_lock_until_its_sigterm_checkpoint(shapes_store: Path, tiny_text_model: Path,
                                                              tmp_path: Path) -> None:
    """Two real ``ssbctl train`` into one run: the second exits 2 naming the first, which still
    ends with its own checkpoints when stopped by SIGTERM, and releases the lock."""
    run = tmp_path / "run"
    recipe = _write_recipe(tmp_path / "tiny.toml", tiny_overrides(shapes_store, tiny_text_model, run,
                                                                  **{"train.epochs": 500, "data.eval_split": ""}))
    first = subprocess.Popen([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe), "--out", str(run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        second = subprocess.run([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe), "--out", str(run)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=240) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not ssbctl_io.lock_path(run).exists()
    assert (run / "checkpoints" / "latest").is_file()
    assert main(["train", "--resume", "--out", str(run), "--set", "train.max_steps=1"]) == 0


# ---------------------------------------------------------------- --max-failures on reruns

def test_max_failures_holds_on_every_rerun(my_clips: Path, tmp_path: Path, capsys) -> None:
    rows = [json.loads(line) for line in (my_clips / "captions.jsonl").read_text().splitlines()]
    for i in range(3):
        (my_clips / "videos" / f"bad{i}.mp4").write_bytes(b"junk" * 10)
    bad = [{"video": f"videos/bad{i}.mp4", "caption": "x", "split": "train"} for i in range(3)]
    (my_clips / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad + rows))
    args = ["prepare", "custom", "--annotations", str(my_clips / "mixed.jsonl"), "--out", str(tmp_path / "out"), *PREP]
    for _ in range(3):
        assert main([*args, "--max-failures", "1"]) == 1
        _one_line_error(capsys, "--max-failures 1")
        assert not (tmp_path / "out").exists()
    assert main([*args, "--max-failures", "3", "--json"]) == 0  # a looser limit goes on from the saved work
    manifest = json.loads(capsys.readouterr().out)["manifests"][0]
    assert manifest["counts"]["failures"] == 3 and manifest["counts"]["videos"] == 4
