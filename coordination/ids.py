"""The id grammar: task ids, worker ids and worker type names (docs/coordination.md, "Ids").

Every one of them names a file or a directory somewhere in the home (``results/<task_id>/``,
``logs/tasks/<task_id>.log``, ``worker-specs/active/<worker_id>.json``...), so each is
checked against :data:`ID_RE` before a path is built from it: letters, digits, ``.``,
``_`` and ``-``, 1 to 128 characters, not starting with a dot or a dash. No ``/``, no
``..``, no NUL: an id can never name a path outside its folder.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import UsageError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ID_RULE = "letters, digits, '.', '_', '-', at most 128 characters, starting with a letter or digit"


def is_valid_id(value: Any) -> bool:
    """Whether ``value`` is a string of the id grammar."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def check_id(value: Any, kind: str = "id", where: str | None = None) -> str:
    """``value`` when it is a valid ``kind`` (task id, worker id, worker type); else
    :class:`UsageError` (exit 2) naming ``where`` (default: the kind) and the rule."""
    if not is_valid_id(value):
        shown = value if not isinstance(value, str) else value.encode(
            "utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise UsageError(f"{where or kind}: {shown!r} is not a valid {kind} ({ID_RULE})")
    return str(value)


__all__ = ["ID_RE", "ID_RULE", "check_id", "is_valid_id"]
