"""The ``ssbctl`` Typer app: registers each command and turns user errors into exit code 2.

Usage mistakes (an unknown command or option, a missing argument, a value of the wrong type)
print click's short usage message and exit 2. ``ssbctl`` alone prints the help and exits as click
does for a group called without a command: 2 under click 8.2 and later (and recent typer, whose
vendored click follows it), 0 before.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated

import typer

from ssbctl import __version__
from ssbctl.cli import caption as caption_command
from ssbctl.cli import demo, evaluate, index, prepare, recipes, retrieve, runs, serve, train
from ssbctl.core.errors import DataError, TrainingError, UserError

app = typer.Typer(name="ssbctl", no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  help="Support-Set Bottlenecks for video-text retrieval: prepare, train, evaluate, retrieve.")

for module in (prepare, train, evaluate, index, retrieve, demo, serve):
    name = module.__name__.rsplit(".", 1)[1]
    app.command(name, epilog=module.EPILOG)(getattr(module, name))
app.command("caption", epilog=caption_command.EPILOG)(caption_command.caption)
app.add_typer(recipes.app, name="recipes", epilog=recipes.EPILOG)  # a group: list, show, copy
app.command("runs", epilog=runs.EPILOG)(runs.runs)


def _print_version(value: bool) -> None:
    if value:
        print(f"ssbctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Options of ``ssbctl`` itself (before the command)."""


def _loaded_click_classes(name: str, typer_class: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The classes called ``name`` that a command line can raise: the one in ``typer_class``'s MRO
    (the vendored click of recent typer, 0.29 here; the click package before) and, when something
    loaded the click package, click's own. Found, not imported: ssbctl does not depend on click."""
    found = [next(c for c in typer_class.__mro__ if c.__name__ == name)]
    click = sys.modules.get("click")
    own = getattr(getattr(click, "exceptions", None), name, None)
    if isinstance(own, type) and issubclass(own, BaseException) and own not in found:
        found.append(own)
    return tuple(found)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a scheduler's stop), unwound like Ctrl-C: every ``finally`` runs, so
    output locks are released and scratch cleaned up, instead of the default action's instant death."""


_TERMINATED = threading.Event()  # set by the handler: click may turn Terminated into a plain exit code


def _terminate(signum: int, frame: FrameType | None) -> None:
    _TERMINATED.set()
    if _in_finalizer(frame):
        # Python prints and drops an exception raised in a finalizer (decord's VideoReader.__del__ runs
        # often): deliver the signal again in a moment, from wherever the program is then.
        threading.Timer(0.05, signal.raise_signal, (signum,)).start()
        return
    raise Terminated()


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` method."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextmanager
def _sigterm_unwinds(args: list[str]) -> Iterator[None]:
    """For the block, make SIGTERM raise :class:`Terminated` (then restore the previous handler).

    Not for ``train``, which installs its own handler (checkpoint, then exit 0), nor off the main
    thread (Python delivers signals to the main thread only)."""
    command = next((a for a in args if not a.startswith("-")), None)
    if command == "train" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 1 failure, 2 user error or usage mistake,
    130 interrupted, 143 terminated (SIGTERM); ``ssbctl`` alone prints the help (exit 2, or 0
    under click before 8.2).

    Errors are one line on stderr. Anything unexpected is reported as an internal error in one
    line too, unless ``SSBCTL_DEBUG=1`` asks for the traceback."""
    usage_errors = _loaded_click_classes("ClickException", typer.BadParameter)
    exits = _loaded_click_classes("Exit", typer.Exit)
    aborts = _loaded_click_classes("Abort", typer.Abort) + (KeyboardInterrupt,)
    args = list(sys.argv[1:] if argv is None else argv)
    _TERMINATED.clear()
    try:
        with _sigterm_unwinds(args):
            # obj: the command line as given, for commands that relaunch themselves (train --nproc)
            code = app(args=args, prog_name="ssbctl", standalone_mode=False, obj={"argv": args})  # int on exit(n)
    except UserError as exc:
        return _fail(2, f"error: {exc}")
    except TrainingError as exc:
        return _fail(1, f"error: training failed: {exc}")
    except DataError as exc:
        return _fail(1, f"error: {exc}")
    # Found at run time, the click classes are typed as BaseException: hence the ignores.
    except exits as exc:
        return exc.exit_code  # type: ignore[attr-defined]
    except usage_errors as exc:
        exc.show()  # type: ignore[attr-defined]
        return exc.exit_code  # type: ignore[attr-defined]
    except aborts:  # click turns a KeyboardInterrupt (and so Terminated) into its Abort
        if _TERMINATED.is_set():
            return _terminated()
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line instead of a traceback (re-raised under SSBCTL_DEBUG)
        if os.environ.get("SSBCTL_DEBUG", "") not in ("", "0"):
            raise
        text = " ".join(str(exc).split())[:300]
        return _fail(1, f"error: internal error: {type(exc).__name__}: {text} "
                        f"(a bug in ssbctl; rerun with SSBCTL_DEBUG=1 for the traceback)")
    if _TERMINATED.is_set():  # click may also answer its Abort with an exit code
        return _terminated()
    return code if isinstance(code, int) else 0


def _terminated() -> int:
    """Report a SIGTERM that unwound the command: one line, exit 143 (128 + SIGTERM)."""
    _TERMINATED.clear()
    print("terminated", file=sys.stderr)
    return 143


def _fail(code: int, line: str) -> int:
    """Print the error line (under ``train --nproc``, hand it to the launcher instead) and return ``code``."""
    from ssbctl.cli.torchrun import write_worker_error

    line = " ".join(line.splitlines())  # one line, whatever the message holds
    if not write_worker_error(code, line):
        print(line, file=sys.stderr)
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
