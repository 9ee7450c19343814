"""The task queue: a port (:mod:`.contract`), its shared policy (:mod:`.rules`) and its
backends (:mod:`.file`, :mod:`.postgres`). Callers use :func:`open_queue` and the
:class:`QueueBackend` methods, nothing else (docs/coordination.md, "Queue")."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from ..config import load_system
from ..errors import ConfigError
from ..paths import Home
from .contract import EnqueueResult, QueueBackend, QueueFinding
from .file import FileQueue
from .file.snapshot import QUEUE_FORMAT_VERSION
from .rules import is_runnable


def _postgres(home: Home) -> QueueBackend:
    """The postgres backend (psycopg is an optional dependency: imported only here)."""
    try:
        from .postgres import PostgresQueue
    except ImportError as exc:
        raise ConfigError(f"{home.system_config}: queue_backend 'postgres' needs psycopg "
                          f"({exc}): pip install 'harness[postgres]'") from None
    return PostgresQueue(home)


#: The backends ``queue_backend`` may name, and how each is built.
BACKENDS: dict[str, Callable[[Home], QueueBackend]] = {"file": FileQueue, "postgres": _postgres}

#: The instances in use, so the parts of one process share one (held weakly: a queue
#: nobody holds any more closes its descriptors when it is collected).
_open: weakref.WeakValueDictionary[tuple[str, str], QueueBackend] = weakref.WeakValueDictionary()


def open_queue(home: Home, *, shared: bool = True) -> QueueBackend:
    """The queue of ``home``, by system.json ``queue_backend`` (default ``"file"``). With
    ``shared`` (the default) one instance per process and home is reused: it holds the
    backend's in-memory state, descriptors and threads."""
    name = str(load_system(home).values.get("queue_backend", "file"))
    factory = BACKENDS.get(name)
    if factory is None:
        raise ConfigError(f"{home.system_config}: queue_backend {name!r} is not one of "
                          f"{', '.join(sorted(BACKENDS))}")
    if not shared:
        return factory(home)
    key = (str(home.root), name)
    queue = _open.get(key)
    if queue is None:
        queue = _open[key] = factory(home)
    return queue


#: The name the daemons used before the port; the file backend.
TaskQueue = FileQueue

__all__ = ["BACKENDS", "QUEUE_FORMAT_VERSION", "EnqueueResult", "FileQueue", "QueueBackend",
           "QueueFinding", "TaskQueue", "is_runnable", "open_queue"]
