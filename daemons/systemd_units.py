"""Render and install the systemd units shipped in ``systemd/``.

Every ``*.service``, ``*.socket``, ``*.target`` and ``*.timer`` in the template directory is
rendered the same way, so units added later need no code here:

- ``@HARNESS_BIN@`` becomes the command that runs harness (``shutil.which("harness")``, else
  ``<sys.executable> -m daemons``), ``@HARNESS_HOME@`` the absolute home. Both are quoted
  for systemd (``%`` doubled, words with blanks or quotes double-quoted). Any other
  ``@HARNESS_...@`` placeholder is an error, never silently left in a unit.
- A line ``@HARNESS_SANDBOX@`` (``@HARNESS_SANDBOX_OFFLINE@``) is replaced by the lines of
  ``sandbox.inc`` (``sandbox-offline.inc``) in the same directory, rendered the same way:
  the sandbox every service shares is written once (docs/security.md).
- ``scope="system"`` renders ``User=``/``Group=`` as the dedicated service user (default
  ``harness``, created by :func:`ensure_service_user`); ``scope="user"`` comments them out,
  since a user manager runs its units as its own user and cannot switch.
- ``sandbox=False`` (``--no-sandbox``) comments out the lines that need mount namespaces
  (ProtectSystem=, ProtectHome=, PrivateTmp=, ReadWritePaths=, ...) with a note saying so,
  for hosts whose service manager cannot create them (some containers). NoNewPrivileges=
  and UMask= need no namespace and stay.
- ``@HARNESS_DATABASE_ENV@`` (``database-env.inc``): every service reads
  ``HOME/coordination/config/database.env`` with ``EnvironmentFile=-`` (optional), where a
  postgres home keeps ``HARNESS_DATABASE_URL``; a template that sets the URL itself is an
  error. ``database=True`` (a postgres home, which :func:`install_units` detects) comments
  out the directives that cut a service off the network (:data:`NETWORK_CUTS`, e.g. the
  offline sandbox's) and lets ``RestrictAddressFamilies=`` reach TCP.
- A home under /tmp or /var/tmp is invisible behind ``PrivateTmp=yes`` (the unit would fail
  with status 226/NAMESPACE, or see an empty /tmp); PrivateTmp= is then turned off in the
  rendered unit, with a comment there and a warning to the operator. The shipped template
  keeps ``PrivateTmp=yes``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordination.errors import HarnessError, UsageError

UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer")
PLACEHOLDER_RE = re.compile(r"@HARNESS_[A-Z0-9_]+@")
#: Directives that need a mount namespace (dropped by --no-sandbox).
SANDBOX_DIRECTIVES = frozenset({
    "ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths", "ReadOnlyPaths",
    "InaccessiblePaths", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
    "PrivateMounts", "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem",
    "ProtectProc", "ProcSubset", "PrivateUsers", "PrivateNetwork",
})
#: ``@HARNESS_<NAME>@`` on a line of its own: the lines of this fragment, in the template dir.
INCLUDES = {"@HARNESS_SANDBOX@": "sandbox.inc",
            "@HARNESS_SANDBOX_OFFLINE@": "sandbox-offline.inc",
            "@HARNESS_DATABASE_ENV@": "database-env.inc"}
#: Directives that cut a service off the network: commented out on a postgres home, whose
#: daemons must reach the database (``database=True``).
NETWORK_CUTS = frozenset({"PrivateNetwork", "IPAddressDeny"})
#: Address families a daemon of a postgres home needs (TCP, or the server's Unix socket).
DATABASE_FAMILIES = ("AF_UNIX", "AF_INET", "AF_INET6")
#: Never set in a unit: the URL (and its password) comes from database-env.inc's file.
_URL_IN_UNIT_RE = re.compile(r"HARNESS_DATABASE_URL\s*=|postgres(ql)?://")
#: The dedicated unprivileged user (and group) the system units run as.
DEFAULT_SERVICE_USER = "harness"
ACCOUNT_NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: Lines a user manager cannot honour (it runs every unit as its own user).
USER_SCOPE_DROPS = frozenset({"User", "Group"})
TMP_DIRS = ("/tmp", "/var/tmp")

_DROPIN_HEAD = """\
# A drop-in loosening the harness worker sandbox (systemd/sandbox.inc) for a worker type
# that needs {what}. Save it as
#   /etc/systemd/system/harness-worker@<instance>.service.d/{name}.conf
# (~/.config/systemd/user/... for --user) for the instances that serve that type, or under
# harness-worker@.service.d/ for every instance, then `systemctl [--user] daemon-reload`
# and restart those instances. `systemd-analyze security harness-worker@<instance>` shows
# the price. docs/security.md lists what each line gives up.
[Service]
"""
DEFAULT_POLKIT_DIR = Path("/etc/polkit-1/rules.d")
POLKIT_RULE = """\
// harness: lets the service user {user} (harness-supervisor.service runs as it) start,
// stop and kill the harness-worker@ instances of the system manager, and nothing else.
// Written by `harness systemd install --system`; docs/security.md.
// Transient units (systemd-run) are deliberately NOT allowed: the manager passes no unit
// name for them, so a rule allowing them would let {user} run anything as root. Tasks of
// system workers therefore run without a transient scope; the worker, a child subreaper,
// still stops every descendant of a task (docs/security.md).
polkit.addRule(function(action, subject) {{
    if (action.id != "org.freedesktop.systemd1.manage-units" || subject.user != "{user}") {{
        return polkit.Result.NOT_HANDLED;
    }}
    var unit = action.lookup("unit") || "";
    var verb = action.lookup("verb") || "";
    if (/^harness-worker@[A-Za-z0-9_.:-]+\\.service$/.test(unit) &&
            ["start", "stop", "restart", "kill"].indexOf(verb) >= 0) {{
        return polkit.Result.YES;
    }}
    return polkit.Result.NOT_HANDLED;
}});
"""


def polkit_rule(user: str) -> str:
    """The polkit rule allowing ``user`` to drive the worker units (see POLKIT_RULE)."""
    return POLKIT_RULE.format(user=user)


#: ``harness systemd install --print-dropin NAME``: ready-made drop-ins for the worker.
DROPINS = {
    "devices": _DROPIN_HEAD.format(what="hardware devices (a GPU)", name="devices") + """\
