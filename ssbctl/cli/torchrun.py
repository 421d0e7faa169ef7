"""``torchrun`` for ``ssbctl train --nproc``: launching it (:func:`launch_torchrun`) and reporting a
failed worker in one line.

Plain torchrun answers any failing worker with its own traceback and exit code 1, after every
worker has printed its error. Here each worker writes its error (message and exit code) to a file
in ``$SSBCTL_ERROR_DIR`` instead of printing it (see ``ssbctl.cli.app``); when torchrun reports
failed workers, the first error written is printed once, as ``error: ...``, and its exit code
(2 for a user error, 1 for bad data or a failed training) becomes this process's exit code.

Usage: ``python -m ssbctl.cli.torchrun [torchrun options] -m ssbctl train ...``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ssbctl.core.errors import UserError

ERROR_DIR_ENV = "SSBCTL_ERROR_DIR"


def write_worker_error(code: int, message: str) -> bool:
    """Under this launcher, record a worker's error for it to report (True); else do nothing (False)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    rank = os.environ.get("RANK", "0")
    (Path(folder) / f"rank-{rank}.json").write_text(json.dumps({"code": code, "message": message}))
    return True


def first_worker_error(folder: Path) -> tuple[int, str] | None:
    """The error of the lowest rank that wrote one, or None."""
    for path in sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            row = json.loads(path.read_text())
            return int(row["code"]), str(row["message"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def launch_torchrun(nproc: int, argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Run this same ``ssbctl train`` command under ``torchrun --standalone`` with ``nproc`` workers
    (``env``: variables to add to theirs); a worker's error is reported once (ssbctl.cli.torchrun)."""
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc is for launching; under torchrun already, drop it")
    args = list(sys.argv[1:] if argv is None else argv)
    cleaned, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            cleaned.append(a)
    cmd = [sys.executable, "-m", "ssbctl.cli.torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ssbctl", *cleaned]
    child_env = {**os.environ, **(env or {})}
    # torchrun sets OMP_NUM_THREADS=1 for its workers when it is unset, with a 4-line banner on
    # stderr; a share of the cores each is the better default, and torchrun then stays quiet.
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Its own session: a Ctrl-C reaches the workers once, through the forwarding below.
    proc = subprocess.Popen(cmd, start_new_session=True, env=child_env)

    def forward(signum: int, _frame: object) -> None:
        _signal_workers(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_workers(launcher_pid: int, signum: int) -> None:
    """Send ``signum`` to torchrun's workers, which checkpoint and exit 0, so torchrun exits 0.

    Signalling torchrun itself would also stop them, but torchrun then exits 1 with a
    traceback. Before the workers exist (or without Linux's /proc) torchrun gets the signal."""
    workers: list[int] = []
    for children in Path(f"/proc/{launcher_pid}/task").glob("*/children"):
        try:
            workers += [int(pid) for pid in children.read_text().split()]
        except OSError:
            continue
    for pid in workers or [launcher_pid]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _quiet_torch_logs() -> None:
    """Silence torch.distributed's loggers (notices and failures; ours are reported in one line).

    Setting the level of ``torch.distributed`` alone is not enough: torch's elastic ``get_logger``
    gives each module's logger (``torch.distributed.run``, its agents) a level of its own."""
    names = [name for name in list(logging.root.manager.loggerDict) if name.startswith("torch.distributed")]
    for name in {"torch.distributed", "torch.distributed.run", *names}:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str]) -> int:
    """Run torchrun with ``argv``; return 0, or the first worker's exit code after one error line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _quiet_torch_logs()  # failures are reported below, in one line
    folder = Path(tempfile.mkdtemp(prefix="ssbctl-errors-"))
    os.environ[ERROR_DIR_ENV] = str(folder)
    try:
        run(parse_args(argv))
        return 0
    except ChildFailedError as exc:
        error = first_worker_error(folder)
        if error is not None:
            print(error[1], file=sys.stderr)
            return error[0]
        rank, failure = exc.get_first_failure()
        print(f"error: training failed: worker {rank} exited with code {failure.exitcode} "
              f"(rerun with SSBCTL_DEBUG=1 for its output)", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
