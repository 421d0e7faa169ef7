"""Recipes and model configs: every shipped one validates; bad ones name the offending key."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from ssbctl.config import Recipe, dump_toml, load_model_config, load_recipe, parse_override, recipe_from_dict, to_dict
from ssbctl.core.errors import UserError
from ssbctl.core.paths import find_config, shipped_configs
from ssbctl.data.datasets import dataset_spec
from ssbctl.engine.run import read_run_recipe, write_recipe


@pytest.mark.parametrize("name", sorted(shipped_configs("recipes")))
def test_every_shipped_recipe_loads_and_opens_with_its_launch_command(name: str) -> None:
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    text = find_config("recipes", name).read_text()
    assert text.startswith("# Launch:"), "a recipe opens with its launch command"
    assert "ssbctl train --recipe" in text.split("\n\n")[0]


# The split a dataset's published results are on: test, except ActivityNet Captions (val_1).
PUBLISHED_SPLIT = {"activitynet": "val_1"}


def _launch_lines(name: str) -> dict[str, list[dict]]:
    """The ``ssbctl`` commands of a recipe's launch comment, parsed by the CLI itself: {command: [params]}."""
    import shlex

    from typer.main import get_command

    from ssbctl.cli.app import app

    group = get_command(app)
    header = find_config("recipes", name).read_text().split("\n\n")[0]
    found: dict[str, list[dict]] = {}
    for line in header.splitlines():
        if not line.startswith("#   "):
            continue
        words = shlex.split(line[1:], comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            (program, command, *args), words = words[:cut], words[cut + 1:]
            assert program == "ssbctl" and group.get_command(None, command) is not None, line
            ctx = group.get_command(None, command).make_context(command, args)  # unknown flag: an error here
            found.setdefault(command, []).append(ctx.params)
    return found


@pytest.mark.parametrize("name", sorted(shipped_configs("recipes")))
def test_every_recipe_launch_line_is_a_valid_command_for_this_recipe(name: str) -> None:
    """Its flags exist, its --set keys load, prepare writes the data the recipe trains on, and the
    evaluation is on the split results are published on."""
    from ssbctl.data.hf_backbones import DEFAULT_CLIP

    commands = _launch_lines(name)
    recipe = load_recipe(name)
    for params in commands["train"]:
        assert params["recipe"] == name
        load_recipe(name, params["overrides"] or [])
    if all(p["features"] is not None for p in commands["prepare"]):  # imported experts, one prepare each
        assert [p["output"].name for p in commands["prepare"]] == [recipe.data.prepared, *recipe.data.experts]
        assert all(p["output"].parent.name == "data" for p in commands["prepare"])  # $SSBCTL_HOME/data/NAME
        prepare = commands["prepare"][0]
    else:
        (prepare,) = commands["prepare"]
        backbone = (prepare["backbones"] or ["pixels"])[0]
        tag = DEFAULT_CLIP.rsplit("/", 1)[-1] if backbone == "clip" else backbone
        assert recipe.data.prepared == f"{prepare['dataset']}-{tag}"
    assert prepare["frames"] in (None, dataset_spec(prepare["dataset"]).protocol.max_frames)
    if name != "shapes":
        (evaluate,) = commands["evaluate"]
        assert evaluate["run"] == Path(recipe.train.output_dir)
        assert evaluate["split"] == PUBLISHED_SPLIT.get(prepare["dataset"], "test"), name


@pytest.mark.parametrize("name", sorted(shipped_configs("models")))
def test_every_shipped_model_config_loads_and_has_a_card(name: str) -> None:
    cfg = load_model_config(name)
    assert cfg.name == name
    assert find_config("models", name).with_suffix(".md").is_file()


def test_recipe_found_by_path_and_by_bare_name() -> None:
    by_name = load_recipe("shapes")
    by_path = load_recipe(Path(__file__).parents[1] / "recipes" / "shapes.toml")
    assert by_name == by_path


@pytest.mark.parametrize("override, key", [
    ("train.lerning_rate=1.0", "train.lerning_rate"),
    ("model.video.layerz=2", "model.video.layerz"),
    ("train.epochs=\"ten\"", "train.epochs"),
    ("train.batch_size=1", "train.batch_size"),
    ("model.support.mask=\"diagonal\"", "model.support.mask"),
    ("train.precision=\"fp8\"", "train.precision"),
    ("loss.caption_weight=true", "loss.caption_weight"),
])
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(UserError) as err:
        load_recipe("shapes", [override])
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_toml_values_and_bare_strings() -> None:
    assert parse_override("train.lr=3e-4") == {"train": {"lr": 3e-4}}
    assert parse_override("model.support.mask=none") == {"model": {"support": {"mask": "none"}}}
    assert parse_override("model.video.input_dims=[4, 8]") == {"model": {"video": {"input_dims": [4, 8]}}}
    with pytest.raises(UserError):
        parse_override("no-equals-sign")
    recipe = load_recipe("shapes", ["train.lr=3e-4", "model.support.mask=full", "train.epochs=2"])
    assert recipe.train.lr == 3e-4 and recipe.model.support.mask == "full" and recipe.train.epochs == 2


def test_int_accepted_where_float_expected() -> None:
    assert load_recipe("shapes", ["train.lr=1"]).train.lr == 1.0


def _with_recorded(recipe: Recipe) -> Recipe:
    """``recipe`` as training resolves it: input dims and decoder vocabulary size filled in."""
    model = recipe.model
    return dataclasses.replace(recipe, model=dataclasses.replace(
        model, video=dataclasses.replace(model.video, input_dims=(768, 1024)),
        decoder=dataclasses.replace(model.decoder, vocab_size=321)))


def test_resolved_recipe_round_trips_through_toml() -> None:
    recipe = _with_recorded(load_recipe("shapes", ["train.seed=7"]))
    text = dump_toml(to_dict(recipe), "# header")
    again = recipe_from_dict(tomllib.loads(text), resolve_model=False)
    assert again == recipe


@pytest.mark.parametrize("override", ["model.video.input_dims=[768]", "model.decoder.vocab_size=500"])
def test_recorded_values_are_not_recipe_keys(override: str, tmp_path: Path) -> None:
    """What training derives (input dims, decoder vocabulary) is refused from a user's recipe or
    --set, naming the key, instead of being accepted and silently overwritten."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"recipe key '{key}' is recorded by training"):
        load_recipe("shapes", [override])
    table, leaf = key.rsplit(".", 1)
    path = tmp_path / "mine.toml"
    path.write_text(f'[data]\nprepared = "x"\n\n[{table}]\n{leaf} = {override.split("=")[1]}\n')
    with pytest.raises(UserError, match=f"'{key}'"):
        load_recipe(str(path))


def test_run_records_derived_values_apart_from_its_recipe(tmp_path: Path) -> None:
    """A run's recipe.toml holds only what a user can set; run.json the recorded values; reading
    the run joins them. A run written before run.json existed still reads (old layout)."""
    recipe = _with_recorded(load_recipe("shapes", ["train.seed=7"]))
    write_recipe(tmp_path, recipe)
    saved = tomllib.loads((tmp_path / "recipe.toml").read_text())
    assert "input_dims" not in saved["model"]["video"] and "vocab_size" not in saved["model"]["decoder"]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["recorded"] == {"model": {"video": {"input_dims": [768, 1024]}, "decoder": {"vocab_size": 321}}}
    assert read_run_recipe(tmp_path) == recipe
    assert load_recipe(str(tmp_path / "recipe.toml")).model.video.input_dims == ()  # a run's recipe is a recipe
    old = tmp_path / "old"
    old.mkdir()
    (old / "recipe.toml").write_text(dump_toml(to_dict(recipe)))
    assert read_run_recipe(old) == recipe


def test_a_model_config_has_no_name_key(tmp_path: Path) -> None:
    """A model config's name is its file name: a ``name`` inside it would be overwritten."""
    path = tmp_path / "mine.toml"
    path.write_text('name = "other"\nembed_dim = 32\n')
    with pytest.raises(UserError, match="has no 'name' key"):
        load_model_config(str(path))
    path.write_text("embed_dim = 32\n")
    assert load_model_config(str(path)).name == str(path)  # what the user named it by


def test_unknown_recipe_and_model_names_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(UserError, match="unknown model"):
        load_recipe("shapes", ["model.name=\"no-such-model\""])


def test_toml_strings_with_control_characters_round_trip() -> None:
    """A value with a control character (or a newline, a quote, a backslash) is escaped, not
    written raw, so the recipe a run saves reads back the same."""
    data = {"train": {"output_dir": "runs/a\x01b\tc\nd\"e\\f\x7f"}, "data": {"experts": ["x\x1fy"]}}
    assert tomllib.loads(dump_toml(data, "# header\n#   second line")) == data
