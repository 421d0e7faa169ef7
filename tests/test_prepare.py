"""Preparation is resumable, shardable and survives any broken file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ssbctl.core.errors import DataError, UserError
from ssbctl.data.backbones import build_backbone
from ssbctl.data.datasets import read_custom
from ssbctl.data.prepare import PrepareOptions, prepare, prepare_items, work_root
from ssbctl.data.store import FeatureStore
from ssbctl.data.video import Sampling

SAMPLING = Sampling(num_frames=4)


def _store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(shapes_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted, unsharded prepare of the 24 tiny clips."""
    out = tmp_path_factory.mktemp("ref") / "store"
    items = read_custom(shapes_raw / "captions.jsonl")
    prepare("custom", items, [build_backbone("pixels", size=8)], [out], PrepareOptions(SAMPLING, workers=0))
    return out


def test_two_shards_merged_equal_one_unsharded_run(shapes_raw: Path, reference: Path, tmp_path: Path) -> None:
    items = read_custom(shapes_raw / "captions.jsonl")
    out = tmp_path / "store"
    first = prepare("custom", items, [build_backbone("pixels", size=8)], [out],
                    PrepareOptions(SAMPLING, shard=1, num_shards=2, workers=0))
    assert not first["merged"] and not out.exists() and first["videos"] == 12
    second = prepare("custom", items, [build_backbone("pixels", size=8)], [out],
                     PrepareOptions(SAMPLING, shard=0, num_shards=2, workers=0))
    assert second["merged"] and not work_root(out).exists()
    assert _store_bytes(out) == _store_bytes(reference)