# See the host's /dev again (GPUs, accelerators); device access is then governed by the
# file modes and groups of the device nodes only.
PrivateDevices=no
DevicePolicy=auto
# The service user usually needs the device's group, e.g. video or render:
#SupplementaryGroups=video render
""",
    "namespaces": _DROPIN_HEAD.format(
        what="namespaces (a headless browser's own sandbox, rootless containers)",
        name="namespaces") + """\
# Chromium and Electron build their sandbox from user, pid and network namespaces.
RestrictNamespaces=no
""",
    "kernel-protections": """\
# For a host whose service manager cannot apply ProtectKernelTunables= and
# ProtectKernelLogs= (units fail with status 226/NAMESPACE; seen with a user manager
# running as root in a microVM, systemd 252 on Linux 6.18). Milder than --no-sandbox: the
# rest of the sandbox stays. Save it as harness-.service.d/kernel-protections.conf in the
# unit directory (the "harness-" prefix applies it to every harness service), then
# `systemctl [--user] daemon-reload`. docs/security.md.
[Service]
# /proc/sys and /sys stay writable as far as file permissions allow (the service user has
# no capability, so the root-owned tunables stay out of reach anyway).
ProtectKernelTunables=no
# The kernel log is readable as far as its permissions allow (dmesg_restrict).
ProtectKernelLogs=no
""",
    "home": _DROPIN_HEAD.format(what="to write to home directories (tools caching under ~)",
                                name="home") + """\
