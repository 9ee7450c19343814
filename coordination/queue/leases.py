"""The lease part of every backend's ``check`` (docs/coordination.md, "Leases and hosts").

``lease_expired`` (warning): a running task whose ``lease_until`` has passed: its worker
stopped heartbeating (dead, frozen, or its host cut off). The supervisor of any host
reclaims it; ``repair`` does the same, through ``reclaim`` with the owner, the lease token
and the expiry checked in the transaction (a heartbeat that came first keeps the task).
"""

from __future__ import annotations

from .contract import Findings, QueueBackend
from .rules import lease_token


def check_leases(queue: QueueBackend, out: Findings, *, repair: bool, now: float) -> None:
    for task in queue.expired_leases(now):
        f = out.add("warning", "lease_expired", f"task {task['task_id']} is running under "
                    f"{task.get('worker_id')} on host {task.get('host_id')} but its lease "
                    f"ended at {task.get('lease_until')}: the supervisor of any host "
                    "reclaims it")
        if repair and queue.reclaim(task["task_id"], reason="lease expired (doctor)",
                                    worker_id=str(task["worker_id"]),
                                    lease=lease_token(task), expired_only=True,
                                    now=now) is not None:
            f.repaired = True