def test_killed_prepare_resumes_to_the_same_store(shapes_raw: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "ssbctl", "prepare", "custom", "--annotations", str(shapes_raw / "captions.jsonl"),
           "--out", str(out), "--pixel-size", "8", "--frames", "4", "--sampling", "uniform", "--workers", "1",
           "--chunk-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = work_root(out) / "shard-0-of-1" / "progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists(), "killed before the end"
    done_before = len(progress.read_text().splitlines())
    assert 1 <= done_before < 24
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _store_bytes(out) == _store_bytes(reference)


# Runs the prepare CLI but dies by SIGKILL in the middle of the merge, as a killed process would:
# after the 5th video is written into the new store, before the store is committed.
KILL_MID_MERGE = """
import os, signal, sys
from ssbctl.cli.app import main
from ssbctl.data import store
real_add, written = store.StoreWriter.add, []
def add(self, *args, **kwargs):
    real_add(self, *args, **kwargs)
    written.append(1)
    if len(written) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
store.StoreWriter.add = add
sys.exit(main(sys.argv[1:]))
"""


def _prepare_cmd(shapes_raw: Path, out: Path) -> list[str]:
    return ["prepare", "custom", "--annotations", str(shapes_raw / "captions.jsonl"), "--out", str(out),
            "--pixel-size", "8", "--frames", "4", "--sampling", "uniform", "--workers", "0"]


def test_merge_killed_midway_is_redone_by_the_next_prepare(shapes_raw: Path, reference: Path, tmp_path: Path) -> None:
    """The killed merger's lock names a process that is gone: a rerun takes it over and merges."""
    out = tmp_path / "store"
    killed = subprocess.run([sys.executable, "-c", KILL_MID_MERGE, *_prepare_cmd(shapes_raw, out)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lock = work_root(out) / "merge.lock"
    assert lock.exists() and not out.exists(), "killed during the merge, lock left behind"
    rerun = subprocess.run([sys.executable, "-m", "ssbctl", *_prepare_cmd(shapes_raw, out)],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "prepared custom" in rerun.stdout
    assert _store_bytes(out) == _store_bytes(reference)
    assert not work_root(out).exists() and not (out.parent / ".store.writing").exists()


def _finish_shards_but_hold_lock(shapes_raw: Path, out: Path, holder: dict) -> list:
    """Prepare shard 1/2, then leave ``holder``'s lock before shard 0/2 finishes and would merge."""
    items = read_custom(shapes_raw / "captions.jsonl")
    prepare("custom", items, [build_backbone("pixels", size=8)], [out],
            PrepareOptions(SAMPLING, shard=1, num_shards=2, workers=0))
    (work_root(out) / "merge.lock").write_text(json.dumps(holder))
    return items


def test_merge_lock_of_a_live_or_remote_process_is_respected(shapes_raw: Path, tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        for holder in ({"pid": live.pid, "host": socket.gethostname()},
                       {"pid": 1 << 30, "host": socket.gethostname() + "-other"}):  # not checkable from here
            out = tmp_path / f"store-{holder['host']}"
            items = _finish_shards_but_hold_lock(shapes_raw, out, holder)
            summary = prepare("custom", items, [build_backbone("pixels", size=8)], [out],
                              PrepareOptions(SAMPLING, shard=0, num_shards=2, workers=0))
            assert not summary["merged"] and not out.exists()
            assert summary["merging_elsewhere"]["pid"] == holder["pid"]
            assert json.loads((work_root(out) / "merge.lock").read_text()) == holder
            with pytest.raises(UserError, match=f"process {holder['pid']} on .* is merging"):
                prepare_items(items, out, "custom", build_backbone("pixels", size=8), SAMPLING)
    finally:
        live.kill()
        live.wait()


def test_merge_lock_of_a_dead_or_reused_pid_is_taken_over(shapes_raw: Path, reference: Path,
                                                          tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reused = {"pid": os.getpid(), "host": socket.gethostname(), "started": "0"}  # our pid, another process's start
    for name, holder in (("dead", {"pid": dead.pid, "host": socket.gethostname()}), ("reused", reused)):
        out = tmp_path / name / "store"
        items = _finish_shards_but_hold_lock(shapes_raw, out, holder)
        summary = prepare("custom", items, [build_backbone("pixels", size=8)], [out],
                          PrepareOptions(SAMPLING, shard=0, num_shards=2, workers=0))
        assert summary["merged"], name
        assert _store_bytes(out) == _store_bytes(reference)
        assert not work_root(out).exists() and not list(out.parent.glob(".store*"))


def test_prepare_with_other_settings_refuses_unfinished_work(shapes_raw: Path, tmp_path: Path) -> None:

    items = read_custom(shapes_raw / "captions.jsonl")
    out = tmp_path / "store"
    prepare("custom", items, [build_backbone("pixels", size=8)], [out],
            PrepareOptions(SAMPLING, shard=0, num_shards=2, workers=0))
    with pytest.raises(UserError, match="other settings"):
        prepare("custom", items, [build_backbone("pixels", size=4)], [out],
                PrepareOptions(SAMPLING, shard=1, num_shards=2, workers=0))


def _variants(data: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    out = {"empty": b"", "random": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
           "header_only": data[:32], "zeros": bytes(len(data))}
    for frac in (0.05, 0.2, 0.5, 0.8, 0.95):
        out[f"truncated_{int(frac * 100)}"] = data[: int(len(data) * frac)]
    for i in range(12):
        flipped = bytearray(data)
        for pos in rng.integers(0, len(data), 1 + i * 4):
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
        out[f"bitflip_{i}"] = bytes(flipped)
    for i in range(6):
        zeroed = bytearray(data)
        start = int(rng.integers(0, len(data) - 256))
        zeroed[start:start + int(rng.integers(16, 256))] = bytes(256)[: len(zeroed[start:start + 256])]
        out[f"zeroblock_{i}"] = bytes(zeroed)
    for i in range(3):
        shuffled = bytearray(data)
        a = int(rng.integers(0, len(data) // 2))
        shuffled[a:a + 512] = rng.permutation(np.frombuffer(bytes(shuffled[a:a + 512]), np.uint8)).tobytes()
        out[f"shuffled_{i}"] = bytes(shuffled)
    return out


def test_fuzzed_videos_never_crash_prepare_and_each_is_recorded(shapes_raw: Path, tmp_path: Path) -> None:
    good = read_custom(shapes_raw / "captions.jsonl")[0].path.read_bytes()
    variants = _variants(good, np.random.default_rng(1234))
    assert len(variants) >= 30
    folder = tmp_path / "clips"
    folder.mkdir()
    rows = []
    for name, data in variants.items():
        (folder / f"{name}.mp4").write_bytes(data)
        rows.append(f'{{"video": "clips/{name}.mp4", "caption": "a fuzzed clip", "split": "test"}}')
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "store"
    summary = prepare("custom", read_custom(tmp_path / "captions.jsonl"), [build_backbone("pixels", size=4)], [out],
                      PrepareOptions(Sampling(num_frames=3), workers=2, timeout=60))
    assert summary["merged"]
    store = FeatureStore(out)
    failures = {f["video_id"]: f["reason"] for f in summary["manifests"][0]["failed"]}
    kept = {v["video_id"] for v in store.videos}
    assert kept | set(failures) == set(variants) and not kept & set(failures)
    for name in ("empty", "random", "header_only", "zeros", "truncated_5"):
        assert name in failures, name
    assert failures["empty"] == "empty file"
    assert all(reason for reason in failures.values())


def test_max_failures_stops_the_run_and_keeps_progress(shapes_raw: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.mp4").write_bytes(b"junk" * 10)
    (tmp_path / "c.jsonl").write_text("".join(f'{{"video": "clips/bad{i}.mp4", "caption": "x"}}\n' for i in range(3)))
    items = read_custom(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="--max-failures 1"):
        prepare("custom", items, [build_backbone("pixels", size=4)], [tmp_path / "out"],
                PrepareOptions(SAMPLING, workers=0, max_failures=1))
    progress = work_root(tmp_path / "out") / "shard-0-of-1" / "progress.jsonl"
    assert len(progress.read_text().splitlines()) == 2


def test_decoder_crash_or_hang_costs_one_video(tmp_path: Path, shapes_raw: Path) -> None:
    """A worker that dies (as a decoder can on a hostile file) or hangs is replaced; the video is
    tried once more with PyAV alone, then recorded."""
    from ssbctl.data.decode_pool import DecodePool

    import fixtures

    good = read_custom(shapes_raw / "captions.jsonl")[0].path
    pool = DecodePool(Sampling(num_frames=2), workers=2, timeout=3, work=fixtures.misbehaving_decode)
    jobs = [(0, good), (1, tmp_path / "crash.mp4"), (2, good), (3, tmp_path / "hang.mp4"), (4, good)]
    results = {k: (f is not None, r) for k, f, r in pool.map(jobs)}
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert results[0] == results[2] == results[4] == (True, None)
    assert results[1] == (False, "decoder crashed (exit code 139); retried with pyav: decoder crashed (exit code 139)")
    assert results[3] == (False, "decode timed out after 3 s; retried with pyav: decode timed out after 3 s")


def test_merge_keeps_few_chunk_files_open(shapes_raw: Path, reference: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk file read stayed memory-mapped until the merge ended, so its peak memory grew
    with the dataset's features (issue 15); now a few are open at a time, with the same store."""
    import ssbctl.data.prepare as prep

    live: list[int] = [0, 0]  # open now, most at once

    class CountedChunk:
        """The real safetensors handle, counted while it is referenced."""

        def __init__(self, path: str, framework: str) -> None:
            self.handle = real_open(path, framework=framework)
            live[0] += 1
            live[1] = max(live)

        def get_tensor(self, name: str):
            return self.handle.get_tensor(name)

        def __del__(self) -> None:
            live[0] -= 1

    real_open = prep.safe_open
    monkeypatch.setattr(prep, "safe_open", CountedChunk)
    items = read_custom(shapes_raw / "captions.jsonl")
    out = tmp_path / "store"
    prepare("custom", items, [build_backbone("pixels", size=8)], [out], PrepareOptions(SAMPLING, workers=0,
                                                                                      chunk_size=1))
    assert 1 <= live[1] <= 4  # 24 chunk files of one video each
    assert _store_bytes(out) == _store_bytes(reference)


def test_backbone_runs_on_the_cpus_the_decoders_leave(shapes_raw: Path, tmp_path: Path) -> None:
    """With decoding workers, torch in the main process gets the other CPUs (at least one): both on
    every core made the backbone 3-8x slower. Its thread count is restored afterwards."""
    import torch

    from ssbctl.data.backbones import PixelsBackbone

    seen: list[int] = []

    class Recording(PixelsBackbone):
        def encode(self, frames: np.ndarray) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return super().encode(frames)

    items = read_custom(shapes_raw / "captions.jsonl")[:3]
    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    prepare("custom", items, [Recording(4)], [tmp_path / "two"], PrepareOptions(SAMPLING, workers=2))
    assert seen == [max(1, min(before, cpus - 2))] * 3 and torch.get_num_threads() == before
    seen.clear()
    prepare("custom", items, [Recording(4)], [tmp_path / "none"], PrepareOptions(SAMPLING, workers=0))
    assert seen == [before] * 3 and torch.get_num_threads() == before
