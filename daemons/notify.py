"""sd_notify(3) for harness daemons, over the ``sdnotify`` package.

A :class:`Notifier` is a no-op when ``$NOTIFY_SOCKET`` is unset (not started by systemd with
``Type=notify``), so daemons call it unconditionally. It also knows the watchdog period
(``$WATCHDOG_USEC``, honoured only when ``$WATCHDOG_PID`` is unset or names this process) and
remembers the last STATUS= it sent, so callers may refresh the status text as often as they
like without flooding the manager.
"""

from __future__ import annotations

import os
from typing import Any


class Notifier:
    """Send READY=1 / STATUS= / WATCHDOG=1 / STOPPING=1 to the service manager."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket_path = env.get("NOTIFY_SOCKET") or None
        self._notifier: Any = None
        if self._socket_path:
            # sdnotify opens its socket in the constructor and swallows connect errors, so it
            # is only built when there is somewhere to send to (else it leaks a socket).
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC")
        wpid = env.get("WATCHDOG_PID")
        if usec and (not wpid or wpid == str(os.getpid())):
            try:
                value = int(usec)
            except ValueError:
                value = 0
            if value > 0:
                # sd_watchdog_enabled(3): ping at half the period.
                self.watchdog_interval_s = value / 1e6 / 2
        self.last_status: str | None = None
        self.sent: list[str] = []  # what was sent, for tests (bounded)

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def notify(self, message: str) -> None:
        if len(self.sent) < 1000:
            self.sent.append(message)
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1" if status is None else f"READY=1\nSTATUS={status}")
        if status is not None:
            self.last_status = status

    def status(self, text: str) -> None:
        """Send STATUS=text unless it is what the manager already shows."""
        if text != self.last_status:
            self.last_status = text
            self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> None:
        self.notify("STOPPING=1" if status is None else f"STOPPING=1\nSTATUS={status}")

    def close(self) -> None:
        notifier, self._notifier = self._notifier, None
        sock = getattr(notifier, "socket", None)
        if sock is not None:
            sock.close()
