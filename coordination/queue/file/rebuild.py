"""The live queue as the journal alone says it is: the compaction base
(``task-queue.base.json``) plus every journal line after it. Used to record what a hand
edit changed, and by ``check`` to verify and rebuild ``task-queue.json``. O(live + journal):
never on an operation's path."""

from __future__ import annotations

from typing import Any

from ...errors import CorruptFileError
from ...paths import Home
from .journal import read_all
from .snapshot import parse
from .state import LiveState


def replay(state: LiveState, lines: list[dict[str, Any]], upto: int | None = None) -> LiveState:
    """Apply the commits of ``lines`` after ``state.rev`` (up to ``upto``), in place."""
    for line in lines:
        rev = line.get("rev")
        if "snap" in line or not isinstance(rev, int) or rev <= state.rev:
            continue
        if upto is not None and rev > upto:
            break
        state.apply_commit(line)
    return state


def base_state(home: Home) -> LiveState:
    """The compaction base, or an empty queue at revision 0 when there is none."""
    try:
        snap = parse(home.queue_base_file)
    except CorruptFileError:
        snap = None
    state = LiveState(snap.revision if snap else 0)
    if snap is not None:
        for task, blob in snap.tasks():
            state.put(task, blob)
    return state


def journal_truth(home: Home) -> LiveState | None:
    """Base + journal; None when the base is missing for a journal that does not start at
    revision 0 (the journal alone cannot tell)."""
    header, lines, _ = read_all(home.queue_journal)
    state = base_state(home)
    start = header.get("base") if header else 0
    if isinstance(start, int) and state.rev < start:
        return None
    return replay(state, lines)
