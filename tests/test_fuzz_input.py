"""Seeded fuzzing of the files ssbctl reads back: a prepared store, a run and an index are damaged
(truncated, bytes flipped, a JSON key dropped) and fed to ``train``, ``evaluate``, ``index`` and
``retrieve``. Whatever the damage, a command succeeds or fails with one ``error:`` line from the
reader (never a traceback, never the last-resort handler), finishes in bounded time, and leaves
its input files as they were when it fails (a successful ``train --resume`` may extend its run).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from damage import MUTATIONS, Tiny, assert_one_error_line, build_tiny, checkpoint_of, cli, copy, hashes, index_for_run

SEED = 1234
CASES_PER_TARGET = 8  # x 3 targets; about 20 s on two busy cores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shapes_store: Path, tiny_text_model: Path) -> Tiny:
    return build_tiny(tmp_path_factory, shapes_store, tiny_text_model)


def _files(folder: Path, names: list[str]) -> list[Path]:
    return [folder / n for n in names]


def _store_case(tiny: Tiny, tmp: Path, rng: random.Random) -> tuple[Path, list[Path], list[list[object]]]:
    store = copy(tiny.store, tmp / "store")
    targets = _files(store, ["manifest.json", "videos.jsonl", "captions.jsonl", "features-00000.safetensors"])
    commands = [["evaluate", tiny.run, "--data", store, "--split", "test"],
                ["index", tiny.run, "--data", store, "--split", "test", "--out", tmp / "new-index"],
                ["train", "--recipe", tiny.run / "recipe.toml", "--out", tmp / "new-run",
                 "--set", f'data.prepared="{store}"', "--set", "train.max_steps=2"]]
    return store, targets, [rng.choice(commands)]


def _run_case(tiny: Tiny, tmp: Path, rng: random.Random) -> tuple[Path, list[Path], list[list[object]]]:
    run = copy(tiny.run, tmp / "run")
    ckpt = checkpoint_of(run)
    targets = [run / "recipe.toml", run / "experts.json", run / "metrics.jsonl", run / "text_encoder" / "config.json",
               ckpt / "model.safetensors", ckpt / "trainer.pt", ckpt / "state.json"]
    index = index_for_run(tiny.index, run, tmp / "index")
    commands = [["evaluate", run, "--split", "test"],
                ["retrieve", "--query", "a red circle", "--index", index],
                ["train", "--resume", "--out", run, "--set", "train.max_steps=6"]]
    return run, targets, [rng.choice(commands)]


def _index_case(tiny: Tiny, tmp: Path, rng: random.Random) -> tuple[Path, list[Path], list[list[object]]]:
    index = copy(tiny.index, tmp / "index")
    targets = _files(index, ["index.json", "videos.jsonl", "embeddings.safetensors"])
    commands = [["retrieve", "--query", "a red circle", "--index", index, "-k", "3"],
                ["retrieve", "--query", "a blue box", "--index", index, "--explain", tmp / "why.png"]]
    return index, targets, [rng.choice(commands)]


TARGETS = {"store": _store_case, "run": _run_case, "index": _index_case}


@pytest.mark.parametrize("target", list(TARGETS))
def test_damaged_files_never_give_a_traceback(target: str, tiny: Tiny, tmp_path: Path) -> None:
    rng = random.Random(f"{SEED}-{target}")
    outcomes = []
    for n in range(CASES_PER_TARGET):
        tmp = tmp_path / f"case{n}"
        folder, files, commands = TARGETS[target](tiny, tmp, rng)
        path = rng.choice(files)
        kind = rng.choice([k for k in MUTATIONS if k != "drop_key" or path.suffix in (".json", ".jsonl")])
        what = MUTATIONS[kind](path, rng)
        for argv in commands:
            before = hashes(folder)
            result = cli(argv, timeout=90)
            label = f"{target} case {n}: {path.name}: {what}; ssbctl {' '.join(map(str, argv))}"
            if result.code != 0:
                try:
                    assert_one_error_line(result, result.code)
                except AssertionError as exc:
                    raise AssertionError(f"{label}\n{exc}") from None
                assert result.code in (1, 2), label
                assert hashes(folder) == before, f"{label}: a failed command changed its input"
            elif argv[:2] != ["train", "--resume"]:
                assert hashes(folder) == before, f"{label}: a read-only command changed its input"
            outcomes.append(result.code)
    assert any(code != 0 for code in outcomes), "no damage was detected at all: the fuzzer is not biting"
