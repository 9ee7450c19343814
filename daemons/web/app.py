"""The Starlette app of ``harness web``: routes, security headers, error mapping.

Guarantees (docs/web.md): every response carries a strict Content-Security-Policy (scripts
and styles only from this origin, no inline script, no framing, forms post only here) and
``X-Content-Type-Options: nosniff``; a request whose ``Host`` is not one of
``allowed_hosts`` is refused (a page of another site that rebinds its DNS name to
127.0.0.1 cannot read the dashboard); errors map to HTTP statuses by the error class
(:func:`status_for`), as JSON under ``/api/`` and as an escaped page elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordination.errors import (
    ConfigError,
    CorruptFileError,
    HarnessError,
    InvalidTransition,
    NotFound,
    NotInitialized,
    TemporaryFailure,
    UsageError,
)
from coordination.paths import Home

from . import api, pages
from .auth import Refused, WriteGuard
from .fleet import Fleet
from .sse import SETTLE_S, ChangeFeed

STATIC = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" would make form Origins "null"
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def status_for(exc: BaseException) -> int:
    """The HTTP status of an error: bad input 400, unknown 404, wrong state 409, busy or
    back-pressured 503, an uninitialised home 503, anything else 500."""
    if isinstance(exc, Refused):
        return exc.status
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, NotInitialized | TemporaryFailure):
        return 503
    if isinstance(exc, ConfigError | CorruptFileError):
        return 500
    if isinstance(exc, UsageError):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, InvalidTransition):
        return 409
    return 500


def host_name(header: str) -> str:
    """The host of a ``Host`` header without its port (``[::1]:8765`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class SecurityMiddleware:
    """Refuses unknown Host headers; adds :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed is not None:
            raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(raw) not in self.allowed:
                response = Response(f"host {raw!r} is not allowed (harness web "
                                    "--allow-host)\n", status_code=400,
                                    media_type="text/plain")
                await response(scope, receive, self._with_headers(send))
                return
        await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k, v) for k, v in SECURITY_HEADERS if k not in names)]
            await send(message)
        return wrapped


async def _error(request: Request, exc: Exception) -> Response:
    status = status_for(exc)
    message = exc.message if isinstance(exc, Refused) else \
        str(exc.detail) if isinstance(exc, HTTPException) else str(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if isinstance(exc, TemporaryFailure):
        headers["Retry-After"] = "1"
    if request.url.path.startswith("/api/"):
        return api.JSONResponse({"error": message, "status": status}, status_code=status,
                                headers=headers)
    response = pages.render_error(request, status, message)
    response.headers.update(headers)
    return response


def create_app(home: Home, *, token: str | None = None,
               allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
               settle_s: float = SETTLE_S) -> Starlette:
    """The dashboard for ``home``; ``token`` None makes it read-only; ``allowed_hosts``
    None accepts any Host header (tests)."""
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        feed = ChangeFeed(home, settle_s)
        app.state.feed = feed
        await feed.start()
        state["feed"] = feed
        try:
            yield
        finally:
            await feed.stop()

    handlers: dict[Any, Any] = {HarnessError: _error, Refused: _error, HTTPException: _error}
    app = Starlette(routes=[*api.routes, *pages.routes,
                            Mount("/static", StaticFiles(directory=STATIC), name="static")],
                    exception_handlers=handlers, lifespan=lifespan)
    app.state.fleet = Fleet(home)
    app.state.guard = WriteGuard(token)
    app.state.templates = pages.make_env()
    app.state.cache = pages.RenderCache()
    app.add_middleware(SecurityMiddleware, allowed_hosts=allowed_hosts)
    return app
