"""Findings of an adversarial review of issues 9 and 17 (data loss, escape, hangs, tracebacks).

Each test reproduces one finding through the real CLI (``ssbctl.cli.app.main`` in-process, or
``python -m ssbctl`` in a subprocess where the working directory, a signal or torchrun matter) and
asserts the behaviour the project promises, so each fails on the code it was written against.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from damage import Tiny, assert_one_error_line, build_tiny, cli, copy, hashes

PREP = ["--pixel-size", "8", "--frames", "4", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shapes_store: Path, tiny_text_model: Path) -> Tiny:
    return build_tiny(tmp_path_factory, shapes_store, tiny_text_model)


def _prepare(annotations: Path, out: str | Path) -> list[str]:
    return ["prepare", "custom", "--annotations", str(annotations), "--out", str(out), *PREP]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- --out: relative, symlinked, unwritable


def test_out_dot_in_an_empty_folder_prepares_there(shapes_raw: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: `--out .` (the current, empty folder) decodes everything, then fails with exit 2
    "not empty" because ssbctl's own scratch folder `..partial` was created INSIDE the output
    (Path('.').parent is '.', name ''), and leaves that scratch folder in the user's folder."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = cli(_prepare(shapes_raw / "captions.jsonl", "."), timeout=300)
    assert result.code == 0, result.err
    assert (here / "manifest.json").is_file()
    assert not [p.name for p in here.iterdir() if p.name.startswith("..")], list(here.iterdir())


def test_out_dot_over_an_earlier_index_replaces_it(tiny: Tiny, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: `cd INDEX && ssbctl index RUN --out .` (re-index in place) ends in
    `error: internal error: OSError: [Errno 16] Device or resource busy: '.' -> '..old'`, exit 1,
    leaving `..tmp` inside the index."""
    index = copy(tiny.index, tmp_path / "idx")
    monkeypatch.chdir(index)
    result = cli(["index", tiny.run, "--out", ".", "--split", "test"], timeout=300)
    assert result.code == 0, result.err
    assert (index / "index.json").is_file()
    assert not [p.name for p in index.iterdir() if p.name.startswith("..")], list(index.iterdir())


def test_out_through_a_symlink_works_twice(shapes_raw: Path, tmp_path: Path) -> None:
    """Finding: `--out LINK` (a symlink to a folder): the first prepare renames the link to
    `.LINK.old`, which replace_dir's `rmtree(ignore_errors=True)` cannot remove (a symlink), so
    every later prepare into LINK is `internal error: NotADirectoryError: 'link' -> '.link.old'`."""
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    for attempt in range(2):
        result = cli(_prepare(shapes_raw / "captions.jsonl", link), timeout=300)
        assert result.code == 0, f"attempt {attempt}: {result.err}"
    assert not os.path.lexists(tmp_path / ".link.old")


