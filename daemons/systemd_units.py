"""Render and install the systemd units shipped in ``systemd/``.

Every ``*.service``, ``*.socket``, ``*.target`` and ``*.timer`` in the template directory is
rendered the same way, so units added later need no code here:

- ``@HARNESS_BIN@`` becomes the command that runs harness (``shutil.which("harness")``, else
  ``<sys.executable> -m daemons``), ``@HARNESS_HOME@`` the absolute home. Both are quoted
  for systemd (``%`` doubled, words with blanks or quotes double-quoted). Any other
  ``@HARNESS_...@`` placeholder is an error, never silently left in a unit.
- ``sandbox=False`` (``--no-sandbox``) comments out the lines that need mount namespaces
  (ProtectSystem=, ProtectHome=, PrivateTmp=, ReadWritePaths=, ...) with a note saying so,
  for hosts whose service manager cannot create them (some containers). NoNewPrivileges=
  and UMask= need no namespace and stay.
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
    "PrivateNetwork", "ProtectProc",
})
TMP_DIRS = ("/tmp", "/var/tmp")


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

    def as_dict(self, with_text: bool = False) -> dict[str, Any]:
        return {"unit_dir": str(self.unit_dir),
                "units": [{"name": u.name, **({"text": u.text} if with_text else {})}
                          for u in self.units],
                "written": [str(p) for p in self.written], "warnings": self.warnings,
                "reloaded": self.reloaded, "reload_cmd": self.reload_cmd}


def _directive(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped[0] in "#;[" or "=" not in stripped:
        return None
    return stripped.split("=", 1)[0].strip()


def render_unit(text: str, *, name: str, harness_argv: list[str], home: Path,
                sandbox: bool = True, warnings: list[str] | None = None) -> str:
    """Render one unit template (see the module docstring)."""
    notes = warnings if warnings is not None else []
    values = {"@HARNESS_BIN@": " ".join(systemd_quote(w) for w in harness_argv),
              "@HARNESS_HOME@": systemd_quote(str(home))}
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
        if key is not None and not sandbox and key in SANDBOX_DIRECTIVES:
            out.append("# harness systemd install --no-sandbox: this host cannot set up the "
                       "mount namespace this line needs")
            out.append("#" + line)
            continue
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
                 source: Path | None = None,
                 warnings: list[str] | None = None) -> list[RenderedUnit]:
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
                                        home=home, sandbox=sandbox, warnings=warnings))
            for n in names]


def install_units(home: Path, *, scope: str, dry_run: bool = False,
                  unit_dir: Path | None = None, harness_bin: str | None = None,
                  sandbox: bool = True, reload: bool = True, source: Path | None = None,
                  environ: dict[str, str] | None = None) -> InstallReport:
    """Render the units, write them to the scope's unit directory (atomically, by rename)
    and run ``systemctl [--user] daemon-reload`` unless ``dry_run`` or not ``reload``."""
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
    units = render_units(home, harness_argv=argv, sandbox=sandbox, source=source,
                         warnings=warnings)
    report = InstallReport(target, units, warnings)
    if dry_run:
        return report
    target.mkdir(parents=True, exist_ok=True)
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
