"""Every shipped recipe trains under a real 2-process torchrun (gloo) exactly as in one process.

Each recipe keeps its real configuration: its loss, support mask, text-model family, accumulation
steps, and experts with their feature sizes. Overridden is only what points it at tiny stand-ins
(a random text model of its family, random prepared stores under the recipe's own names, small
widths and batch, two steps) and dropout, which one process and two would draw differently.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ssbctl.config import Recipe, load_recipe
from ssbctl.core.io import read_jsonl
from ssbctl.core.paths import shipped_configs
from ssbctl.engine.checkpoint import latest_checkpoint
from ssbctl.objective.grad_norms import CAPTION_KEY, CONTRASTIVE_KEY, RATIO_KEY

import fixtures

EMBED_GRADS = (CONTRASTIVE_KEY, CAPTION_KEY, RATIO_KEY)  # the terms' gradient norms on the embeddings

RECIPES = sorted(shipped_configs("recipes"))
TESTS = Path(__file__).resolve().parent

# Frame-feature size of each backbone a shipped recipe's prepared data names (NAME-<backbone>).
EXPERT_DIMS = {"clip-vit-base-patch32": 512, "pixels": 3072,
               "appearance": 2048, "motion": 512}  # msrvtt-paper's imported ResNet-152 and R(2+1)D-34 features

TINY: dict[str, object] = {
    "model.embed_dim": 16, "model.video.hidden_dim": 16, "model.video.layers": 1, "model.video.heads": 2,
    "model.decoder.hidden_dim": 16, "model.decoder.layers": 1, "model.decoder.heads": 2,
    "model.video.dropout": 0.0, "model.decoder.dropout": 0.0,
    "train.batch_size": 8, "train.max_steps": 2, "train.log_every": 1, "data.num_workers": 0,
}
# What makes a recipe what it is; the stand-ins must leave all of it as shipped.
SHIPPED = ("loss.", "model.support.", "train.accum_steps", "data.experts", "data.prepared")

# Run under torchrun: trains each job in turn in the same process group.
WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from fixtures import train_recording_gradients
from ssbctl.core.distributed import teardown
for job in json.loads(open(sys.argv[2]).read()):
    train_recording_gradients(**job)
teardown()
"""


def _family(pretrained: str) -> str | None:
    """The tiny stand-in's family for a recipe's text model; None for the offline builtin (kept)."""
    if pretrained.startswith("builtin:"):
        return None
    return "t5" if "t5" in pretrained else "clip" if "clip" in pretrained else "bert"


def _expert_dim(prepared: str) -> int:
    backbone = prepared.split("-", 1)[1]
    assert backbone in EXPERT_DIMS, f"no stand-in size for backbone '{backbone}': add it to EXPERT_DIMS"
    return EXPERT_DIMS[backbone]


