"""Live updates: one watcher of the home, fanned out to every Server-Sent-Events client.

:func:`home_changes` is the only place that knows *how* a change is noticed: today inotify
on ``coordination/`` through :func:`daemons.wakeup.watch_changes` (the wake-ups the daemons
use; appends to the event log and worker heartbeats included, lock files excluded). When the
queue port offers ``wait(timeout)`` ("block until the queue may have changed"), that
function is the one to switch.

:class:`ChangeFeed` runs one task that waits on it, lets a burst of writes settle for
:data:`SETTLE_S` (and keeps notices :data:`MIN_INTERVAL_S` apart), then bumps
``generation`` and wakes every waiting client at once (one :class:`asyncio.Event` per
generation). An idle client costs nothing but a keep-alive
comment every :data:`KEEPALIVE_S`. The browser reacts to a ``change`` event by fetching the
live part of its page once (no polling loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

from coordination.paths import Home

#: Writes arrive in bursts (temp file, rename, event line): one notice for the burst.
SETTLE_S = 0.05
#: At most one notice per this many seconds: a busy fleet changes the home many times a
#: second, and every notice makes each open page render again. Well inside the 1 s in
#: which a page must show a change.
MIN_INTERVAL_S = 0.25
#: Keeps proxies and the browser from timing the stream out; also how soon a client that
#: went away unnoticed is found out.
KEEPALIVE_S = 25.0


@contextlib.asynccontextmanager
async def home_changes(home: Home) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Yield ``wait()``: an awaitable that returns once the home may have changed since the
    previous call (spurious returns are allowed, missed changes are not)."""
    from ..wakeup import watch_changes

    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    pending = asyncio.Event()
    loop.add_reader(read_fd, pending.set)

    async def wait() -> None:
        await pending.wait()
        pending.clear()
        with contextlib.suppress(BlockingIOError):
            while os.read(read_fd, 4096):
                pass

    try:
        with watch_changes(str(home.coordination), write_fd) as watching:
            if not watching:
                raise RuntimeError(f"cannot watch {home.coordination} with inotify")
            yield wait
    finally:
        loop.remove_reader(read_fd)
        os.close(read_fd)
        os.close(write_fd)


class ChangeFeed:
    """The generation counter every SSE client follows (see the module docstring)."""

    def __init__(self, home: Home, settle_s: float = SETTLE_S,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.home = home
        self.settle_s = settle_s
        self.min_interval_s = min_interval_s
        self.generation = 0
        self.closed = False
        self._bumped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._pump(ready), name="harness-web-changes")
        await ready.wait()

    async def _pump(self, ready: asyncio.Event) -> None:
        try:
            async with home_changes(self.home) as wait:
                ready.set()
                loop = asyncio.get_running_loop()
                last = loop.time() - self.min_interval_s
                while not self.closed:
                    await wait()
                    since = loop.time() - last
                    await asyncio.sleep(max(self.settle_s, self.min_interval_s - since))
                    self.bump()
                    last = loop.time()
        finally:
            ready.set()

    def bump(self) -> None:
        """A new generation: wakes every waiting client."""
        self.generation += 1
        bumped, self._bumped = self._bumped, asyncio.Event()
        bumped.set()

    def close(self) -> None:
        """End every stream (server shutdown); safe to call twice."""
        if not self.closed:
            self.closed = True
            self.bump()

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def next(self, seen: int, timeout: float) -> int:
        """The generation once it is past ``seen``, or ``seen`` after ``timeout``."""
        if self.generation == seen and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._bumped.wait(), timeout)
        return self.generation

    async def stream(self) -> AsyncIterator[bytes]:
        """One client's ``text/event-stream``: ``hello``, then a ``change`` per generation,
        keep-alive comments while idle; ends when the feed closes."""
        seen = self.generation
        yield f"retry: 2000\nevent: hello\ndata: {seen}\n\n".encode()
        while not self.closed:
            current = await self.next(seen, KEEPALIVE_S)
            if self.closed:
                break
            if current == seen:
                yield b": keep-alive\n\n"
            else:
                seen = current
                yield f"event: change\ndata: {seen}\n\n".encode()
