"""The postgres backend's wake-ups: a thread that LISTENs on the queue's channel.

Every committing transaction notifies ``CHANNEL``. :func:`listen` sleeps in select(2) on a
connection of its own and on a pipe that its stop function writes to: no polling, and
stopping returns at once. When the server goes away (a restart, a failover) it wakes the
callback, reconnects with a bounded backoff (LISTEN_RETRY_MIN_S doubling to
LISTEN_RETRY_MAX_S) and wakes the callback again once listening: a notification may have
been missed meanwhile. While it LISTENs, this process may serve control reads from
:data:`.shared.CONTROL_CACHE`; a ``control`` notification marks that stale before the
callback runs, and so does the connection's loss.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from ...errors import HarnessError
from .connect import connect
from .shared import CHANNEL, CONTROL_CACHE, CONTROL_PAYLOAD

#: A listener whose server went away reconnects after this long, doubling up to the max.
LISTEN_RETRY_MIN_S = 0.1
LISTEN_RETRY_MAX_S = 2.0


def listening(url: str) -> psycopg.Connection[Any]:
    """A new connection that LISTENs on :data:`CHANNEL` (raises when the server is away)."""
    conn = connect(url, autocommit=True)
    conn.execute(f"LISTEN {CHANNEL}")
    return conn


def listen(url: str, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` from a thread on every notification on :data:`CHANNEL` (and
    around a reconnection); returns the function that stops the thread and waits for
    it. The first connection is made here, so an unreachable server raises at once."""
    first: psycopg.Connection[Any] | None = listening(url)
    CONTROL_CACHE.listening(url)
    wake_r, wake_w = os.pipe()

    def run() -> None:
        conn, delay = first, LISTEN_RETRY_MIN_S
        try:
            while True:
                if conn is None:
                    # The server went away: reconnect with a bounded backoff, still
                    # stoppable at once; a notification may have been missed, so the
                    # waiter is woken once connected again.
                    if select.select([wake_r], [], [], delay)[0]:
                        return
                    try:
                        conn = listening(url)
                    except (HarnessError, psycopg.Error):
                        delay = min(delay * 2, LISTEN_RETRY_MAX_S)
                        continue
                    CONTROL_CACHE.listening(url)
                    delay = LISTEN_RETRY_MIN_S
                    callback()
                ready, _, _ = select.select([conn.fileno(), wake_r], [], [])
                if wake_r in ready:
                    return
                try:
                    payloads = [note.payload for note in conn.notifies(timeout=0)]
                except psycopg.Error:
                    conn.close()
                    conn = None
                    CONTROL_CACHE.lost(url)
                    callback()  # wake the waiter to find out
                    continue
                if CONTROL_PAYLOAD in payloads:
                    CONTROL_CACHE.changed(url)  # before the wake-up: its step reads anew
                if payloads:
                    callback()
        finally:
            if conn is not None:
                conn.close()
                CONTROL_CACHE.lost(url)
            os.close(wake_r)

    thread = threading.Thread(target=run, name="harness-queue-listen", daemon=True)
    thread.start()

    def stop() -> None:
        os.write(wake_w, b"x")
        os.close(wake_w)
        thread.join(timeout=5)
    return stop
