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
from helpers import skip_reason

from coordination.errors import HarnessError, UsageError
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
        pytest.skip(skip_reason("systemd-analyze"))
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


@pytest.mark.parametrize("name", ["harness-worker@.service", "sandbox.inc",
                                  "sandbox-offline.inc"])
def test_every_non_default_line_has_a_why_comment(name: str) -> None:
    """The shipped worker unit and the sandbox fragments every service includes explain
    each setting on the comment line(s) above it."""
    text = (TEMPLATES / name).read_text()
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
                           harness_bin=" ".join(BIN), sandbox=sandbox, reload=False,
                           create_user=False, polkit_dir=None)
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


#: `systemd-analyze security` exposure targets (docs/security.md): the worker keeps the
#: network, W^X off (JITs) and @resources for its tasks; every other service is offline.
EXPOSURE_TARGETS = {"harness-worker@.service": 3.0}
EXPOSURE_DEFAULT = 2.0


def exposure(unit: Path) -> float:
    """The overall exposure ``systemd-analyze security --offline=true`` prints last."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip(skip_reason("systemd-analyze"))
    proc = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1))


@pytest.mark.parametrize("scope", ["system", "user"])
def test_rendered_units_meet_the_exposure_targets(tmp_path: Path, scope: str) -> None:
    """Every service, as `harness systemd install` renders it, scores at most its target;
    the system units run as the unprivileged service user."""
    out = tmp_path / "units"
    install_units(Path("/srv/harness"), scope=scope, unit_dir=out, harness_bin=" ".join(BIN),
                  reload=False, create_user=False, polkit_dir=None)
    scores = {}
    for unit in sorted(out.glob("*.service")):
        scores[unit.name] = exposure(unit)
        active = [ln for ln in unit.read_text().splitlines() if not ln.startswith("#")]
        if scope == "system":
            assert "User=harness" in active and "Group=harness" in active, unit.name
        else:
            assert not any(ln.startswith(("User=", "Group=")) for ln in active), unit.name
    print(scores)
    assert len(scores) == 6  # worker, supervisor, janitor, metrics, idle-stop, web
    for name, score in scores.items():
        assert score <= EXPOSURE_TARGETS.get(name, EXPOSURE_DEFAULT), (name, score)
    # The targets are what they are because the sandbox is there: without it (the
    # --no-sandbox rendering keeps only what needs no namespace) the worker is far worse.
    bare = tmp_path / "bare"
    install_units(Path("/srv/harness"), scope=scope, unit_dir=bare, harness_bin=" ".join(BIN),
                  reload=False, create_user=False, sandbox=False, polkit_dir=None)
    assert exposure(bare / "harness-worker@.service") > scores["harness-worker@.service"]


def test_worker_sandbox_keeps_what_tasks_need() -> None:
    [unit] = [u for u in render_units(Path("/srv/harness"), harness_argv=BIN, scope="system")
              if u.name == "harness-worker@.service"]
    active = [ln for ln in unit.text.splitlines() if ln and not ln.startswith("#")]
    families = [ln for ln in active if ln.startswith("RestrictAddressFamilies=")]
    assert families == ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert not any(ln.startswith(("MemoryDenyWriteExecute=", "PrivateNetwork=",
                                  "IPAddressDeny=")) for ln in active)
    assert "SystemCallFilter=~@resources" not in active  # setrlimit, nice for tasks
    for line in ("CapabilityBoundingSet=", "SystemCallFilter=@system-service",
                 "SystemCallArchitectures=native", "RestrictNamespaces=yes",
                 "PrivateDevices=yes", "PrivateTmp=yes", "ReadWritePaths=/srv/harness"):
        assert line in active, line


def test_service_user_creation_dry_run_and_names(tmp_path: Path) -> None:
    from daemons.systemd_units import ensure_service_user

    home = tmp_path / "home"
    home.mkdir()
    actions = ensure_service_user("harness-no-such-user", "harness-no-such-user", home,
                                  dry_run=True)
    assert actions[0].startswith("useradd --system") and actions[0].endswith(
        "harness-no-such-user")
    assert f"--home-dir {home}" in actions[0]
    assert actions[1] == f"chown -R harness-no-such-user:harness-no-such-user {home}"
    with pytest.raises(UsageError, match="--service-user"):
        install_units(home, scope="system", unit_dir=tmp_path / "u", harness_bin="/bin/true",
                      reload=False, service_user="Root; rm", polkit_dir=None)
    with pytest.raises(UsageError, match="never root"):
        install_units(home, scope="system", unit_dir=tmp_path / "u", harness_bin="/bin/true",
                      reload=False, service_user="root", polkit_dir=None, dry_run=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a system user needs root")
def test_system_install_creates_the_service_user_and_hands_it_the_home(
        tmp_path: Path) -> None:
    import pwd

    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd/userdel (apt install passwd)")
    name = f"hns{os.getpid()}"
    home = tmp_path / "home"
    (home / "coordination").mkdir(parents=True)
    (home / "coordination" / "x.json").write_text("{}")
    try:
        report = install_units(home, scope="system", unit_dir=tmp_path / "u",
                               harness_bin="/bin/true", reload=False, service_user=name,
                               polkit_dir=tmp_path / "polkit")
        entry = pwd.getpwnam(name)
        assert entry.pw_uid != 0 and entry.pw_dir == str(home)
        assert entry.pw_shell.endswith(("nologin", "false"))
        assert (home / "coordination" / "x.json").stat().st_uid == entry.pw_uid
        assert any(a.startswith("useradd") for a in report.user_actions)
        again = install_units(home, scope="system", unit_dir=tmp_path / "u",
                              harness_bin="/bin/true", reload=False, service_user=name,
                              polkit_dir=tmp_path / "polkit")
        assert again.user_actions == []  # exists and owns the home: nothing to do
        assert f"User={name}" in (tmp_path / "u" / "harness-worker@.service").read_text()
        rule = (tmp_path / "polkit" / f"50-harness-{name}.rules").read_text()
        assert f'subject.user != "{name}"' in rule and "harness-worker@" in rule
        assert "StartTransientUnit" not in rule and '"start", "stop", "restart", "kill"' in rule
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)


def test_cli_system_dry_run_and_dropins(tmp_path: Path) -> None:
    """--system --dry-run says what it would do to the accounts and writes nothing;
    --print-dropin prints a drop-in systemd accepts (it is a [Service] section)."""
    from daemons.cli import cli

    home = tmp_path / "home"
    home.mkdir()
    runner = CliRunner()
    dry = runner.invoke(cli, ["systemd", "install", "--system", "--dry-run", "--home",
                              str(home), "--service-user", "harness-no-such-user",
                              "--unit-dir", str(tmp_path / "u"),
                              "--polkit-dir", str(tmp_path / "p")])
    assert dry.exit_code == 0, dry.output
    assert "would run: useradd --system" in dry.output
    assert "User=harness-no-such-user" in dry.output
    assert not (tmp_path / "u").exists() and not (tmp_path / "p").exists()
    for name in ("devices", "namespaces", "home", "kernel-protections"):
        out = runner.invoke(cli, ["systemd", "install", "--print-dropin", name])
        assert out.exit_code == 0 and "\n[Service]\n" in out.output, out.output
        keys = [ln.split("=", 1)[0] for ln in out.output.splitlines()
                if ln and not ln.startswith(("#", "["))]
        assert keys, name
    bad = runner.invoke(cli, ["systemd", "install", "--print-dropin", "everything"])
    assert bad.exit_code == 2


POLKIT_SHIM = """
let rule = null;
const polkit = {Result: {YES: "yes", NOT_HANDLED: "not_handled"}, addRule: f => { rule = f; }};
%s
const cases = JSON.parse(process.argv[2]);
console.log(JSON.stringify(cases.map(([id, user, unit, verb]) => rule(
    {id: id, lookup: k => ({unit: unit, verb: verb})[k]}, {user: user}))));
