"""``ssbctl recipes``: the shipped recipes and model configs, as ``tune ls`` / ``tune cp`` show them.

``ssbctl recipes`` lists them with their one-line purpose (a recipe's opening comment, a model
config's first comment line, else its card ``NAME.md``); ``show NAME`` prints one; ``copy NAME
DEST`` writes an editable copy (never over an existing file) to train with ``--recipe DEST``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ssbctl.cli.common import JsonOption, out, print_json

EPILOG = """Examples:

  ssbctl recipes                                # shipped recipes and models, one line each

  ssbctl recipes show shapes                    # the recipe's TOML

  ssbctl recipes copy shapes my-shapes.toml     # an editable copy; then: ssbctl train --recipe my-shapes.toml
"""

app = typer.Typer(invoke_without_command=True, no_args_is_help=False, add_completion=False,
                  help="List the shipped recipes and model configs; show or copy one.")


def purpose(path: Path) -> str:
    """A config's one-line purpose: its first comment line that is not its launch commands
    (``# Launch:`` and the indented command lines under it), else the first line of its card
    (``NAME.md`` beside it) that is not a heading; "" when neither says anything."""
    for line in _read(path).splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#")
        if text.strip() and not text.startswith("   ") and text.strip() != "Launch:" and not text.strip().startswith(
                "Card:"):
            return text.strip()
    for line in _read(path.with_suffix(".md")).splitlines():
        text = line.strip().lstrip("-* ").replace("**", "")
        if text and not line.startswith("#"):
            return text
    return ""


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def catalogue() -> list[dict[str, Any]]:
    """Every shipped config: ``{"name", "kind" ("recipe" | "model"), "purpose", "path"}``, recipes first."""
    from ssbctl.core.paths import shipped_configs

    rows = []
    for kind in ("recipes", "models"):
        for name, path in sorted(shipped_configs(kind).items()):
            rows.append({"name": name, "kind": kind[:-1], "purpose": purpose(path), "path": str(path)})
    return rows


def _find(name: str) -> Path:
    """A shipped recipe, else a shipped model config, by bare name (UserError listing them otherwise)."""
    from ssbctl.core.errors import UserError
    from ssbctl.core.paths import shipped_configs

    for kind in ("recipes", "models"):
        found = shipped_configs(kind).get(name.removesuffix(".toml"))
        if found is not None:
            return found
    known = ", ".join(row["name"] for row in catalogue())
    raise UserError(f"no shipped recipe or model called '{name}'; known: {known}")


@app.callback()
def recipes(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the shipped recipes and model configs with their one-line purpose."""
    if ctx.invoked_subcommand is not None:
        return
    rows = catalogue()
    if as_json:
        print_json([{k: v for k, v in row.items()} for row in rows])
        return
    if not out.is_terminal:  # a pipe or a file: whole values, one tab-separated line each
        for row in rows:
            print(f"{row['name']}\t{row['kind']}\t{row['purpose']}")  # print: rich would expand the tabs
        return
    table = Table(title="shipped recipes and models (ssbctl recipes show NAME; ssbctl recipes copy NAME DEST)")
    for column in ("name", "kind", "purpose"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["kind"], row["purpose"])
    out.print(table)


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="A shipped recipe or model config (see `ssbctl recipes`).")],
         as_json: JsonOption = False) -> None:
    """Print a shipped recipe or model config as TOML (with --json: its name, kind, path and text)."""
    path = _find(name)
    text = path.read_text(encoding="utf-8")
    if as_json:
        print_json({"name": path.stem, "kind": path.parent.name[:-1], "path": str(path), "text": text})
        return
    typer.echo(text, nl=False)


@app.command("copy")
def copy(name: Annotated[str, typer.Argument(help="A shipped recipe or model config (see `ssbctl recipes`).")],
         dest: Annotated[Path, typer.Argument(help="The new file (or an existing folder to put NAME.toml in).")],
         as_json: JsonOption = False) -> None:
    """Copy a shipped recipe or model config to DEST to edit it; an existing file is never replaced (exit 2)."""
    from ssbctl.core.errors import UserError
    from ssbctl.core.io import write_new_file

    source = _find(name)
    target = dest.expanduser()
    if target.is_dir():
        target = target / source.name
    exists = UserError(f"{target} already exists; choose another name (ssbctl never replaces it)")
    if target.exists() or target.is_symlink():
        raise exists
    if not target.parent.is_dir():
        raise UserError(f"cannot write {target}: no folder {target.parent}")
    try:
        write_new_file(target, source.read_bytes())
    except FileExistsError:
        raise exists from None
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    if as_json:
        print_json({"name": source.stem, "kind": source.parent.name[:-1], "from": str(source), "to": str(target)})
        return
    kind = "recipe" if source.parent.name == "recipes" else "model config"
    use = f"ssbctl train --recipe {target}" if kind == "recipe" else f'[model] name = "{target}" in a recipe'
    out.print(f"copied the {kind} {source.stem} to {target}; edit it, then: {use}", markup=False, highlight=False)