def test_an_unwritable_out_is_one_user_error_line(shapes_raw: Path, tiny: Tiny, tmp_path: Path) -> None:
    """Finding: an --out that cannot be created (its parent is a file; a read-only or pseudo file
    system) is `error: internal error: FileExistsError/PermissionError ...` exit 1 from the output
    lock (io._acquire: mkdir / os.open), for prepare, index, train and demo; --sheet/--explain
    into such a place likewise."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert_one_error_line(cli(_prepare(shapes_raw / "captions.jsonl", a_file / "out")), 2, "notes.txt")
    assert_one_error_line(cli(["index", tiny.run, "--out", a_file / "idx", "--split", "test"]), 2, "notes.txt")
    assert_one_error_line(cli(["retrieve", "--index", tiny.index, "--query", "a red circle",
                               "--sheet", "/proc/ssbctl-review-sheet.png"]), 2, "ssbctl-review-sheet.png")
    assert a_file.read_text() == "mine\n"


# ---------------------------------------------------------------- data loss


def test_replacing_a_store_keeps_what_ssbctl_did_not_write(shapes_raw: Path, tiny: Tiny, tmp_path: Path) -> None:
    """Finding: replacing an earlier store (`prepare ... --out S` again) deletes everything else in
    S: the user's notes and an index the user built with `ssbctl index RUN --out S/my-index`.
    Either refuse (exit 2, naming the foreign entry) or carry them over; never delete them."""
    store = tmp_path / "S"
    assert cli(_prepare(shapes_raw / "captions.jsonl", store), timeout=300).code == 0
    (store / "NOTES.md").write_text("where these clips came from\n")
    assert cli(["index", tiny.run, "--data", store, "--out", store / "my-index"], timeout=300).code == 0
    kept = hashes(store / "my-index")
    cli(_prepare(shapes_raw / "captions.jsonl", store), timeout=300)
    assert (store / "NOTES.md").read_text() == "where these clips came from\n"
    assert hashes(store / "my-index") == kept


def test_sheet_does_not_overwrite_a_file_that_is_not_a_png(tiny: Tiny, tmp_path: Path) -> None:
    """Finding: `retrieve --sheet captions.jsonl` (a slip of tab completion) silently replaces the
    user's file with a PNG (exit 0); --explain the same. An existing file that is not a PNG must
    be refused (exit 2), unchanged."""
    mine = tmp_path / "captions.jsonl"
    mine.write_text('{"video": "a.mp4", "caption": "mine"}\n')
    for flag in ("--sheet", "--explain"):
        result = cli(["retrieve", "--index", tiny.index, "--query", "a red circle", flag, mine], timeout=300)
        assert_one_error_line(result, 2, "captions.jsonl")
        assert mine.read_text() == '{"video": "a.mp4", "caption": "mine"}\n'


# ---------------------------------------------------------------- locks


def test_sigterm_inside_a_finalizer_still_stops_the_command(capfd: pytest.CaptureFixture[str]) -> None:
    """Finding (a loaded CI run): SIGTERM arrived while decord's ``VideoReader.__del__`` ran; Python
    printed the handler's exception as "Exception ignored" and dropped it, and `prepare` went on to
    the end. Raised in a finalizer, the stop is delivered again right after it instead."""
    from ssbctl.cli.app import Terminated, _sigterm_unwinds

    class Finalized:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, inside the finalizer

    reached = False
    with pytest.raises(Terminated), _sigterm_unwinds(["prepare"]):
        obj = Finalized()
        del obj
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
        reached = True
    assert not reached and "Exception ignored" not in capfd.readouterr().err


def test_sigterm_to_prepare_releases_its_lock(tmp_path: Path) -> None:
    """Finding: SIGTERM (`kill PID`, a scheduler's stop) to `prepare` kills it by the default action
    (exit -15, no message): `.NAME.lock` stays beside the output, in the user's folder. Only train
    handles SIGTERM; every locking command must unwind (release the lock) on it."""
    out = tmp_path / "store"
    lock = tmp_path / ".store.lock"
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "prepare", "shapes", "--num-videos", "400",
                             "--root", str(tmp_path / "raw"), "--out", str(out), *PREP],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock.exists(), "prepare never took its lock"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not lock.exists(), f"exit {proc.returncode}, lock left behind; stderr:\n{err}"
    assert "Traceback" not in err
    assert proc.returncode == 143 and "terminated" in err, f"exit {proc.returncode}; stderr:\n{err}"


# ---------------------------------------------------------------- bad input, silent results


def test_empty_annotations_file_is_a_user_error_naming_it(tmp_path: Path) -> None:
    """Finding: custom annotations with no rows (0-byte file, blank lines, a CSV header alone) exit 1
    with `error: .out.partial/shard-0-of-1/progress.jsonl is missing` (an internal scratch file)
    and leave `.out.partial` behind. It is the user's input: exit 2 naming the file."""
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "video,caption\n")):
        annotations = tmp_path / name
        annotations.write_text(text)
        out = tmp_path / f"out-{name}"
        assert_one_error_line(cli(_prepare(annotations, out)), 2, name)
        assert not (tmp_path / f".{out.name}.partial").exists()


def test_index_of_a_folder_without_videos_is_refused(tiny: Tiny, tmp_path: Path) -> None:
    """Finding: `index RUN --videos EMPTY_DIR` builds an empty index and exits 0 (then `retrieve`
    prints nothing, exit 0): the same silent result issue 17 fixed for `index --split nope`."""
    empty = tmp_path / "videos"
    empty.mkdir()
    out = tmp_path / "idx"
    assert_one_error_line(cli(["index", tiny.run, "--videos", empty, "--out", out], timeout=300), 2, "videos")
    assert not out.exists()


