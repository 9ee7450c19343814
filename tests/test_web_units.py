"""harness-web.socket and harness-web.service: rendered with the other units, documented
line by line, hardened (systemd-analyze security), and `harness web` really serves on a
socket passed the systemd way (LISTEN_FDS, via systemd-socket-activate)."""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from helpers import ProcGroup, daemon_env, make_home, skip_reason, wait_until

from daemons.systemd_units import render_units, template_dir

BIN = [sys.executable, "-m", "daemons"]
#: The exposure systemd-analyze may give harness-web.service at most (0 best, 10 worst).
MAX_EXPOSURE = 2.0


def _rendered(name: str) -> str:
    [unit] = [u for u in render_units(Path("/srv/harness"), harness_argv=BIN) if u.name == name]
    return unit.text


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_web_units_render_and_explain_every_line() -> None:
    for name in ("harness-web.service", "harness-web.socket"):
        commented = False  # a comment above, in the same block of lines
        for line in (template_dir() / name).read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("["):
                commented = False
            elif stripped.startswith(("#", ";")):
                commented = True
            elif stripped.split("=", 1)[0] not in ("Description", "Documentation"):
                assert commented, (name, stripped)
    service = _settings(_rendered("harness-web.service"))
    assert service["ExecStart"] == [f"{sys.executable} -m daemons web --home /srv/harness "
                                    "--log-level info"]
    assert service["ReadWritePaths"] == ["/srv/harness"]
    assert service["CapabilityBoundingSet"] == [""] and service["NoNewPrivileges"] == ["yes"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in service["SystemCallFilter"]
    assert service["Requires"] == ["harness-web.socket"]
    sock = _settings(_rendered("harness-web.socket"))
    assert sock["ListenStream"] == ["127.0.0.1:8765"] and sock["Accept"] == ["no"]


def test_web_service_exposure_is_low(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip(skip_reason("systemd-analyze"))
    unit = tmp_path / "harness-web.service"
    unit.write_text(_rendered("harness-web.service"))
    proc = subprocess.run([exe, "security", "--offline=true", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    if found is None and "--offline" in proc.stderr:
        pytest.skip(skip_reason("systemd-analyze") + ": security --offline (systemd >= 250)")
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_serves_on_a_socket_passed_by_systemd(tmp_path: Path, procs: ProcGroup) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip(skip_reason("systemd-socket-activate"))
    home = make_home(tmp_path)
    with socket.socket() as probe:  # a free port; systemd-socket-activate binds it again
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = Path(sys.executable).with_name("harness")
    argv = [str(exe)] if exe.exists() else BIN
    child = procs.spawn("activate", [activate, "-l", f"127.0.0.1:{port}", *argv, "web",
                                     "--home", str(home.root), "--listen", "127.0.0.1:1"],
                        env=daemon_env())

    def status() -> dict[str, object] | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/status")
            body = conn.getresponse().read()
            conn.close()
        except OSError:
            return None
        parsed: dict[str, object] = orjson.loads(body)
        return parsed

    body = wait_until(status, 60, "the dashboard on the activated socket", interval=0.1)
    assert body["home"] == str(home.root)
    assert "(socket from systemd)" in child.wait_for_line("harness web: serving")
    child.kill(signal.SIGTERM)
    assert child.wait(15) in (0, -signal.SIGTERM), child.stderr()


def test_non_loopback_listen_needs_a_token(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    proc = subprocess.run([*BIN, "web", "--home", str(home.root), "--listen", "0.0.0.0:0"],
                          capture_output=True, text=True, timeout=60, env=daemon_env(),
                          check=False)
    assert proc.returncode == 2 and "non-loopback" in proc.stderr, proc.stderr
