"""The HTML pages: overview, tasks, a task, workers, dead letters, events; and their forms.

Every page is a layout (navigation and forms) around one live region, ``<main id="live">``.
The browser's script (static/app.js) listens to ``/stream`` (Server-Sent Events) and on
each ``change`` fetches the page again with ``X-Harness-Fragment: 1``, which returns the
live region alone. Renders are cached per URL and change generation for
:data:`CACHE_TTL_S` and shared while in flight, so fifty open pages cost one render per
change. Templates are Jinja2 with autoescape on: everything from tasks is escaped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import orjson
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from coordination.tasks import PRIORITIES

from ..reporting.commands import format_age
from .api import task_query
from .auth import CSRF_COOKIE, CSRF_FIELD, new_csrf_value
from .charts import depth_bars, hour_charts
from .fleet import LIST_STATUSES, PAGE_SIZES, SORTS, Fleet, perform
from .sse import ChangeFeed

TEMPLATES = Path(__file__).resolve().parent / "templates"
FRAGMENT_HEADER = "x-harness-fragment"
CACHE_TTL_S = 1.0
CACHE_ENTRIES = 64


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def make_env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, auto_reload=False)
    env.filters["age"] = format_age
    env.filters["pretty"] = _pretty
    env.globals.update(svg=Markup,  # only for charts.py's output: it escapes every label
                       list_statuses=LIST_STATUSES, priorities=PRIORITIES, sorts=SORTS,
                       page_sizes=PAGE_SIZES)
    return env


class RenderCache:
    """Renders keyed by (URL, fragment, generation), kept :data:`CACHE_TTL_S` and shared by
    concurrent requests for the same key (one render for many clients)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, bool, int], tuple[float, asyncio.Future[str]]] = {}

    async def get(self, key: tuple[str, bool, int], render: Callable[[], str]) -> str:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and now - hit[0] < CACHE_TTL_S:
            return await asyncio.shield(hit[1])
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._entries[key] = (now, future)
        if len(self._entries) > CACHE_ENTRIES:
            for old in sorted(self._entries, key=lambda k: self._entries[k][0])[:16]:
                if old != key:
                    del self._entries[old]
        try:
            future.set_result(await run_in_threadpool(render))
        except BaseException as exc:
            self._entries.pop(key, None)
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when none waits
            raise
        return future.result()


# ---------------------------------------------------------------------------- page data
def _overview(fleet: Fleet, request: Request) -> dict[str, Any]:
    data = fleet.overview()
    status = data["status"]
    return dict(data, worker_types=fleet.worker_types(), charts=[*hour_charts(data["snapshots"])],
                priority_bars=depth_bars("chart-priority", "Queue depth by priority",
                                         status["queue"]["by_priority"]),
                type_bars=depth_bars("chart-type", "Queue depth by worker type",
                                     data["by_type"]))


def _tasks(fleet: Fleet, request: Request) -> dict[str, Any]:
    query = task_query(request)
    data = fleet.tasks(**query)
    base = {k: v for k, v in request.query_params.items() if k != "page" and v}

    def page_url(page: int) -> str:
        return "/tasks?" + urlencode({**base, "page": page})

    return dict(data, query=query, page_url=page_url)


def _task(fleet: Fleet, request: Request) -> dict[str, Any]:
    return fleet.task(request.path_params["task_id"])


def _workers(fleet: Fleet, request: Request) -> dict[str, Any]:
    return {"workers": fleet.workers()}


def _dead(fleet: Fleet, request: Request) -> dict[str, Any]:
    return {"letters": fleet.dead_letters()}


def _events(fleet: Fleet, request: Request) -> dict[str, Any]:
    return {"events": list(reversed(fleet.events(limit=200)))}


#: name -> (title, data function); templates are NAME.html (page) and NAME_live.html.
PAGES: dict[str, tuple[str, Callable[[Fleet, Request], dict[str, Any]]]] = {
    "overview": ("Overview", _overview),
    "tasks": ("Tasks", _tasks),
    "task": ("Task", _task),
    "workers": ("Workers", _workers),
    "dead": ("Dead letters", _dead),
    "events": ("Events", _events),
}


