"""Transitional: the names worker.py and supervisor.py import, until they move (issue 16).

The task runner is three modules now: :mod:`daemons.task_run` (one attempt),
:mod:`daemons.scopes` (systemd transient scopes) and :mod:`daemons.process_groups`. Import
from those; this module goes when the worker and the supervisor are split.
"""

from .process_groups import become_subreaper, reap_orphans
from .scopes import Scope, ScopeManager, find_scope_manager, probe_scope, scope_unit_name
from .task_run import RunSpec, SpawnError, TaskRun, build_env, describe_exit, header_line

__all__ = [
    "RunSpec",
    "Scope",
    "ScopeManager",
    "SpawnError",
    "TaskRun",
    "become_subreaper",
    "build_env",
    "describe_exit",
    "find_scope_manager",
    "header_line",
    "probe_scope",
    "reap_orphans",
    "scope_unit_name",
]
