"""Non-finite numbers never hang training or pass for results: a run that stops making progress
fails fast and saves nothing broken; NaN features are refused at load; NaN scores rank last; a
model with NaN weights is refused by evaluate, index and retrieve; JSON output stays strict JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssbctl.cli.app import main
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.evaluation.metrics import retrieval_metrics
from ssbctl.retrieval.index import Index
from ssbctl.retrieval.scan import topk_search


def _sets(args: list[str]) -> list[str]:
    return [x for a in args for x in ("--set", a)]


def _one_error_line(err: str, needle: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err[-3000:]
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------ training


def test_a_loss_that_stays_nonfinite_fails_the_run_within_an_epoch(tiny_recipe_args, tmp_path: Path) -> None:
    """lr=1e30: the first step is finite, every later loss NaN. With 4 batches an epoch the streak of
    non-finite losses used to restart every epoch and the run never ended (nor advanced a step)."""
    args = tiny_recipe_args("run", **{"train.lr": 1e30, "train.epochs": 3})
    proc = subprocess.run([sys.executable, "-m", "ssbctl", "train", "--recipe", "shapes", *_sets(args)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # the rich progress above it reports the skipped batches
    assert last.startswith("error: training failed: loss was non-finite 4 times in a row at step 1"), last
    assert "Traceback" not in proc.stderr
    assert latest_checkpoint(tmp_path / "run") is None, "the weights that broke the loss are not saved"


def test_under_torchrun_every_rank_fails_at_the_same_step(tiny_recipe_args, tmp_path: Path) -> None:
    """Both ranks count the same agreed non-finite flags, so they fail together (no rank left waiting
    in a collective); the launcher reports the failure once, exits 1 and nothing is saved."""
    from fixtures import communicate_or_reap, write_recipe

    recipe = write_recipe(tmp_path / "tiny.toml", tiny_recipe_args("run", **{"train.lr": 1e30, "train.epochs": 3}))
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "train", "--recipe", str(recipe), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, err = communicate_or_reap(proc, timeout=240)
    assert proc.returncode == 1, err[-3000:]
    failed = [line for line in err.splitlines() if line.startswith("error: training failed:")]
    assert failed == ["error: training failed: loss was non-finite 4 times in a row at step 1; lower train.lr "
                      "or check the data"], err[-3000:]
    assert latest_checkpoint(tmp_path / "run") is None


def test_weights_that_became_nonfinite_are_never_saved(tiny_recipe_args, tmp_path: Path) -> None:
    """A step whose loss is finite can still leave NaN weights (a NaN gradient): the checkpoint is refused."""
    from ssbctl.config import load_recipe
    from ssbctl.core.errors import TrainingError
    from ssbctl.engine.trainer import Trainer

    trainer = Trainer(load_recipe("shapes", tiny_recipe_args("run", **{"train.max_steps": 1})), tmp_path / "run")
    with torch.no_grad():
        next(trainer.module.video.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="weights became non-finite by step 0; nothing saved"):
        trainer.save()
    assert latest_checkpoint(tmp_path / "run") is None


def _poison(store: Path, out: Path, video_ids: set[str] | None) -> Path:
    """A copy of ``store`` whose features of ``video_ids`` (all when None) are NaN."""
    shutil.copytree(store, out)
    for shard in out.glob("features-*.safetensors"):
        tensors = load_file(str(shard))
        save_file({k: torch.full_like(v, float("nan")) if video_ids is None or k in video_ids else v
                   for k, v in tensors.items()}, str(shard))
    return out


def test_a_store_with_nan_features_is_refused_at_load(shapes_store: Path, tiny_recipe_args, tmp_path: Path,
                                                      capsys) -> None:
    """One NaN video used to make every batch holding it skip silently; a whole NaN store hung at step 0."""
    from ssbctl.data.store import FeatureStore

    train_ids = [v["video_id"] for v in FeatureStore(shapes_store).split_videos("train")]
    poisoned = _poison(shapes_store, tmp_path / "poisoned", {train_ids[3]})
    args = [a for a in tiny_recipe_args("run") if not a.startswith("data.prepared")] + [f'data.prepared="{poisoned}"']
    assert main(["train", "--recipe", "shapes", *_sets(args)]) == 1
    _one_error_line(capsys.readouterr().err, f"{poisoned}: 1 of 12 videos of split 'train' have non-finite")
    assert not (tmp_path / "run").exists()

    val_ids = [v["video_id"] for v in FeatureStore(shapes_store).split_videos("val")]
    poisoned = _poison(shapes_store, tmp_path / "poisoned-val", {val_ids[0]})
    args = [a for a in tiny_recipe_args("run") if not a.startswith("data.prepared")] + [f'data.prepared="{poisoned}"']
    assert main(["train", "--recipe", "shapes", *_sets(args)]) == 1
    _one_error_line(capsys.readouterr().err, "1 of 6 videos of split 'val' have non-finite")
    assert not (tmp_path / "run").exists(), "refused before the first epoch"


# ------------------------------------------------------------ metrics and search


def test_nan_scores_rank_last_not_first() -> None:
    video, text = torch.eye(4), torch.eye(4)
    nan = torch.full((4, 4), float("nan"))
    for t, v in ((nan, video), (text, nan), (nan, nan)):
        m = retrieval_metrics(t, v, torch.arange(4))
        for direction in ("t2v", "v2t"):
            assert m[direction]["R1"] == 0.0 and m[direction]["MdR"] == 4.0, (direction, m)
    # one NaN video among good ones: the others keep rank 1, the NaN one is last for its caption
    v = video.clone()
    v[2] = float("nan")
    m = retrieval_metrics(text, v, torch.arange(4))
    assert m["t2v"]["R1"] == 75.0 and m["t2v"]["MnR"] == (1 + 1 + 4 + 1) / 4


def test_search_ranks_nonfinite_rows_last_and_reports_no_score(tmp_path: Path) -> None:
    gallery = torch.eye(6, 4)[:, :4].clone()
    gallery[5] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    gallery[0] = float("nan")
    scores, rows = topk_search(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), gallery, k=6, chunk=2)
    assert set(rows[0, :2].tolist()) == {1, 5} and rows[0, -1].item() == 0, rows
    assert scores[0, -1].item() == float("-inf") and torch.isfinite(scores[0, :-1]).all()
    index = Index(gallery, [{"video_id": f"v{i}", "path": ""} for i in range(6)])
    hits = index.search(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), k=6)[0]
    assert hits[-1]["video_id"] == "v0" and hits[-1]["score"] is None
    json.dumps(hits, allow_nan=False)


# ------------------------------------------------------------ a model with NaN weights


@pytest.fixture(scope="module")
def broken_run(shapes_store: Path, tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, Path]:
    """A 2-step run with a sound index of its videos; then its checkpoint's weights are set to NaN."""
    from ssbctl.config import load_recipe
    from ssbctl.data.store import FeatureStore
    from ssbctl.inference.run import load_run
    from ssbctl.retrieval.build import index_store
    from ssbctl.training import train

    from conftest import tiny_overrides

    root = tmp_path_factory.mktemp("broken")
    extra = {"train.max_steps": 2, "data.eval_split": ""}
    train(load_recipe("shapes", tiny_overrides(shapes_store, tiny_text_model, root / "run", **extra)), root / "run")
    index_store(load_run(root / "run"), FeatureStore(shapes_store), thumbnails=False).save(root / "index")
    weights = latest_checkpoint(root / "run") / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(str(weights)).items()}, str(weights))
    return root / "run", root / "index"


