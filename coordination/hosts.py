"""Host identity: which machine of a fleet this process runs on (docs/coordination.md,
"Leases and hosts").

``host_id`` is ``$HARNESS_HOST_ID`` when set, else the hostname (its first label when that
is not a valid id as a whole); either must match the id grammar (:mod:`.ids`). A claim
records it on the task beside ``worker_id``, so the supervisor of any host can tell its own
tasks (judged by the fast local proofs of death: pid, pidfd) from another host's (judged by
their lease only). Tests simulate several hosts on one machine by setting the variable.
"""

from __future__ import annotations

import os
import socket

from .ids import check_id, is_valid_id

ENV_HOST_ID = "HARNESS_HOST_ID"


def host_id() -> str:
    """This process's host id (read on each call: cheap, and a test may change the
    variable). UsageError (exit 2) naming ``$HARNESS_HOST_ID`` when it is not a valid id."""
    value = os.environ.get(ENV_HOST_ID)
    if value:
        return check_id(value, "host id", f"${ENV_HOST_ID}")
    name = socket.gethostname()
    if is_valid_id(name):
        return name
    return check_id(name.split(".", 1)[0], "host id", "the hostname")


__all__ = ["ENV_HOST_ID", "host_id"]
