"""Rendering and installing the systemd units; every rendered unit passes systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordination.errors import HarnessError
from daemons.systemd_units import (
    default_unit_dir,
    install_units,
    render_unit,
    render_units,
    systemd_quote,
    template_dir,
)

TEMPLATES = template_dir()
BIN = [sys.executable, "-m", "daemons"]


def analyze(unit_dir: Path, tmp_path: Path, *, user: bool) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    env = dict(os.environ)
    if user:
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    files = sorted(str(p) for p in unit_dir.iterdir() if not p.name.startswith("."))
    argv = [exe, *(["--user"] if user else []), "verify", *files]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                          check=False)


def test_templates_exist_and_have_no_stray_placeholders() -> None:
    names = sorted(p.name for p in TEMPLATES.iterdir())
    assert "harness-worker@.service" in names and "harness.target" in names
    for unit in render_units(Path("/srv/harness"), harness_argv=BIN):
        assert "@HARNESS_" not in unit.text, unit.name


def test_every_non_default_line_has_a_why_comment() -> None:
    """The shipped worker unit explains each setting on the comment line(s) above it."""
    text = (TEMPLATES / "harness-worker@.service").read_text()
    previous = ""
    undocumented = []
    for line in text.splitlines():
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", ";")):
            key = stripped.split("=", 1)[0]
            if key not in ("Description", "Documentation") and not previous.startswith("#"):
                undocumented.append(key)
        previous = stripped
    assert not undocumented


def test_worker_unit_settings() -> None:
    [unit] = [u for u in render_units(Path("/srv/harness"), harness_argv=BIN)
              if u.name == "harness-worker@.service"]
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in unit.text.splitlines()
             if "=" in ln and not ln.startswith("#")}
    assert lines["ExecStart"] == (f"{sys.executable} -m daemons worker run --instance %i "
                                  "--home /srv/harness")
    expected = {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30",
                "Restart": "on-failure", "RestartSec": "2", "KillMode": "mixed",
                "KillSignal": "SIGTERM", "TimeoutStopSec": "45", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "ReadWritePaths": "/srv/harness",
                "PrivateTmp": "yes", "ProtectHome": "read-only", "UMask": "0027",
                "PartOf": "harness.target", "ExecReload": "/bin/kill -HUP $MAINPID"}
    for key, value in expected.items():
        assert lines.get(key) == value, key
    assert "StartLimitIntervalSec" in lines and "StartLimitBurst" in lines


def test_generic_rendering_of_new_templates(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "harness-janitor.timer").write_text("[Timer]\nOnCalendar=hourly\n")
    (src / "harness-janitor.service").write_text(
        "[Service]\nExecStart=@HARNESS_BIN@ janitor run --home @HARNESS_HOME@\n")
    (src / "README.md").write_text("not a unit @HARNESS_NOPE@\n")
    units = render_units(tmp_path / "my home", harness_argv=["/opt/h b/harness"], source=src)
    assert [u.name for u in units] == ["harness-janitor.service", "harness-janitor.timer"]
    assert f'ExecStart="/opt/h b/harness" janitor run --home "{tmp_path}/my home"' \
        in units[0].text
    (src / "bad.service").write_text("[Service]\nExecStart=@HARNESS_PYTHON@ x\n")
    with pytest.raises(HarnessError, match="@HARNESS_PYTHON@"):
        render_units(tmp_path, harness_argv=["/bin/true"], source=src)


def test_quoting() -> None:
    assert systemd_quote("/a/b") == "/a/b"
    assert systemd_quote("/a/100%") == "/a/100%%"
    assert systemd_quote('/a b/"c"') == '"/a b/\\"c\\""'


def test_no_sandbox_and_home_under_tmp() -> None:
    text = (TEMPLATES / "harness-worker@.service").read_text()
    notes: list[str] = []
    off = render_unit(text, name="w", harness_argv=BIN, home=Path("/srv/h"), sandbox=False,
                      warnings=notes)
    active = [ln for ln in off.splitlines() if not ln.startswith("#")]
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths"):
        assert not any(ln.startswith(key + "=") for ln in active), key
    assert "NoNewPrivileges=yes" in active and "UMask=0027" in active
    assert "#ProtectSystem=strict" in off
    assert not notes
    tmp = render_unit(text, name="w", harness_argv=BIN, home=Path("/tmp/x/home"),
                      warnings=notes)
    assert "PrivateTmp=no" in tmp.splitlines() and "ProtectSystem=strict" in tmp.splitlines()
    assert notes and "PrivateTmp" in notes[0]
    # /tmpfoo is not under /tmp
    notes.clear()
    render_unit(text, name="w", harness_argv=BIN, home=Path("/tmpfoo/h"), warnings=notes)
    assert not notes


@pytest.mark.parametrize("user", [True, False], ids=["user", "system"])
@pytest.mark.parametrize("sandbox", [True, False], ids=["sandbox", "no-sandbox"])
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool,
                                                    sandbox: bool) -> None:
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "units"
    report = install_units(home, scope="user" if user else "system", unit_dir=out,
                           harness_bin=" ".join(BIN), sandbox=sandbox, reload=False)
    assert sorted(p.name for p in report.written) == sorted(
        p.name for p in TEMPLATES.iterdir()
        if p.suffix in (".service", ".socket", ".target", ".timer"))
    proc = analyze(out, tmp_path, user=user)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "harness-worker@" not in proc.stderr, proc.stderr


def test_default_unit_dirs(tmp_path: Path) -> None:
    assert default_unit_dir("system") == Path("/etc/systemd/system")
    assert default_unit_dir("user", {"XDG_CONFIG_HOME": str(tmp_path)}) == \
        tmp_path / "systemd" / "user"
    assert default_unit_dir("user", {"HOME": "/home/u"}) == Path("/home/u/.config/systemd/user")


def test_cli_install_dry_run_and_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from daemons.cli import cli

    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    runner = CliRunner()
    dry = runner.invoke(cli, ["systemd", "install", "--user", "--dry-run", "--home", str(home)])
    assert dry.exit_code == 0, dry.output
    assert "ExecStart=" in dry.output and f"ReadWritePaths={home}" in dry.output
    assert not config.exists()
    assert re.search(r"ExecStart=\S+ .*worker run --instance %i", dry.output)
    wrote = runner.invoke(cli, ["systemd", "install", "--user", "--no-reload",
                                "--home", str(home)])
    assert wrote.exit_code == 0, wrote.output
    unit = config / "systemd" / "user" / "harness-worker@.service"
    assert unit.is_file() and f"--home {home}" in unit.read_text()
    missing = runner.invoke(cli, ["systemd", "install", "--home", str(home)])
    assert missing.exit_code == 2