"""


def test_polkit_rule_allows_only_worker_units(tmp_path: Path) -> None:
    """The rule, run by node against a stand-in for polkit: the service user may start,
    stop, restart and kill harness-worker@ units; not other units, not transient units (no
    unit name), not other users."""
    import json

    from daemons.systemd_units import polkit_rule

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("needs node to evaluate the polkit rule (apt install nodejs)")
    manage = "org.freedesktop.systemd1.manage-units"
    cases = [[manage, "harness", "harness-worker@3.service", "start"],
             [manage, "harness", "harness-worker@t-1.service", "kill"],
             [manage, "harness", "harness-worker@3.service", "stop"],
             [manage, "harness", "ssh.service", "stop"],
             [manage, "harness", "harness-worker@3.service.evil", "start"],
             [manage, "harness", None, None],  # StartTransientUnit: no unit detail
             [manage, "mallory", "harness-worker@3.service", "start"],
             ["org.freedesktop.systemd1.manage-unit-files", "harness", None, None]]
    script = tmp_path / "rule.js"
    script.write_text(POLKIT_SHIM % polkit_rule("harness"))
    proc = subprocess.run([node, str(script), json.dumps(cases)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["yes", "yes", "yes"] + ["not_handled"] * 5


def test_system_install_warns_when_the_service_user_cannot_reach_the_home(
        tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    home = closed / "home"
    home.mkdir(parents=True)
    closed.chmod(0o700)
    try:
        report = install_units(home, scope="system", unit_dir=tmp_path / "u",
                               harness_bin="/bin/true", reload=False, create_user=False,
                               polkit_dir=None, dry_run=True)
        assert any(str(closed) in w and "cannot reach the home" in w
                   for w in report.warnings), report.warnings
        closed.chmod(0o711)
        report = install_units(home, scope="system", unit_dir=tmp_path / "u",
                               harness_bin="/bin/true", reload=False, create_user=False,
                               polkit_dir=None, dry_run=True)
        # (pytest's own tmp directories are 0700 too: only ours must no longer be named)
        assert not any(f"{closed}," in w or f"{closed} lack" in w for w in report.warnings)
    finally:
        closed.chmod(0o755)


def test_units_take_the_database_url_from_an_environment_file_only() -> None:
    """Every service reads the home's database.env (optional), none names a URL; on a
    postgres home the offline sandbox no longer cuts the daemons off the database."""
    home = Path("/srv/harness")
    env_line = f"EnvironmentFile=-{home}/coordination/config/database.env"
    for database in (False, True):
        for unit in render_units(home, harness_argv=BIN, database=database):
            if not unit.name.endswith(".service"):
                continue
            lines = unit.text.splitlines()
            assert env_line in lines, unit.name
            assert not any("HARNESS_DATABASE_URL=" in ln or "postgresql://" in ln
                           for ln in lines if not ln.startswith("#")), unit.name
            active = [ln for ln in lines if not ln.startswith("#")]
            cuts = [ln for ln in active if ln.split("=", 1)[0] in
                    ("PrivateNetwork", "IPAddressDeny")]
            families = [ln for ln in active if ln.startswith("RestrictAddressFamilies=")]
            if database:
                assert cuts == [], unit.name
                assert all("AF_INET" in ln.split("=", 1)[1].split() for ln in families)
    offline = next(u for u in render_units(home, harness_argv=BIN)
               if u.name == "harness-supervisor.service")
    assert "PrivateNetwork=yes" in offline.text.splitlines()


def test_a_template_that_sets_the_database_url_is_refused() -> None:
    text = "[Service]\nEnvironment=HARNESS_DATABASE_URL=postgresql://u:pw@db/h\n"
    with pytest.raises(HarnessError, match="EnvironmentFile"):
        render_unit(text, name="bad.service", harness_argv=BIN, home=Path("/srv/h"))


def test_install_on_a_postgres_home_renders_database_units(tmp_path: Path) -> None:
    from helpers import make_home

    home = make_home(tmp_path, queue_backend="postgres",
                     database_url="postgresql://harness@db.invalid/harness")
    report = install_units(home.root, scope="user", dry_run=True, unit_dir=tmp_path / "u",
                           harness_bin=" ".join(BIN))
    sup = next(u for u in report.units if u.name == "harness-supervisor.service")
    assert "PrivateNetwork=yes" not in sup.text.splitlines()
    assert any("database.env" in w for w in report.warnings)
    assert "db.invalid" not in "".join(u.text for u in report.units)
