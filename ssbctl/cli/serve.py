"""``ssbctl serve``: search an index in the browser (a local page and a JSON API)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from ssbctl.cli.common import DeviceOption

EPILOG = """Examples:

  ssbctl serve                                   # the demo's index, on http://127.0.0.1:8000/

  ssbctl serve my-index --port 8080 --token s3cret

  curl 'http://127.0.0.1:8000/api/search?q=a+red+circle&k=5'   # the JSON of retrieve --json

Security: binds 127.0.0.1 unless --host says otherwise; only the index's own videos are served,
by id, and only from inside the folder they were indexed from; --token makes every request carry it.
"""

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _require_extra() -> None:
    """One line, not a traceback, when the web server packages are not installed."""
    import importlib

    from ssbctl.core.errors import UserError

    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ssbctl serve needs {' and '.join(missing)}: pip install 'ssbctl[serve]'")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one); a user error when it cannot be had."""
    from ssbctl.core.errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


# The search thread releases the GIL at every torch op; with Python's default 5 ms the event loop
# may keep it that long each time, which under load doubled a batch's time (benchmarks/serve.py).
GIL_SWITCH_SECONDS = 0.0002

def serve(
    index_dir: Annotated[Path | None, typer.Argument(
        help="Index folder (default: $SSBCTL_HOME/index, the one `ssbctl demo` writes).", show_default=False)] = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--run", help="The run that built the index, when it has moved (default: the one index.json records).")] = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on; 0.0.0.0 serves every network (warned).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one; the URL is printed).")] = 8000,
    token: Annotated[str | None, typer.Option(
        help="A secret every request must carry (Authorization: Bearer, X-Ssbctl-Token or ?token=).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="Intra-op threads for encoding and search (default: torch's, one per core).")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Search an index in the browser: a local page and a JSON API (needs ssbctl[serve])."""
    from ssbctl.core.errors import UserError

    _require_extra()
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {port}")
    if token is not None and not token.strip():
        raise UserError("--token is empty")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    from urllib.parse import quote

    import uvicorn

    from ssbctl.serve.app import LOOPBACK_NAMES, create_app
    from ssbctl.serve.service import Service

    sock = _bind(host, port)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    try:
        service = Service(index_dir, run_dir, device)  # model and index, loaded once
        loopback = host in LOOPBACK
        app = create_app(service, token, LOOPBACK_NAMES if loopback else None)
        if not loopback:
            print(f"warning: --host {host} serves your videos to every machine that can reach this one"
                  + ("" if token else "; add --token"), file=sys.stderr, flush=True)
        shown = sock.getsockname()
        address = f"[{shown[0]}]" if ":" in shown[0] else shown[0]
        query = f"?token={quote(token, safe='')}" if token else ""
        print(f"serving {len(service.index.videos)} videos of {service.index.folder} with "
              f"{service.searcher.source} at http://{address}:{shown[1]}/{query} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=256,
                                timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            service.close()
    finally:
        sock.close()