# Home directories writable again (a --user worker's own home, e.g. ~/.cache, ~/.npm).
ProtectHome=no
""",
}


def template_dir() -> Path:
    """``$HARNESS_SYSTEMD_DIR``, else ``systemd/`` beside the ``daemons`` package (a source
    checkout or editable install), else ``<prefix>/share/harness/systemd`` (where a wheel
    would install them as data files)."""
    env = os.environ.get("HARNESS_SYSTEMD_DIR")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parent.parent / "systemd"
    installed = Path(sys.prefix) / "share" / "harness" / "systemd"
    return installed if not beside.is_dir() and installed.is_dir() else beside


def default_unit_dir(scope: str, environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if scope == "system":
        return Path("/etc/systemd/system")
    if scope != "user":
        raise UsageError(f"unknown scope {scope!r}; use user or system")
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or str(Path.home()),
                                                      ".config")
    return Path(base) / "systemd" / "user"


def default_harness_argv() -> list[str]:
    """How ExecStart runs harness: the console script installed beside this interpreter
    (certainly this harness), else ``harness`` on PATH, else ``<this python> -m daemons``."""
    sibling = Path(sys.executable).parent / "harness"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling.absolute())]
    found = shutil.which("harness")
    if found:
        return [os.path.abspath(found)]
    return [sys.executable, "-m", "daemons"]


def systemd_quote(word: str) -> str:
    """One word for a unit file: ``%`` escaped (specifiers), quoted when it has blanks,
    quotes or backslashes."""
    word = word.replace("%", "%%")
    if word and not re.search(r"[\s\"'\\]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _under(path: Path, parents: tuple[str, ...]) -> bool:
    return any(path == Path(p) or Path(p) in path.parents for p in parents)


@dataclass
class RenderedUnit:
    name: str
    text: str


@dataclass
class InstallReport:
    unit_dir: Path
    units: list[RenderedUnit]
    warnings: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    reloaded: bool = False
    reload_cmd: list[str] = field(default_factory=list)
    user_actions: list[str] = field(default_factory=list)  # service user created, home chowned

    def as_dict(self, with_text: bool = False) -> dict[str, Any]:
        return {"unit_dir": str(self.unit_dir), "user_actions": self.user_actions,
                "units": [{"name": u.name, **({"text": u.text} if with_text else {})}
                          for u in self.units],
                "written": [str(p) for p in self.written], "warnings": self.warnings,
                "reloaded": self.reloaded, "reload_cmd": self.reload_cmd}


def _directive(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped[0] in "#;[" or "=" not in stripped:
        return None
    return stripped.split("=", 1)[0].strip()


def expand_includes(text: str, source: Path | None = None) -> str:
    """``text`` with every include line (:data:`INCLUDES`) replaced by its fragment."""
    src = source or template_dir()
    out = []
    for line in text.splitlines():
        fragment = INCLUDES.get(line.strip())
        if fragment is None:
            out.append(line)
            continue
        try:
            out.append((src / fragment).read_text().rstrip("\n"))
        except OSError as exc:
            raise HarnessError(f"cannot read the unit fragment {src / fragment}: "
                               f"{exc.strerror or exc}") from None
    return "\n".join(out) + "\n"


def render_unit(text: str, *, name: str, harness_argv: list[str], home: Path,
                sandbox: bool = True, warnings: list[str] | None = None,
                scope: str = "user", service_user: str = DEFAULT_SERVICE_USER,
                service_group: str | None = None, source: Path | None = None,
                database: bool = False) -> str:
    """Render one unit template (see the module docstring)."""
    notes = warnings if warnings is not None else []
    text = expand_includes(text, source)
    if any(_URL_IN_UNIT_RE.search(line) for line in text.splitlines()
           if _directive(line) is not None):
        raise HarnessError(f"{name}: the template sets a database URL; it must come from "
                           "the EnvironmentFile= of database-env.inc (docs/multi-host.md)")
    values = {"@HARNESS_BIN@": " ".join(systemd_quote(w) for w in harness_argv),
              "@HARNESS_HOME@": systemd_quote(str(home)),
              "@HARNESS_USER@": systemd_quote(service_user),
              "@HARNESS_GROUP@": systemd_quote(service_group or service_user)}
    unknown = sorted(set(PLACEHOLDER_RE.findall(text)) - set(values))
    if unknown:
        raise HarnessError(f"{name}: unknown placeholder(s) {', '.join(unknown)}; "
                           f"daemons/systemd_units.py renders only {', '.join(values)}")
    home_in_tmp = _under(home, TMP_DIRS)
    out: list[str] = []
    for line in text.splitlines():
        key = _directive(line)
        for placeholder, value in values.items():
            line = line.replace(placeholder, value)
        if key in USER_SCOPE_DROPS and scope == "user":
            out.append("# harness systemd install --user: a user manager runs its units as "
                       "its own user")
            out.append("#" + line)
            continue
        if key is not None and not sandbox and key in SANDBOX_DIRECTIVES:
            out.append("# harness systemd install --no-sandbox: this host cannot set up the "
                       "mount namespace this line needs")
            out.append("#" + line)
            continue
        if database and key in NETWORK_CUTS:
            out.append("# harness systemd install: a postgres home's daemons must reach the "
                       "database")
            out.append("#" + line)
            continue
        if database and key == "RestrictAddressFamilies":
            families = line.split("=", 1)[1].split()
            line = "RestrictAddressFamilies=" + " ".join(
                families + [f for f in DATABASE_FAMILIES if f not in families])
        if key == "PrivateTmp" and home_in_tmp and sandbox and \
                line.split("=", 1)[1].strip().lower() in ("yes", "true", "on", "1"):
            out.append(f"# harness systemd install: the home {home} is under /tmp or /var/tmp, "
                       "which PrivateTmp=yes would hide from the service; turned off")
            out.append("PrivateTmp=no")
            notes.append(f"{name}: PrivateTmp turned off because the home {home} is under "
                         "/tmp or /var/tmp; move the home to keep a private /tmp")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def render_units(home: Path, *, harness_argv: list[str] | None = None, sandbox: bool = True,
                 source: Path | None = None, warnings: list[str] | None = None,
                 scope: str = "user", service_user: str = DEFAULT_SERVICE_USER,
                 service_group: str | None = None,
                 database: bool = False) -> list[RenderedUnit]:
    """Every unit template in ``source`` (default :func:`template_dir`), rendered."""
    src = source or template_dir()
    try:
        names = sorted(n for n in os.listdir(src) if n.endswith(UNIT_SUFFIXES)
                       and not n.startswith("."))
    except FileNotFoundError:
        raise HarnessError(f"no unit templates: {src} does not exist (set "
                           "$HARNESS_SYSTEMD_DIR to the systemd/ directory of harness)") from None
    if not names:
        raise HarnessError(f"no *.service/*.socket/*.target/*.timer templates in {src}")
    argv = harness_argv or default_harness_argv()
    return [RenderedUnit(n, render_unit((src / n).read_text(), name=n, harness_argv=argv,
                                        home=home, sandbox=sandbox, warnings=warnings,
                                        scope=scope, service_user=service_user,
                                        service_group=service_group, source=src,
                                        database=database))
            for n in names]


def _is_root_account(user: str) -> bool:
    import pwd

    try:
        return user == "root" or pwd.getpwnam(user).pw_uid == 0
    except KeyError:
        return False


def nologin_shell() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin"):
        if os.access(shell, os.X_OK):
            return shell
    return "/bin/false"


def ensure_service_user(user: str, group: str, home: Path, *,
                        dry_run: bool = False) -> list[str]:
    """Make ``user`` (primary group ``group``) exist as a system account and own the home;
    returns what was done (or, with ``dry_run``, what would be).

    The account is created with ``groupadd --system`` / ``useradd --system``, no login
    shell, its home directory the harness home (so tasks get a writable ``$HOME``), only
    when missing: an existing account is used as it is. The home is then handed to it
    (``chown -R``, symlinks not followed) when its owner differs, since the sandboxed units
    may write nowhere else. Needs root unless there is nothing to do."""
    import grp
    import pwd

    actions: list[str] = []
    commands: list[list[str]] = []
    try:
        grp.getgrnam(group)
    except KeyError:
        if group != user:
            commands.append(["groupadd", "--system", group])
    try:
        pwd.getpwnam(user)
    except KeyError:
        commands.append(["useradd", "--system", "--no-create-home", "--home-dir", str(home),
                         "--shell", nologin_shell(),
                         *(["--user-group"] if group == user else ["--gid", group]),
                         "--comment", "harness service user", user])
    for cmd in commands:
        actions.append(" ".join(shlex.quote(w) for w in cmd))
        if dry_run:
            continue
        if os.geteuid() != 0:
            raise UsageError(f"the service user {user!r} does not exist and only root can "
                             f"create it: run `harness systemd install --system` as root, or "
                             f"create it yourself (`{actions[-1]}`)")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise HarnessError(f"{actions[-1]} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
    if not home.is_dir():
        return actions
    try:
        uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:  # dry run: it does not exist yet
        uid = gid = -1
    st = home.stat()
    if (st.st_uid, st.st_gid) != (uid, gid):
        actions.append(f"chown -R {user}:{group} {home}")
        if not dry_run:
            _chown_tree(home, uid, gid)
    return actions


def unreachable_parents(home: Path, group: str) -> list[Path]:
    """Parent directories of ``home`` that another user cannot traverse (no search
    permission for "other", and not for ``group`` either): the service user would fail to
    reach the home (e.g. a home under /root)."""
    import grp

    try:
        gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    out = []
    for parent in reversed(home.parents):
        try:
            st = parent.stat()
        except OSError:
            continue
        if st.st_mode & 0o001 or (gid is not None and st.st_gid == gid and st.st_mode & 0o010):
            continue
        out.append(parent)
    return out


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """``chown -R`` without following symlinks (a link in the home cannot hand a file
    elsewhere to the service user)."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