def test_index_with_both_data_and_videos_is_refused(tiny: Tiny, shapes_raw: Path, tmp_path: Path) -> None:
    """Finding: `index RUN --data STORE --videos DIR` silently ignores --data (indexes DIR only)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(next(shapes_raw.rglob("*.mp4")), videos / "a.mp4")
    result = cli(["index", tiny.run, "--data", tiny.store, "--videos", videos, "--out", tmp_path / "idx"],
                 timeout=300)
    assert_one_error_line(result, 2, "--data", "--videos")


def test_nproc_below_one_is_a_user_error(tiny: Tiny, tmp_path: Path) -> None:
    """Finding: `train --nproc 0` / `--nproc -1` are accepted and train in one process (exit 0)."""
    sets = tiny_overrides(tiny.store, tiny.text_model, tmp_path / "run", **{"train.max_steps": 1,
                                                                           "data.eval_split": ""})
    argv = ["train", "--recipe", "shapes", "--out", tmp_path / "run", "--nproc", "-1"]
    for item in sets:
        argv += ["--set", item]
    assert_one_error_line(cli(argv, timeout=300), 2, "--nproc")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nproc_worker_error_is_exactly_one_stderr_line(tiny: Tiny, tmp_path: Path) -> None:
    """Finding: `train --nproc 2` on a store whose features file is damaged exits 1 with the right
    error line, but stderr also carries torchrun's 4-line OMP_NUM_THREADS banner (the launcher's
    logging.getLogger("torch.distributed").setLevel does not reach torch.distributed.run's own
    logger). Issue 17: 'Under --nproc ... one line'."""
    store = copy(tiny.store, tmp_path / "store")
    features = sorted(store.glob("features-*.safetensors"))[0]
    with open(features, "r+b") as fh:
        fh.truncate(features.stat().st_size // 2)
    sets = tiny_overrides(store, tiny.text_model, tmp_path / "run", **{"train.max_steps": 2,
                                                                      "data.eval_split": ""})
    argv = [sys.executable, "-m", "ssbctl", "train", "--recipe", "shapes", "--out", str(tmp_path / "run"),
            "--nproc", "2"]
    for item in sets:
        argv += ["--set", item]
    env = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and features.name in lines[0], proc.stderr


def test_a_fifo_named_like_the_kind_mark_does_not_hang(shapes_raw: Path, tmp_path: Path) -> None:
    """Finding: io.folder_kind reads `.ssbctl-kind` with read_text() whatever it is: a FIFO (or a
    link to /dev/zero) of that name in the --out folder blocks prepare forever (timeout, no
    message). Only a small regular file may count as the mark."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine\n")
    os.mkfifo(out / ".ssbctl-kind")
    assert_one_error_line(cli(_prepare(shapes_raw / "captions.jsonl", out), timeout=60), 2, "out")
    assert (out / "mine.txt").read_text() == "mine\n"


# ---------------------------------------------------------------- found while fixing the above


def test_tensor_files_have_the_mode_of_every_other_file(tiny: Tiny) -> None:
    """safetensors writes its files 0600: a store's features and an index's embeddings were
    unreadable to colleagues sharing the machine, while every other file is 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    usual = 0o666 & ~umask
    for folder, pattern in ((tiny.store, "features-*.safetensors"), (tiny.index, "embeddings.safetensors")):
        files = sorted(folder.glob(pattern))
        assert files, f"no {pattern} in {folder}"
        for path in files:
            assert path.stat().st_mode & 0o777 == usual, f"{path}: {oct(path.stat().st_mode & 0o777)}"


def test_what_ssbctl_wrote_into_an_index_or_store_is_replaced(tmp_path: Path) -> None:
    """The other side of finding 1: what ssbctl itself writes into an index or a store (older
    versions' files, a faiss index, failures.jsonl, thumbnails, atomic-write scratch) never blocks
    replacing it; one foreign entry does, named; runs are written into, not replaced, so their
    folder is not checked entry by entry."""
    from ssbctl.core.errors import UserError
    from ssbctl.core.io import check_output, mark_kind

    index = tmp_path / "index"
    (index / "thumbs").mkdir(parents=True)
    for name in ("index.json", "embeddings.safetensors", "videos.jsonl", "failures.jsonl", "faiss.index",
                 ".index.json.x1y2.tmp"):
        (index / name).write_text("{}")
    mark_kind(index, "index")
    check_output(index, "index")
    store = tmp_path / "store"
    store.mkdir()
    for name in ("manifest.json", "videos.jsonl", "captions.jsonl", "failures.jsonl", "features-00000.safetensors",
                 "features-00001.safetensors", ".my-index.lock"):
        (store / name).write_text("{}")
    mark_kind(store, "store")
    check_output(store, "store")
    (store / "thumbs").mkdir()  # an index's entry is not a store's
    with pytest.raises(UserError, match="thumbs"):
        check_output(store, "store")
    run = tmp_path / "run"
    run.mkdir()
    (run / "my-notes.txt").write_text("mine\n")
    mark_kind(run, "run")
    check_output(run, "run")
