"""Command-line usage mistakes print click's short usage message and exit 2, never a traceback,
whichever click typer runs on (the vendored copy of recent typer, the click package before)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest
import typer

from ssbctl.cli.app import main

# (argv, what the error line says)
MISTAKES = [
    (["retreive"], "No such command 'retreive'"),
    (["evaluate"], "Missing argument"),
    (["retrieve", "-k", "abc"], "Invalid value for '-k'"),
    (["retrieve", "--idx", "x"], "No such option: --idx"),
]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssbctl", *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=120)


def _no_args_exit_code() -> int:
    """click 8.2 and later (and typer's vendored click) report a group called without a command
    as a usage error, exit 2; older click prints the help and exits 0."""
    click_exceptions = sys.modules[typer.BadParameter.__module__]
    return 2 if hasattr(click_exceptions, "NoArgsIsHelpError") else 0


@pytest.mark.parametrize("argv, message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_usage_mistake_prints_the_usage_and_exits_2(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("Usage: ssbctl") and f"Error: {message}" in err, err
    assert "Traceback" not in err and len(err.splitlines()) <= 6, err


def test_usage_mistakes_through_python_m_ssbctl() -> None:
    for argv, message in MISTAKES:
        proc = _cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr[-3000:])
        assert proc.stderr.startswith("Usage: ssbctl") and f"Error: {message}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_ssbctl_alone_prints_the_help(capsys) -> None:
    assert main([]) == _no_args_exit_code()
    shown = "".join(capsys.readouterr())
    assert "Usage: ssbctl" in shown and "retrieve" in shown and "--version" in shown, shown
    proc = _cli()
    assert proc.returncode == _no_args_exit_code(), proc.stderr[-3000:]
    assert "Usage: ssbctl" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_version_prints_the_installed_version(capsys) -> None:
    expected = f"ssbctl {metadata.version('ssbctl')}\n"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == expected
    proc = _cli("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected, "")


def test_the_click_package_exceptions_are_handled_too_when_it_is_loaded() -> None:
    """Old typer raises the click package's exceptions; a new one its own copy's. Both count."""
    from ssbctl.cli.app import _loaded_click_classes

    click = pytest.importorskip("click")
    found = _loaded_click_classes("ClickException", typer.BadParameter)
    assert click.ClickException in found
    assert any(issubclass(typer.BadParameter, cls) for cls in found)
    assert _loaded_click_classes("Exit", typer.Exit)[0] is typer.Exit
