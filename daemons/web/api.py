"""The JSON API under ``/api/`` (docs/web.md): the CLI's ``--json`` over HTTP.

Reads are open (the dashboard binds loopback unless a token is configured); every write
needs ``Authorization: Bearer TOKEN`` (401 without, 403 when wrong or read-only). Errors
are ``{"error": message, "status": code}`` with the status of :func:`app.status_for`.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from coordination.errors import UsageError

from .fleet import Fleet, perform

MAX_BODY_BYTES = 64 * 1024


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


def int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}: {raw!r} is not an integer") from None


def task_query(request: Request) -> dict[str, Any]:
    """The task list's filters from the query string (shared with the tasks page)."""
    q = request.query_params
    return {"status": q.get("status") or None, "priority": q.get("priority") or None,
            "worker_type": q.get("type") or None, "text": q.get("q") or None,
            "sort": q.get("sort") or "priority", "descending": q.get("desc") in ("1", "on"),
            "page": int_param(request, "page", 1),
            "per_page": int_param(request, "per_page", 50)}


async def status(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_fleet(request).status))


async def tasks(request: Request) -> Response:
    query = task_query(request)
    return JSONResponse(await run_in_threadpool(lambda: _fleet(request).tasks(**query)))


async def task(request: Request) -> Response:
    task_id = request.path_params["task_id"]
    return JSONResponse(await run_in_threadpool(_fleet(request).task, task_id))


async def workers(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_fleet(request).workers))


async def dead_letters(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_fleet(request).dead_letters))


async def events(request: Request) -> Response:
    since = request.query_params.get("since")
    limit = int_param(request, "limit", 100)
    return JSONResponse(await run_in_threadpool(
        lambda: _fleet(request).events(since=since, limit=limit)))


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise UsageError(f"request body over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"request body: invalid JSON: {exc.msg}") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


def write_route(resource: str, param: str) -> Any:
    async def endpoint(request: Request) -> Response:
        request.app.state.guard.check_bearer(request.headers.get("authorization"))
        params = await _body(request)
        ident = request.path_params[param]
        action = request.path_params["action"]
        out = await run_in_threadpool(perform, _fleet(request), resource, ident, action,
                                      params)
        return JSONResponse(out)
    return endpoint


routes = [
    Route("/api/status", status),
    Route("/api/tasks", tasks),
    Route("/api/tasks/{task_id}", task),
    Route("/api/workers", workers),
    Route("/api/dead-letters", dead_letters),
    Route("/api/events", events),
    Route("/api/tasks/{task_id}/{action}", write_route("tasks", "task_id"), methods=["POST"]),
    Route("/api/types/{type}/{action}", write_route("types", "type"), methods=["POST"]),
    Route("/api/workers/{worker_id}/{action}", write_route("workers", "worker_id"),
          methods=["POST"]),
]
