"""What ``harness worker run`` was asked to do, and where it runs (instance, unit).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WorkerOptions:
    """What ``harness worker run`` was asked to do (None: not limited / from system.json)."""

    instance: str = "0"
    types: list[str] | None = None
    idle_exit_s: float | None = None
    max_tasks: int | None = None
    max_uptime_s: float | None = None
    once: bool = False
    unit: str | None = None


def default_instance(environ: Mapping[str, str] | None = None) -> str:
    """``$HARNESS_INSTANCE``, else the instance of our systemd unit, else ``"0"``."""
    env = os.environ if environ is None else environ
    if env.get("HARNESS_INSTANCE"):
        return env["HARNESS_INSTANCE"]
    unit = systemd_unit(env)
    if unit and "@" in unit:
        return unit.split("@", 1)[1].rsplit(".", 1)[0] or "0"
    return "0"


def systemd_unit(environ: Mapping[str, str] | None = None) -> str | None:
    """The systemd unit we run in (from /proc/self/cgroup), when started by systemd."""
    env = os.environ if environ is None else environ
    if not env.get("INVOCATION_ID"):
        return None
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        for part in reversed(line.rsplit(":", 1)[-1].split("/")):
            if part.endswith(".service"):
                return part
    return None
