"""systemd transient scopes: each task attempt of a worker under systemd runs in its own.

When the worker runs under a reachable systemd manager (:func:`find_scope_manager`) that
accepts a probe scope with the type's properties (:func:`probe_scope`; ``cgroup_limits``
set the properties), the attempt's argv is prefixed by :func:`scope_command`:
``systemd-run [--user] --scope ... -- env -u ... --`` puts the process into a transient
scope and execs the command in place (same pid, same process group, still our child), so
:class:`~daemons.task_run.TaskRun` drives it unchanged. :func:`kill_scope` SIGKILLs the
scope's cgroup when the attempt is killed (docs/coordination.md, ``cgroup_limits``;
docs/security.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

SCOPE_PROBE_TIMEOUT_S = 10.0  # a systemd-run probe that takes longer counts as a failure
SCOPE_UNIT_PREFIX = "harness-task-"
#: How systemd-run reports that the manager refused the scope (the command never ran).
SCOPE_REFUSED = b"Failed to start transient scope unit"


@dataclass(frozen=True)
class ScopeManager:
    """A systemd manager that ``systemd-run --scope`` can reach from this worker."""

    user: bool  # the worker's own (user) manager: systemd-run --user
    systemd_run: str  # absolute path
    env_tool: str  # absolute path of env(1), which strips what systemd-run adds
    bus_env: dict[str, str] = field(default_factory=dict)  # what systemd-run needs to connect


@dataclass(frozen=True)
class Scope:
    """The transient scope one attempt runs in."""

    manager: ScopeManager
    unit: str
    properties: dict[str, str]


def scope_unit_name(task_id: str, attempt: int) -> str:
    """``harness-task-<task_id>-<attempt>.scope``, characters outside [A-Za-z0-9_.:-] as
    ``_``. The attempt number keeps a retry clear of a previous attempt's scope that a
    lingering process may still hold."""
    safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", task_id)[:200]
    return f"{SCOPE_UNIT_PREFIX}{safe}-{attempt}.scope"


def find_scope_manager(environ: Mapping[str, str]) -> tuple[ScopeManager | None, str]:
    """The manager a worker with environment ``environ`` can put its tasks' scopes into,
    else None and why not.

    Under systemd means ``INVOCATION_ID`` is set (systemd sets it for every unit it
    starts). A user manager also sets ``MANAGERPID`` (systemd.exec(5)): then the scope goes
    to that manager with ``systemd-run --user``, which finds it through ``XDG_RUNTIME_DIR``
    (the private socket ``$XDG_RUNTIME_DIR/systemd/private``, else the session bus); without
    ``MANAGERPID`` the system manager. ``systemd-run`` and ``env`` must be on ``PATH``.
    Whether the manager then accepts the scope is :func:`probe_scope`'s question."""
    if not environ.get("INVOCATION_ID"):
        return None, "the worker does not run under systemd (no INVOCATION_ID)"
    path = environ.get("PATH") or os.defpath
    systemd_run = shutil.which("systemd-run", path=path)
    if systemd_run is None:
        return None, f"systemd-run is not on PATH ({path})"
    env_tool = shutil.which("env", path=path)
    if env_tool is None:
        return None, f"env is not on PATH ({path})"
    user = bool(environ.get("MANAGERPID"))
    bus_env: dict[str, str] = {}
    if user:
        if not environ.get("XDG_RUNTIME_DIR"):
            return None, ("the worker runs under a user manager (MANAGERPID) but "
                          "XDG_RUNTIME_DIR is not set, so systemd-run --user cannot reach it")
        bus_env = {k: environ[k] for k in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")
                   if environ.get(k)}
    return ScopeManager(user, os.path.abspath(systemd_run), os.path.abspath(env_tool),
                        bus_env), ""


def _systemd_run_head(manager: ScopeManager, properties: Mapping[str, str],
                      unit: str | None = None) -> list[str]:
    argv = [manager.systemd_run, *(["--user"] if manager.user else []),
            "--scope", "--quiet", "--collect", *([f"--unit={unit}"] if unit else [])]
    for key, value in properties.items():
        argv += ["-p", f"{key}={value}"]
    return argv


def scope_command(scope: Scope, argv: list[str], env: Mapping[str, str]) \
        -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run ``argv`` with environment ``env`` inside ``scope``.

    ``systemd-run --scope`` creates the scope, moves itself into it and execs the rest in
    place; ``env -u`` then drops what the task would not otherwise get: ``INVOCATION_ID``
    (systemd-run sets the scope's) and the variables systemd-run needed to reach the
    manager, unless ``env`` (the allowlisted task environment) already has them."""
    manager = scope.manager
    head = _systemd_run_head(manager, scope.properties, scope.unit)
    run_env = dict(env)
    strip = [] if "INVOCATION_ID" in env else ["INVOCATION_ID"]
    for key, value in manager.bus_env.items():
        if key not in env:
            run_env[key] = value
            strip.append(key)
    unset = [arg for key in strip for arg in ("-u", key)]
    return [*head, "--", manager.env_tool, *unset, "--", *argv], run_env


def probe_scope(manager: ScopeManager, properties: Mapping[str, str],
                timeout: float = SCOPE_PROBE_TIMEOUT_S) -> str | None:
    """Start a throw-away scope with ``properties`` (running ``env``): None when the
    manager accepted it, else why not (systemd-run's message). The manager may refuse
    (no permission, no delegation, a value it rejects) or be unreachable."""
    argv = [*_systemd_run_head(manager, properties), "--", manager.env_tool]
    env = {"PATH": os.environ.get("PATH") or os.defpath, **manager.bus_env}
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout, check=False, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"systemd-run did not answer within {timeout:g}s"
    except OSError as exc:
        return f"cannot run {manager.systemd_run}: {exc.strerror or exc}"
    if proc.returncode == 0:
        return None
    message = " ".join(proc.stderr.decode("utf-8", "replace").split())[:300]
    return f"systemd-run --scope failed (exit {proc.returncode}): {message or 'no message'}"


def kill_scope(scope: Scope, timeout: float = SCOPE_PROBE_TIMEOUT_S) -> str | None:
    """SIGKILL every process in the scope's cgroup (``systemctl kill``): None when the
    manager did it or the scope is already gone, else why not. Belt and braces beside the
    descendant sweep: the cgroup holds whatever the task started, wherever it moved in the
    process tree."""
    manager = scope.manager
    systemctl = shutil.which("systemctl", path=os.path.dirname(manager.systemd_run)) \
        or shutil.which("systemctl")
    if systemctl is None:
        return "systemctl not found"
    argv = [systemctl, *(["--user"] if manager.user else []), "kill", "--signal=SIGKILL",
            "--kill-whom=all", scope.unit]
    env = {"PATH": os.environ.get("PATH") or os.defpath, **manager.bus_env}
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"systemctl kill: {exc}"
    if proc.returncode == 0:
        return None
    message = proc.stderr.decode("utf-8", "replace").strip()
    return None if "not loaded" in message or "not found" in message else message[:300]
