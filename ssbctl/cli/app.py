"""The ``ssbctl`` Typer app: registers each command and turns user errors into exit code 2."""

from __future__ import annotations

import os
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
    """Run the CLI and return its exit code: 0 ok, 1 failure, 2 user error, 130 interrupted.

    Errors are one line on stderr. Anything unexpected is reported as an internal error in one
    line too, unless ``SSBCTL_DEBUG=1`` asks for the traceback."""
    try:
        code = app(args=argv, prog_name="ssbctl", standalone_mode=False)  # an int when a command exits with one
    except UserError as exc:
        return _fail(2, f"error: {exc}")
    except TrainingError as exc:
        return _fail(1, f"error: training failed: {exc}")
    except DataError as exc:
        return _fail(1, f"error: {exc}")
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: one line instead of a traceback
        if os.environ.get("SSBCTL_DEBUG", "") not in ("", "0"):
            raise
        text = " ".join(str(exc).split())[:300]
        return _fail(1, f"error: internal error: {type(exc).__name__}: {text} "
                        f"(a bug in ssbctl; rerun with SSBCTL_DEBUG=1 for the traceback)")
    return code if isinstance(code, int) else 0


def _fail(code: int, line: str) -> int:
    """Print the error line (under ``train --nproc``, hand it to the launcher instead) and return ``code``."""
    from ssbctl.engine.torchrun import write_worker_error

    line = " ".join(line.splitlines())  # one line, whatever the message holds
    if not write_worker_error(code, line):
        print(line, file=sys.stderr)
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
