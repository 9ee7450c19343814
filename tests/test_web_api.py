"""The web dashboard's JSON API, pages, forms and safety rules (Starlette TestClient).

Every endpoint of docs/web.md is called; writes without the token are refused (401), with a
wrong one or on a read-only dashboard too (403); bad ids give 400, unknown ones 404; task
text is escaped and redacted; the live feed notices a change made by another writer.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import REPO_ROOT, req
from starlette.testclient import TestClient

from coordination.control import read_control
from coordination.errors import ConfigError, UsageError
from coordination.events import emit
from coordination.paths import Home
from coordination.queue import TaskQueue
from coordination.specs import WorkerSpec, new_spec, write_spec
from daemons.reporting.status import collect_status
from daemons.web import auth, server
from daemons.web.app import CSP, create_app, host_name
from daemons.web.sse import ChangeFeed

TOKEN = "s3cret-web-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def client(home: Home) -> Iterator[TestClient]:
    with TestClient(create_app(home, token=TOKEN, allowed_hosts=None, settle_s=0.0)) as c:
        yield c


def add(home: Home, **fields: Any) -> str:
    task_id: str = TaskQueue(home).enqueue(req(**fields)).task["task_id"]
    return task_id


def dead_letter(home: Home, **fields: Any) -> str:
    queue = TaskQueue(home)
    task_id = add(home, max_attempts=1, priority="critical", **fields)  # claimed first
    assert queue.claim("worker-x-1")["task_id"] == task_id  # type: ignore[index]
    queue.fail(task_id, "worker-x-1", error="boom", exit_code=1)
    return task_id


def active_worker(home: Home, worker_id: str = "worker-7-20250101T000000000-abcd",
                  instance: str = "7") -> WorkerSpec:
    spec = new_spec(worker_id, instance, __import__("time").time())
    spec.update({"state": "idle"})
    write_spec(home, spec, create=True)
    return spec


# ---------------------------------------------------------------------------- reads
def test_status_mirrors_the_cli_json(client: TestClient, home: Home) -> None:
    add(home, priority="high")
    add(home)
    body = client.get("/api/status").json()
    cli = collect_status(home)
    ages = [side["queue"].pop(key) for key in ("oldest_queued_age_s", "oldest_runnable_age_s")
            for side in (body, cli)]  # measured at two instants
    assert body["queue"] == cli["queue"] and body["queue"]["queued"] == 2
    assert all(isinstance(a, float) for a in ages)
    assert body["queue"]["by_priority"]["high"]["queued"] == 1
    assert set(body) == set(cli)


def test_tasks_filter_sort_and_paginate(client: TestClient, home: Home) -> None:
    ids = [add(home, priority=p, description=f"job {i}", worker_type="default")
           for i, p in enumerate(["low", "high", "medium", "high"])]
    dead = dead_letter(home, description="broken job")
    everything = client.get("/api/tasks").json()
    assert everything["total"] == 5
    assert [t["priority"] for t in everything["tasks"]][:3] == ["critical", "high", "high"]
    queued = client.get("/api/tasks", params={"status": "queued"}).json()
    assert {t["task_id"] for t in queued["tasks"]} == set(ids)
    failed = client.get("/api/tasks", params={"status": "failed"}).json()
    assert [t["task_id"] for t in failed["tasks"]] == [dead]
    high = client.get("/api/tasks", params={"priority": "high"}).json()
    assert {t["task_id"] for t in high["tasks"]} == {ids[1], ids[3]}
    text = client.get("/api/tasks", params={"q": "JOB 2"}).json()
    assert [t["task_id"] for t in text["tasks"]] == [ids[2]]
    none = client.get("/api/tasks", params={"type": "nope"}).json()
    assert none["total"] == 0
    newest = client.get("/api/tasks", params={"sort": "created_at", "desc": "1",
                                              "status": "queued"}).json()
    assert newest["tasks"][0]["task_id"] == ids[-1]
    for i in range(30):
        add(home, description=f"filler {i}")
    page2 = client.get("/api/tasks", params={"per_page": 25, "page": 2}).json()
    assert (page2["page"], page2["pages"], page2["total"], len(page2["tasks"])) == (2, 2, 35, 10)
    for bad in ({"status": "done"}, {"priority": "urgent"}, {"sort": "nope"},
                {"per_page": 7}, {"page": 0}, {"page": "x"}):
        r = client.get("/api/tasks", params=bad)
        assert r.status_code == 400, bad
        assert r.json()["status"] == 400


def test_one_task_with_attempts_timeline_log_and_result(client: TestClient, home: Home) -> None:
    queue = TaskQueue(home)
    task_id = add(home, description="with a log")
    queue.claim("worker-1-x")
    home.task_log(task_id).parent.mkdir(parents=True, exist_ok=True)
    home.task_log(task_id).write_text(
        "line one\nGITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789\n")
    queue.complete(task_id, "worker-1-x", result={"summary": "ok", "api_key": "hunter2"})
    body = client.get(f"/api/tasks/{task_id}").json()
    assert body["task"]["status"] == "completed"
    assert [r["outcome"] for r in body["attempts"]] == ["completed"]
    assert body["result"] == {"summary": "ok", "api_key": "[redacted]"}
    assert body["log"][0] == "line one" and "ghp_abcdefghij" not in body["log"][1]
    assert any(e["kind"] == "history" for e in body["timeline"])
    assert client.get("/api/tasks/t-unknown-1").status_code == 404
    for bad in (".hidden", "a" * 200, "bad%20id", "x<y>"):
        assert client.get(f"/api/tasks/{bad}").status_code == 400, bad


def test_workers_dead_letters_and_events(client: TestClient, home: Home) -> None:
    spec = active_worker(home)
    rows = client.get("/api/workers").json()
    assert [r["worker_id"] for r in rows] == [spec["worker_id"]]
    assert rows[0]["spec"]["instance"] == "7" and "heartbeat_age_s" in rows[0]
    dead = dead_letter(home)
    assert [d["task_id"] for d in client.get("/api/dead-letters").json()] == [dead]
    emit(home, "deploy_started", message="password=hunter2 now")
    events = client.get("/api/events", params={"since": "-60"}).json()
    assert events[-1]["type"] == "deploy_started"
    assert "hunter2" not in events[-1]["message"]
    later = client.get("/api/events", params={"since": "2999-01-01T00:00:00.000Z"}).json()
    assert later == []
    assert len(client.get("/api/events", params={"limit": 1}).json()) == 1
    assert client.get("/api/events", params={"since": "yesterday"}).status_code == 400
    assert client.get("/api/events", params={"limit": 0}).status_code == 400


# ---------------------------------------------------------------------------- writes
def test_writes_need_the_token(client: TestClient, home: Home) -> None:
    task_id = add(home)
    url = f"/api/tasks/{task_id}/cancel"
    r = client.post(url)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post(url, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}
                       ).status_code == 403
    assert client.post(url, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert TaskQueue(home).get(task_id)["status"] == "queued"  # type: ignore[index]
    for path in (f"/api/tasks/{task_id}/retry", f"/api/tasks/{task_id}/priority",
                 "/api/types/default/pause", "/api/types/default/resume",
                 "/api/workers/worker-1/drain"):
        assert client.post(path).status_code == 401, path
    assert read_control(home)["paused_types"] == {}


def test_read_only_dashboard_refuses_every_write(home: Home) -> None:
    task_id = add(home)
    with TestClient(create_app(home, token=None, allowed_hosts=None)) as ro:
        r = ro.post(f"/api/tasks/{task_id}/cancel", headers=AUTH)
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        assert ro.get("/api/status").status_code == 200
        assert "read-only" in ro.get("/").text
    assert TaskQueue(home).get(task_id)["status"] == "queued"  # type: ignore[index]


def test_cancel_priority_and_retry(client: TestClient, home: Home) -> None:
    queue = TaskQueue(home)
    task_id = add(home)
    r = client.post(f"/api/tasks/{task_id}/priority", headers=AUTH,
                    json={"priority": "critical"})
    assert r.status_code == 200 and queue.get(task_id)["priority"] == "critical"  # type: ignore[index]
    assert client.post(f"/api/tasks/{task_id}/priority", headers=AUTH,
                       json={"priority": "urgent"}).status_code == 400
    r = client.post(f"/api/tasks/{task_id}/cancel", headers=AUTH, json={"reason": "no longer"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert queue.get(task_id)["status"] == "cancelled"  # type: ignore[index]
    assert client.post(f"/api/tasks/{task_id}/cancel", headers=AUTH).status_code in (404, 409)
    dead = dead_letter(home)
    r = client.post(f"/api/tasks/{dead}/retry", headers=AUTH)
    assert r.status_code == 200 and queue.get(dead)["status"] == "queued"  # type: ignore[index]
    assert client.post(f"/api/tasks/{dead}/retry", headers=AUTH).status_code in (404, 409)
    assert client.post(f"/api/tasks/{task_id}/explode", headers=AUTH).status_code == 404
    assert client.post(f"/api/tasks/{task_id}/cancel", headers=AUTH,
                       content=b"[1]").status_code == 400
    for bad in (".x", "x" * 129, "a%2Fb"):
        assert client.post(f"/api/tasks/{bad}/cancel", headers=AUTH).status_code in (400, 404)
    assert client.post("/api/tasks/.x/cancel", headers=AUTH).status_code == 400


def test_pause_resume_and_drain(client: TestClient, home: Home) -> None:
    r = client.post("/api/types/default/pause", headers=AUTH,
                    json={"duration_s": 60, "reason": "maintenance"})
    assert r.status_code == 200 and r.json()["until"] is not None
    assert read_control(home)["paused_types"]["default"]["reason"] == "maintenance"
    assert client.post("/api/types/nosuchtype/pause", headers=AUTH).status_code == 400
    assert client.post("/api/types/default/pause", headers=AUTH,
                       json={"duration_s": "soon"}).status_code == 400
    r = client.post("/api/types/default/resume", headers=AUTH)
    assert r.json() == {"worker_type": "default", "was_paused": True}
    assert read_control(home)["paused_types"] == {}
    spec = active_worker(home, instance="7")
    r = client.post(f"/api/workers/{spec['worker_id']}/drain", headers=AUTH)
    assert r.status_code == 200 and r.json()["drain"] == "7"
    assert "7" in read_control(home)["drain"]["instances"]
    assert client.post("/api/workers/worker-gone/drain", headers=AUTH).status_code == 404
    assert client.post("/api/workers/.bad/drain", headers=AUTH).status_code == 400


# ---------------------------------------------------------------------------- pages
def test_pages_render_escaped_with_a_strict_policy(client: TestClient, home: Home) -> None:
    task_id = add(home, description=HOSTILE)
    dead_letter(home, description=HOSTILE)
    active_worker(home)
    emit(home, "note", message=HOSTILE)
    for path in ("/", "/tasks", f"/tasks/{task_id}", "/workers", "/dead-letters", "/events"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "<img" not in r.text, path
        assert ("<script>" not in r.text and "onerror=alert(1)&gt;" in r.text) or \
            path in ("/", "/workers"), path
    page = client.get(f"/tasks/{task_id}").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    fragment = client.get(f"/tasks/{task_id}", headers={"X-Harness-Fragment": "1"}).text
    assert "<html" not in fragment and 'id="task-status"' in fragment
    overview = client.get("/").text
    assert 'id="chart-throughput"' in overview and 'id="chart-priority"' in overview
    assert client.get("/static/app.js").headers["content-type"].startswith(
        ("text/javascript", "application/javascript"))
    missing = client.get("/tasks/t-nothing-here")
    assert missing.status_code == 404 and "no task t-nothing-here" in missing.text
    assert client.get("/tasks/%3Cimg%3E").status_code == 400


def _csrf(client: TestClient) -> str:
    client.get("/")
    value = client.cookies.get(auth.CSRF_COOKIE)
    assert value
    return value


def test_form_writes_need_csrf_same_origin_and_token(client: TestClient, home: Home) -> None:
    task_id = add(home)
    csrf = _csrf(client)
    base = {"id": task_id, "next": f"/tasks/{task_id}"}
    r = client.post("/forms/tasks/cancel", data={**base, "token": TOKEN},
                    follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/forms/tasks/cancel", data={**base, "token": TOKEN, "csrf": csrf},
                    headers={"Origin": "http://evil.example"}, follow_redirects=False)
    assert r.status_code == 403
    r = client.post("/forms/tasks/cancel", data={**base, "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 401
    r = client.post("/forms/tasks/cancel", data={**base, "csrf": csrf, "token": "x" * 20},
                    follow_redirects=False)
    assert r.status_code == 403
    assert TaskQueue(home).get(task_id)["status"] == "queued"  # type: ignore[index]
    r = client.post("/forms/tasks/cancel", data={**base, "csrf": csrf, "token": TOKEN},
                    headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/tasks/{task_id}?done=cancel"
    assert TaskQueue(home).get(task_id)["status"] == "cancelled"  # type: ignore[index]
    r = client.post("/forms/tasks/cancel", data={"id": task_id, "next": "//evil.example/x",
                                                 "csrf": csrf, "token": TOKEN},
                    follow_redirects=False)
    assert r.status_code in (404, 409)


def test_unknown_host_header_is_refused(home: Home) -> None:
    with TestClient(create_app(home, token=TOKEN)) as c:  # loopback names only
        r = c.get("/api/status")
        assert r.status_code == 400 and "not allowed" in r.text
        assert r.headers["content-security-policy"] == CSP
        assert c.get("/api/status", headers={"Host": "127.0.0.1:8765"}).status_code == 200
        assert c.get("/api/status", headers={"Host": "[::1]:8765"}).status_code == 200
    assert host_name("LOCALHOST:1") == "localhost" and host_name("[::1]") == "::1"


# ---------------------------------------------------------------------------- token
def test_token_from_env_or_a_private_file(home: Home) -> None:
    assert auth.load_token(home, {}) is None
    assert auth.load_token(home, {auth.TOKEN_ENV: TOKEN}) == TOKEN
    with pytest.raises(ConfigError, match="at least 16"):
        auth.load_token(home, {auth.TOKEN_ENV: "short"})
    path = auth.token_file(home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, f"{TOKEN}\n".encode())
    os.close(fd)
    os.chmod(path, 0o600)
    assert auth.load_token(home, {}) == TOKEN
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.load_token(home, {})
    os.unlink(path)
    os.symlink(home.system_config, path)
    with pytest.raises(ConfigError):
        auth.load_token(home, {})


# ---------------------------------------------------------------------------- listen
def test_listen_address_rules(home: Home) -> None:
    assert server.parse_listen("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert server.parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8765", "host:port", "127.0.0.1:70000", ":80"):
        with pytest.raises(UsageError):
            server.parse_listen(bad)
    with pytest.raises(UsageError, match="non-loopback"):
        server.open_listener("0.0.0.0:0", token=None, environ={})
    listener = server.open_listener("127.0.0.1:0", token=None, environ={})
    try:
        assert listener.port > 0 and listener.url.startswith("http://127.0.0.1:")
    finally:
        listener.sock.close()
    wide = server.open_listener("0.0.0.0:0", token=TOKEN, environ={})
    wide.sock.close()


ACTIVATION_SCRIPT = """
import os, socket
from coordination.errors import UsageError
from daemons.web import server
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
os.open(os.devnull, os.O_RDONLY)  # takes fd 3, so that each socket is dup2'ed onto it
for host in ("127.0.0.1", "0.0.0.0"):
    sock = socket.create_server((host, 0))
    os.dup2(sock.fileno(), 3)
    try:
        listener = server.open_listener("127.0.0.1:1", token=None, environ=env)
        print(host, listener.activated, listener.port == sock.getsockname()[1])
        listener.sock.close()
    except UsageError as exc:
        print(host, "refused", "not loopback" in str(exc))
    sock.close()