def _stand_ins(name: str, root: Path, home: Path) -> list[str]:
    """Random stores under the recipe's prepared names in ``home``, a tiny text model of its
    family under ``root``; returns the overrides that point the recipe at them."""
    recipe: Recipe = load_recipe(name)
    names = [recipe.data.prepared, *recipe.data.experts]
    fixtures.random_stores([home / "data" / n for n in names], [_expert_dim(n) for n in names],
                           {recipe.data.train_split: 12, recipe.data.eval_split: 2}, seed=RECIPES.index(name))
    values = dict(TINY)
    family = _family(recipe.model.text.pretrained)
    if family is not None:
        values["model.text.pretrained"] = str(fixtures.tiny_text_model(root / f"text-{name}", family, dropout=0.0,
                                                                      seq2seq=recipe.model.decoder.kind == "t5"))
    assert not [k for k in values if k.startswith(SHIPPED)], "the stand-ins must keep the recipe's own config"
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stand-ins for every recipe, and one torchrun launch that trains them all on 2 processes."""
    root = tmp_path_factory.mktemp("recipes")
    home = root / "home"
    jobs = [{"recipe": name, "overrides": _stand_ins(name, root, home), "run_dir": str(root / "two" / name),
             "grads": str(root / f"two-{name}.pt")} for name in RECIPES]
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "worker.py").write_text(WORKER)
    env = {**os.environ, "SSBCTL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(root / "worker.py"), str(TESTS), str(root / "jobs.json")],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, err = fixtures.communicate_or_reap(proc, timeout=900)
    return {"root": root, "home": home, "jobs": {j["recipe"]: j for j in jobs}, "rc": proc.returncode, "err": err}


def _assert_same_gradients(one: dict[int, dict[str, torch.Tensor]], two: dict[int, dict[str, torch.Tensor]]) -> None:
    """Per step and tensor, in float64: equal up to 1e-4 of the tensor's largest gradient, plus
    1e-7 of the step's largest (for tensors whose true gradient is rounding noise)."""
    assert sorted(two) == sorted(one) == [1, 2]
    for step, grads in one.items():
        assert two[step].keys() == grads.keys(), step
        scale = max(float(g.abs().max()) for g in grads.values())
        for name, a in grads.items():
            err = float((two[step][name] - a).abs().max())
            assert err <= 1e-4 * float(a.abs().max()) + 1e-7 * scale, (step, name, err, float(a.abs().max()))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_under_two_process_torchrun_with_one_process_gradients(
        name: str, two_processes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = two_processes
    job = run["jobs"][name]
    assert run["rc"] == 0 and Path(job["grads"]).is_file(), run["err"][-4000:]
    monkeypatch.setenv("SSBCTL_HOME", str(run["home"]))
    summary = fixtures.train_recording_gradients(name, job["overrides"], tmp_path / "one", tmp_path / "one.pt")
    assert summary["steps"] == 2

    recipe = load_recipe(name, job["overrides"])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(job["grads"])
    trainable = {n for n, p in _model_params(tmp_path / "one", recipe) if p.requires_grad}
    assert set(one[2]) == trainable, "every trainable parameter gets a gradient"
    _assert_same_gradients(one, two)

    rows_one = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    rows_two = [r for r in read_jsonl(Path(job["run_dir"]) / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2]
    for a, b in zip(rows_one, rows_two):
        for key in ("loss", "contrastive_loss", "caption_loss", "grad_norm", *EMBED_GRADS):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a["step"])
        assert all(math.isfinite(a[key]) for key in EMBED_GRADS) and a[CONTRASTIVE_KEY] > 0
        assert ("temperature" in b) == (recipe.loss.contrastive == "infonce")
    state = json.loads((latest_checkpoint(Path(job["run_dir"])) / "state.json").read_text())
    assert state["step"] == 2 and state["world"] == 2


def _model_params(run_dir: Path, recipe: Recipe) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters of the model a run trains (rebuilt from its run folder)."""
    from ssbctl.engine.run import build_run_model, read_run_recipe

    model, _ = build_run_model(run_dir, read_run_recipe(run_dir))
    return list(model.named_parameters())


def test_shapes_with_max_margin_trains_under_nproc_2(shapes_store: Path, tiny_text_model: Path,
                                                      tmp_path: Path) -> None:
    """The reported failure: ``ssbctl train --recipe shapes --nproc 2 --set loss.contrastive=max_margin``
    died at step 2 ("Expected to have finished reduction in the prior iteration")."""
    from conftest import tiny_overrides

    run = tmp_path / "run"
    overrides = tiny_overrides(shapes_store, tiny_text_model, run, **{"train.epochs": 1, "data.eval_split": ""})
    args = [a for o in [*overrides, "loss.contrastive=max_margin"] for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "ssbctl", "train", "--recipe", "shapes", "--nproc", "2", *args],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = fixtures.communicate_or_reap(proc, timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) >= 2 and all("temperature" not in r for r in rows)
    assert "max_margin" in (run / "recipe.toml").read_text()
    assert json.loads((latest_checkpoint(run) / "state.json").read_text())["world"] == 2