def _is_postgres_home(home: Path) -> bool:
    """Whether ``home`` exists and its system.json names the postgres queue backend."""
    from coordination.config import load_system
    from coordination.errors import ConfigError
    from coordination.paths import Home

    h = Home(home)
    if not h.system_config.is_file():
        return False
    try:
        return load_system(h).values.get("queue_backend") == "postgres"
    except ConfigError:
        return False


def install_units(home: Path, *, scope: str, dry_run: bool = False,
                  unit_dir: Path | None = None, harness_bin: str | None = None,
                  sandbox: bool = True, reload: bool = True, source: Path | None = None,
                  environ: dict[str, str] | None = None,
                  service_user: str = DEFAULT_SERVICE_USER,
                  service_group: str | None = None,
                  create_user: bool = True,
                  polkit_dir: Path | None = DEFAULT_POLKIT_DIR) -> InstallReport:
    """Render the units, write them to the scope's unit directory (atomically, by rename)
    and run ``systemctl [--user] daemon-reload`` unless ``dry_run`` or not ``reload``.

    For the system scope the units run as ``service_user``; with ``create_user`` (the
    default) :func:`ensure_service_user` creates it when missing and hands it the home
    (reported in ``InstallReport.user_actions``, only listed on a dry run), and the polkit
    rule that lets it drive the worker units is written to ``polkit_dir`` (None: not)."""
    home = Path(home).expanduser().absolute()
    env = dict(os.environ if environ is None else environ)
    target = unit_dir or default_unit_dir(scope, env)
    warnings: list[str] = []
    argv = shlex.split(harness_bin) if harness_bin else default_harness_argv()
    if not os.path.isabs(argv[0]):
        found = shutil.which(argv[0])
        if found is None:
            raise UsageError(f"--harness-bin: {argv[0]!r} is not an absolute path and not on "
                             "PATH")
        argv[0] = found
    if not home.is_dir():
        warnings.append(f"the home {home} does not exist yet; run `harness init --home "
                        f"{home}` before starting units (ReadWritePaths needs it)")
    for option, name in (("--service-user", service_user), ("--service-group", service_group)):
        if name is not None and not ACCOUNT_NAME_RE.fullmatch(name):
            raise UsageError(f"{option}: {name!r} is not a valid user or group name "
                             "(lower-case letters, digits, _ and -, at most 32)")
    if scope == "system" and _is_root_account(service_user):
        raise UsageError(f"--service-user: {service_user!r} is root (uid 0); the units run "
                         "as an unprivileged user, never root")
    database = _is_postgres_home(home)
    if database and not (home / "coordination" / "config" / "database.env").is_file():
        warnings.append(f"postgres home: the units read HARNESS_DATABASE_URL from "
                        f"{home}/coordination/config/database.env (absent: they use "
                        "system.json database_url and libpq's own PG* settings)")
    units = render_units(home, harness_argv=argv, sandbox=sandbox, source=source,
                         warnings=warnings, scope=scope, service_user=service_user,
                         service_group=service_group, database=database)
    report = InstallReport(target, units, warnings)
    if scope == "system" and create_user:
        report.user_actions = ensure_service_user(service_user, service_group or service_user,
                                                  home, dry_run=dry_run)
    if scope == "system":
        blocked = unreachable_parents(home, service_group or service_user)
        if blocked:
            warnings.append(f"the service user {service_user} cannot reach the home "
                            f"{home}: {', '.join(map(str, blocked))} lack(s) search "
                            "permission for other users; move the home (e.g. under "
                            "/var/lib) or chmod o+x those directories")
    if dry_run:
        return report
    target.mkdir(parents=True, exist_ok=True)
    if scope == "system" and polkit_dir is not None:
        rule = Path(polkit_dir) / f"50-harness-{service_user}.rules"
        try:
            rule.parent.mkdir(parents=True, exist_ok=True)
            tmp = rule.parent / f".{rule.name}.tmp-{os.getpid()}"
            tmp.write_text(polkit_rule(service_user))
            os.chmod(tmp, 0o644)
            os.replace(tmp, rule)
            report.written.append(rule)
        except OSError as exc:
            warnings.append(f"cannot write the polkit rule {rule}: {exc.strerror or exc}; "
                            f"the supervisor (user {service_user}) cannot start worker "
                            "units without it")
    for unit in units:
        path = target / unit.name
        tmp = target / f".{unit.name}.tmp-{os.getpid()}"
        tmp.write_text(unit.text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        report.written.append(path)
    if reload:
        cmd = ["systemctl", *(["--user"] if scope == "user" else []), "daemon-reload"]
        report.reload_cmd = cmd
        if shutil.which("systemctl") is None:
            warnings.append("systemctl not found; run `systemctl daemon-reload` yourself")
        else:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                                  check=False)
            if proc.returncode != 0:
                warnings.append(f"{' '.join(cmd)} failed ({proc.returncode}): "
                                f"{proc.stderr.strip()}; the units were written")
            else:
                report.reloaded = True
    return report