def _csrf(request: Request) -> tuple[str, bool]:
    """The browser's CSRF value and whether the cookie must be set now."""
    value = request.cookies.get(CSRF_COOKIE)
    if value and 16 <= len(value) <= 128:
        return value, False
    return new_csrf_value(), True


def page_endpoint(name: str) -> Callable[[Request], Any]:
    title, data_of = PAGES[name]

    async def endpoint(request: Request) -> Response:
        app = request.app
        fleet: Fleet = app.state.fleet
        feed: ChangeFeed = app.state.feed
        fragment = request.headers.get(FRAGMENT_HEADER) == "1"
        csrf, set_cookie = _csrf(request)
        env: jinja2.Environment = app.state.templates

        generation = feed.generation  # read before the data: a later change shows newer

        def render() -> str:
            context = {**data_of(fleet, request), "view": name, "title": title}
            if fragment:
                return env.get_template(f"{name}_live.html").render(context)
            return env.get_template(f"{name}.html").render(
                context, csrf=csrf, writable=app.state.guard.writable, generation=generation,
                path=request.url.path, notice=request.query_params.get("done"))

        key = (str(request.url.path) + "?" + str(request.url.query), fragment, generation)
        # A full page carries this browser's CSRF value: never shared between browsers.
        text = await app.state.cache.get(key, render) if fragment else \
            await run_in_threadpool(render)
        response = HTMLResponse(text, headers={"Cache-Control": "no-store"})
        if set_cookie and not fragment:
            response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/")
        return response

    return endpoint


async def stream(request: Request) -> Response:
    feed: ChangeFeed = request.app.state.feed
    return StreamingResponse(feed.stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store",
                                      "X-Accel-Buffering": "no"})


def _safe_next(value: Any, fallback: str) -> str:
    """A same-site path to go back to (never ``//host`` or a scheme)."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//") \
            and "\\" not in value and "?" not in value and len(value) < 2000:
        return value
    return fallback


async def form_write(request: Request) -> Response:
    """A page's write form: ``POST /forms/RESOURCE/ACTION`` with the id, the token and the
    CSRF value as fields; redirects (303) back to the page it came from."""
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    own_origin = f"{request.url.scheme}://{request.headers.get('host', '')}"
    request.app.state.guard.check_form(
        token=fields.get("token", ""), csrf_field=fields.get(CSRF_FIELD, ""),
        csrf_cookie=request.cookies.get(CSRF_COOKIE), origin=request.headers.get("origin"),
        fetch_site=request.headers.get("sec-fetch-site"), own_origin=own_origin)
    action = request.path_params["action"]
    await run_in_threadpool(perform, request.app.state.fleet, request.path_params["resource"],
                            fields.get("id", ""), action, fields)
    target = _safe_next(fields.get("next"), "/")
    return RedirectResponse(f"{target}?{urlencode({'done': action})}", status_code=303)


routes = [
    Route("/", page_endpoint("overview")),
    Route("/tasks", page_endpoint("tasks")),
    Route("/tasks/{task_id}", page_endpoint("task")),
    Route("/workers", page_endpoint("workers")),
    Route("/dead-letters", page_endpoint("dead")),
    Route("/events", page_endpoint("events")),
    Route("/stream", stream),
    Route("/forms/{resource}/{action}", form_write, methods=["POST"]),
]

__all__ = ["RenderCache", "make_env", "render_error", "routes"]


def render_error(request: Request, status_code: int, message: str) -> HTMLResponse:
    """An error page (escaped like every page)."""
    env: jinja2.Environment = request.app.state.templates
    text = env.get_template("error.html").render(
        view="error", title=f"Error {status_code}", status_code=status_code, message=message,
        csrf="", writable=request.app.state.guard.writable, path="/", notice=None,
        generation=-1)
    return HTMLResponse(text, status_code=status_code, headers={"Cache-Control": "no-store"})
