"""harness-web.socket and harness-web.service under a real, private systemd user manager
(the manager and the installed units are the fixtures of tests/test_systemd_real.py).

The socket is moved to a free port with a drop-in, as an operator would; the first
connection starts the sandboxed service, which serves the home on the passed socket.

In a container whose /proc/sys is a locked read-only mount, ProtectKernelTunables= and
ProtectKernelLogs= cannot be set up (the service fails with 226/NAMESPACE); the test then
turns exactly those two off with a drop-in (what docs/web.md tells operators of such hosts
to do) and says so. Every other setting of the sandboxed unit stays on.
"""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

import orjson
import pytest
from user_manager import UserManager

pytestmark = pytest.mark.systemd

SERVICE = "harness-web.service"
CONTAINER_DROPIN = "[Service]\nProtectKernelTunables=no\nProtectKernelLogs=no\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _activate(mgr: UserManager, port: int, timeout: float = 60.0) -> tuple[int, bytes] | None:
    """Start the socket, connect; the answer, or None when the service failed to start."""
    mgr.systemctl("start", "harness-web.socket")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return _get(port, "/api/status")
        except OSError:
            pass
        if mgr.show(SERVICE, "ExecMainStatus").get("ExecMainStatus") == "226":
            return None
        time.sleep(0.1)
    raise AssertionError(f"no answer within {timeout}s: "
                         f"{mgr.show(SERVICE, 'ActiveState', 'Result')}\n{mgr.log_tail()}")


def test_socket_activation_starts_the_sandboxed_dashboard(fleet: UserManager) -> None:
    mgr = fleet
    port = _free_port()
    units = Path(mgr.env["XDG_CONFIG_HOME"]) / "systemd" / "user"
    (units / "harness-web.socket.d").mkdir(parents=True, exist_ok=True)
    (units / "harness-web.socket.d" / "port.conf").write_text(
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    mgr.systemctl("daemon-reload")
    try:
        assert mgr.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
        answer = _activate(mgr, port)
        if answer is None:
            print("harness-web.service failed with 226/NAMESPACE here; turning off "
                  f"ProtectKernelTunables/ProtectKernelLogs. Manager log:\n{mgr.log_tail(1500)}")
            mgr.systemctl("stop", "harness-web.socket", SERVICE, check=False)
            mgr.systemctl("reset-failed", SERVICE, check=False)
            (units / f"{SERVICE}.d").mkdir(exist_ok=True)
            (units / f"{SERVICE}.d" / "container.conf").write_text(CONTAINER_DROPIN)
            mgr.systemctl("daemon-reload")
            answer = _activate(mgr, port)
        assert answer is not None, mgr.log_tail()
        status, body = answer
        state = mgr.show(SERVICE, "ActiveState", "MainPID")
        assert status == 200, (body, state)
        assert orjson.loads(body)["home"] == str(mgr.home.root)
        assert state["ActiveState"] == "active", (state, mgr.log_tail())
        page_status, page = _get(port, "/")
        assert page_status == 200 and b'id="live"' in page
        mgr.systemctl("stop", SERVICE)
        after = mgr.show(SERVICE, "ActiveState", "Result")
        assert after["ActiveState"] == "inactive" and after["Result"] == "success", after
    finally:
        mgr.systemctl("stop", "harness-web.socket", SERVICE, check=False)
