"""The ``ssbctl serve`` web application (Starlette): one page, its two assets, a JSON API, and the
thumbnails and video files of the index's rows.

Routes (every one under the token when one is set):

    GET /                          the page (the query is kept in the URL: ``/?q=...&k=...``)
    GET /static/app.js, style.css  its script and style, shipped in the package (no CDN)
    GET /api/search?q=&k=          top-k for a text: the JSON of ``retrieve --json`` (``captions=1`` adds captions)
    GET /api/similar/{video_id}?k= top-k like an indexed video, itself first
    GET /api/explain?q=|video_id=&k=  support-set attention among the top-k (``retrieve --explain``)
    GET /api/health                what is served
    GET /media/thumb/{video_id}    PNG thumbnail of an index row
    GET /media/video/{video_id}    the row's video file, with HTTP Range (206 / 416)

Errors are JSON ``{"error": "one line"}`` with a 4xx status. Encoding and search run off the event
loop (the service's worker thread, or the thread pool).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ssbctl.core.errors import UserError
from ssbctl.serve.files import RequestError, parse_range
from ssbctl.serve.service import MAX_K, MAX_QUERY_CHARS, Service, finite

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a token in the URL never leaves in a Referer header
    "X-Frame-Options": "DENY",
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(finite(obj), allow_nan=False, ensure_ascii=False)
    return Response(body, status, headers=headers, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": " ".join(message.split())}, status, headers)


def _text_param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and len(value) > MAX_QUERY_CHARS:
        raise RequestError(422, f"{name} is too long: at most {MAX_QUERY_CHARS} characters")
    return value


def _k(request: Request, default: int = 10) -> int:
    raw = request.query_params.get("k")
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise RequestError(422, f"k must be a whole number from 1 to {MAX_K}")
    k = int(raw)
    if not 1 <= k <= MAX_K:
        raise RequestError(422, f"k must be from 1 to {MAX_K}, got {k}")
    return k


def _query(request: Request) -> str:
    text = _text_param(request, "q")
    if text is None or not text.strip():
        raise RequestError(422, "q is required: the text to search for")
    return text


def create_app(service: Service, token: str | None = None, hosts: tuple[str, ...] | None = None) -> Starlette:
    """The application over a loaded :class:`Service`. ``token``: every request must carry it
    (``Authorization: Bearer``, ``X-Ssbctl-Token`` or ``?token=``). ``hosts``: the Host names
    accepted (None: any); a loopback server accepts only loopback names, which stops a web page
    that rebinds its own name to 127.0.0.1 from reading the API."""
    page = (resources.files("ssbctl.serve") / "static" / "index.html").read_text("utf-8")
    assets = {name: (resources.files("ssbctl.serve") / "static" / name).read_bytes() for name in ASSETS}

    async def index_page(request: Request) -> Response:
        html = page
        if token:  # the page's own assets carry the token too (it is the one this request carried)
            mark = "?token=" + quote(token, safe="")
            for link in ("/static/app.js", "/static/style.css", "/favicon.ico"):
                html = html.replace(f'"{link}"', f'"{link}{mark}"')
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # no favicon: answered, so a browser logs no failed request

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:  # a fixed table of names: nothing is looked up on disk
            raise RequestError(404, "not found")
        return Response(assets[name], media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    async def search(request: Request) -> Response:
        text, k = _query(request), _k(request)
        # encoded and searched off the event loop, on the model's thread
        hits, seconds, batch = await asyncio.wrap_future(service.batcher.submit(text, k))
        timing = {"Server-Timing": f"search;dur={seconds * 1000:.2f};desc=\"encode + search (batch of {batch})\""}
        return _json(service.with_captions(hits) if request.query_params.get("captions") == "1" else hits,
                     headers=timing)

    async def similar(request: Request) -> Response:
        video_id, k = request.path_params["video_id"], _k(request)
        hits = await run_in_threadpool(service.similar, video_id, k)
        return _json(service.with_captions(hits) if request.query_params.get("captions") == "1" else hits)

    async def explain(request: Request) -> Response:
        video_id = _text_param(request, "video_id")
        text = None if video_id is not None else _query(request)
        return _json(await run_in_threadpool(service.explain, text, video_id, _k(request, 8)))

    async def health(request: Request) -> Response:
        return _json(service.health())

    async def thumb(request: Request) -> Response:
        png = await run_in_threadpool(service.thumbnail, request.path_params["video_id"])
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    async def video(request: Request) -> Response:
        opened = await run_in_threadpool(service.video, request.path_params["video_id"])
        try:
            wanted = parse_range(request.headers.get("range"), opened.size)
        except RequestError:
            opened.close()
            raise
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, no-cache"}
        if wanted is None:
            start, end, status = 0, opened.size - 1, 200
        else:
            (start, end), status = wanted, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{opened.size}"
        headers["Content-Length"] = str(end - start + 1)
        if request.method == "HEAD":
            opened.close()
            return Response(b"", status, headers=headers, media_type=opened.content_type)
        return StreamingResponse(opened.chunks(start, end), status, headers=headers, media_type=opened.content_type)

    routes = [
        Route("/", index_page), Route("/static/{name}", asset), Route("/favicon.ico", no_icon),
        Route("/api/search", search), Route("/api/similar/{video_id:path}", similar),
        Route("/api/explain", explain), Route("/api/health", health),
        Route("/media/thumb/{video_id:path}", thumb), Route("/media/video/{video_id:path}", video),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        RequestError: _problem, UserError: _user_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.add_middleware(Guard, token=token, hosts=hosts)
    return app


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return _error(exc.status, exc.message, exc.headers)


async def _user_error(request: Request, exc: Exception) -> Response:
    """What the CLI reports as ``error: ...`` (exit 2) is a 400 here: this index or run cannot do that."""
    return _error(400, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return _error(exc.status_code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    text = " ".join(str(exc).split())[:300]
    return _error(500, f"internal error: {type(exc).__name__}: {text}")


class Guard:
    """Checks the Host header (when ``hosts`` is set) and the token (when set) before any route
    runs, and adds the security headers to every response. The token is compared in constant time."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: tuple[str, ...] | None) -> None:
        self.app, self.hosts = app, hosts
        self.token = token.encode("utf-8") if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items())]
            await send(message)

        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> Response | None:
        if self.hosts is not None:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.hosts:
                return _error(400, f"refused: unexpected Host header {host[:100]!r}")
        if self.token is None:
            return None
        given = _given_token(request)
        if given is None or not hmac.compare_digest(given.encode("utf-8"), self.token):
            return _error(401, "a valid token is required (Authorization: Bearer TOKEN, X-Ssbctl-Token, "
                               "or ?token=TOKEN)", {"WWW-Authenticate": "Bearer"})
        return None


def _given_token(request: Request) -> str | None:
    """The token a request carries: the Authorization bearer, the X-Ssbctl-Token header or ?token=."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if "x-ssbctl-token" in request.headers:
        return request.headers["x-ssbctl-token"]
    values = parse_qs(request.scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[-1] if values else None