def test_evaluate_refuses_a_model_with_nan_weights(broken_run, capsys) -> None:
    """It used to score R@1 100.0 both ways (a NaN score beat every competitor)."""
    run, _ = broken_run
    assert main(["evaluate", str(run), "--split", "test", "--json"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    _one_error_line(out.err, f"run {run} [step-00000002] gives non-finite (NaN or Inf) embeddings for 6 of 6 videos "
                             f"and 18 of 18 captions")


def test_index_refuses_a_model_with_nan_weights(broken_run, tmp_path: Path, capsys) -> None:
    run, _ = broken_run
    assert main(["index", str(run), "--out", str(tmp_path / "index")]) == 1
    _one_error_line(capsys.readouterr().err, f"run {run} [step-00000002] gives non-finite")
    assert not (tmp_path / "index").exists()


def test_retrieve_refuses_nan_queries_and_nan_index_rows(broken_run, tmp_path: Path, capsys) -> None:
    """It used to print row 0 over and over with "score": -Infinity, which is not JSON."""
    run, index = broken_run
    assert main(["retrieve", "--query", "a red circle", "--index", str(index), "--json"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    _one_error_line(out.err, f"run {run} [step-00000002] gives non-finite (NaN or Inf) embeddings for 1 of 1 texts")

    nan_index = tmp_path / "nan-index"
    sound = Index.load(index)
    Index(torch.full_like(sound.embeddings, float("nan")), sound.videos, sound.meta).save(nan_index)
    assert main(["retrieve", "--query", "a red circle", "--index", str(nan_index), "--json"]) == 1
    _one_error_line(capsys.readouterr().err, f"index {nan_index} holds 24 of 24 non-finite")


def test_json_output_is_strict_json(capsys) -> None:
    from ssbctl.cli.common import print_json

    print_json({"score": float("-inf"), "rows": [1.5, float("nan")], "ok": (1, "a")})
    assert json.loads(capsys.readouterr().out) == {"score": None, "rows": [1.5, None], "ok": [1, "a"]}