"""


def test_socket_from_systemd_is_used() -> None:
    """fd 3 with LISTEN_PID/LISTEN_FDS (in a child: fd 3 is the test runner's own here)."""
    proc = subprocess.run([sys.executable, "-c", ACTIVATION_SCRIPT], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT, check=False)
    assert proc.stdout.splitlines() == ["127.0.0.1 True True", "0.0.0.0 refused True"], \
        proc.stderr


# ---------------------------------------------------------------------------- live feed
def test_change_feed_wakes_clients_on_a_write_by_another_process(home: Home) -> None:
    async def scenario() -> tuple[bytes, bytes, bytes]:
        feed = ChangeFeed(home, settle_s=0.0)
        await feed.start()
        try:
            stream = feed.stream()
            hello = await anext(stream)
            await asyncio.to_thread(add, home)
            change = await asyncio.wait_for(anext(stream), 5)
            feed.close()
            rest = b"".join([chunk async for chunk in stream])
            return hello, change, rest
        finally:
            await feed.stop()

    hello, change, rest = asyncio.run(scenario())
    assert hello.startswith(b"retry: 2000\nevent: hello\ndata: 0")
    assert re.match(rb"event: change\ndata: \d+\n\n", change)
    assert b"event: change" not in rest or rest.count(b"event") <= 2


def test_doctor_finds_and_repairs_a_loose_token_file(home: Home) -> None:
    from coordination.doctor import check

    path = auth.token_file(home)
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o644)
    report = check(home)
    assert [f.code for f in report.open("error")] == ["web_token_mode"]
    repaired = check(home, repair=True)
    assert any(f.code == "web_token_mode" and f.repaired for f in repaired.findings)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert check(home).clean and auth.load_token(home, {}) == TOKEN


