"""The ``ssbctl`` Typer app: registers each command and turns user errors into exit code 2."""

from __future__ import annotations

import sys

import click
import typer

from ssbctl.cli import demo, evaluate, index, prepare, retrieve, train
from ssbctl.errors import DataError, TrainingError, UserError

app = typer.Typer(name="ssbctl", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Support-Set Bottlenecks for video-text retrieval: prepare, train, evaluate, retrieve.")

for module in (prepare, train, evaluate, index, retrieve, demo):
    name = module.__name__.rsplit(".", 1)[1]
    app.command(name, epilog=module.EPILOG)(getattr(module, name))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 1 failure, 2 user error, 130 interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # obj: the command line as given, for commands that relaunch themselves (train --nproc)
        code = app(args=args, prog_name="ssbctl", standalone_mode=False, obj={"argv": args})  # an int on exit(n)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
