"""What a task's process is given before it runs: its environment (an allowlist), the
worker type's resource limits (applied in the child between fork and exec) and a check
that its command can be executed at all. Used by :mod:`.launch` and :mod:`.task_run`."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

_LIMITS = {
    "memory_mb": (resource.RLIMIT_AS, 1024 * 1024),
    "cpu_seconds": (resource.RLIMIT_CPU, 1),
    "processes": (resource.RLIMIT_NPROC, 1),
}


def build_env(source: Mapping[str, str], allow: Iterable[str],
              harness: Mapping[str, str]) -> dict[str, str]:
    """The task environment: only allowlisted keys of ``source``, plus ``harness``."""
    env = {key: source[key] for key in dict.fromkeys(allow) if key in source}
    env.update(harness)
    return env


def rlimits(limits: Mapping[str, Any] | None) -> list[tuple[int, int, int]]:
    """``(resource, soft, hard)`` triples for a worker type's ``limits`` (None: unset).

    A limit never exceeds the worker's own hard limit (an unprivileged worker cannot raise
    it). RLIMIT_CPU gets a hard limit one second above the soft one, so the task first sees
    SIGXCPU (which it may handle) and SIGKILL only after.
    """
    out = []
    for key, value in (limits or {}).items():
        if value is None or key not in _LIMITS:
            continue
        res, unit = _LIMITS[key]
        soft = int(value) * unit
        hard = soft + 1 if res == resource.RLIMIT_CPU else soft
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        out.append((res, soft, hard))
    return out


def limits_preexec(limits: Mapping[str, Any] | None) -> Callable[[], None] | None:
    """A preexec_fn applying the limits in the child between fork and exec (no race with
    the task's first fork). It only calls setrlimit(2): no lock, no allocation worth
    mentioning, so it is safe although the worker has threads. None when no limit is set,
    which keeps subprocess on its vfork fast path."""
    triples = rlimits(limits)
    if not triples:
        return None

    def apply() -> None:
        for res, soft, hard in triples:
            resource.setrlimit(res, (soft, hard))

    return apply


def check_executable(argv0: str, cwd: Path, env: Mapping[str, str]) -> None:
    """Raise FileNotFoundError or PermissionError as exec would for ``argv0`` (PATH from
    ``env``, a name with a slash relative to ``cwd``). A wrapped command (systemd-run, env)
    would only fail after starting; this keeps such failures spawn failures."""
    if "/" in argv0:
        candidates = [cwd / argv0]
    else:  # as subprocess searches: the task's PATH, relative entries from its cwd
        candidates = [cwd / folder / argv0 for folder in os.get_exec_path(dict(env))]
    seen = False
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return
        seen = seen or path.exists()
    if seen:
        raise PermissionError(13, "Permission denied")
    raise FileNotFoundError(2, "No such file or directory")