def test_task_page_follows_the_task_through_its_life(client: TestClient, home: Home) -> None:
    """The remembered attempts and timeline are recomputed when the task changes."""
    queue = TaskQueue(home)
    task_id = add(home, max_attempts=2)
    first = client.get(f"/api/tasks/{task_id}").json()
    assert (first["task"]["status"], first["attempts"], first["live"]) == ("queued", [], True)
    queue.claim("worker-1-x")
    queue.fail(task_id, "worker-1-x", error="flaky", exit_code=1)  # retried
    retried = client.get(f"/api/tasks/{task_id}").json()
    assert [r["outcome"] for r in retried["attempts"]] == ["failed"]
    assert retried["task"]["attempts"] == 1 and retried["live"]
    queue.claim("worker-1-x", now=__import__("time").time() + 3600)  # past any backoff
    queue.fail(task_id, "worker-1-x", error="again", exit_code=1)  # the last attempt
    dead = client.get(f"/api/tasks/{task_id}").json()
    assert dead["dead_letter"] and not dead["live"] and len(dead["attempts"]) == 2
    assert dead["task"]["status"] == "failed"


def test_unknown_routes_and_methods(client: TestClient) -> None:
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json()["status"] == 404
    page = client.get("/nothing")
    assert page.status_code == 404 and 'id="error-message"' in page.text
    assert page.headers["content-security-policy"] == CSP
    assert client.get("/api/tasks/t-1/cancel").status_code == 405
    assert client.post("/forms/nothing/cancel", data={}).status_code == 403  # CSRF first


def test_render_cache_shares_one_render() -> None:
    from daemons.web.pages import RenderCache

    calls: list[int] = []

    def render() -> str:
        calls.append(1)
        __import__("time").sleep(0.05)
        return "page"

    async def scenario() -> list[str]:
        cache = RenderCache()
        key = ("/?", True, 7)
        first = await asyncio.gather(*(cache.get(key, render) for _ in range(10)))
        again = await cache.get(key, render)
        other = await cache.get(("/?", True, 8), render)
        return [*first, again, other]

    assert asyncio.run(scenario()) == ["page"] * 12
    assert len(calls) == 2  # one per generation
