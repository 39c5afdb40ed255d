"""Live inbox updates: one watcher per app looks at the newest pending approvals and tells
every open page (a server-sent event ``approvals``) which arrived and which left.

The watcher runs only while a page listens. It reads the first approvals of each served
workflow (from the approval index: the cost is the page, not the store) every
``interval`` seconds, so an approval decided in another process, or one that arrives
from any run, reaches an open inbox within about half a second. On a store that pushes
its changes (``ChangeFeed``: Redis, PostgreSQL) it looks as soon as a run changes
(at most every ``_SOON`` seconds), and every ``_BACKSTOP`` seconds besides. A page that
hears of a change fetches its own filtered list again; ``added`` and ``removed`` are
the ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from sse_starlette import EventSourceResponse, ServerSentEvent

from ..errors import StoreError
from ..stores.capabilities import ChangeFeed

__all__ = ["Watch"]

log = logging.getLogger("agentflow.review")

#: Seconds between two looks while a store's feed pushes changes (a backstop), and at
#: least between two looks it prompts (the changes of a burst are read together).
_BACKSTOP, _SOON = 2.0, 0.05

Snapshot = Callable[[], Awaitable[set[str]]]


class Watch:
    """Tells listeners which approvals arrived and which were decided since the last look.

    Args:
        snapshot: the ids of the newest pending approvals (what a look reads).
        interval: seconds between two looks (without a change feed).
        feeds: the served stores (each once); those that push changes prompt a look.
    """

    def __init__(self, snapshot: Snapshot, interval: float = 0.5, feeds: Sequence[object] = ()) -> None:
        self._snapshot = snapshot
        self.interval = interval
        self._feeds = [f for f in feeds if isinstance(f, ChangeFeed)]
        self._changed = asyncio.Event()
        self._queues: set[asyncio.Queue[dict[str, list[str]]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._seen: set[str] | None = None
        self._looked = asyncio.Event()  # the running watcher made its first look

    def listen(self) -> asyncio.Queue[dict[str, list[str]]]:
        """A queue of ``{"added": [...], "removed": [...]}`` changes, from now on."""
        queue: asyncio.Queue[dict[str, list[str]]] = asyncio.Queue(maxsize=100)
        self._queues.add(queue)
        if self._task is None or self._task.done():
            self._looked = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="review-watch")
        return queue

    def leave(self, queue: asyncio.Queue[dict[str, list[str]]]) -> None:
        """Stop telling ``queue``; the watcher stops with its last listener."""
        self._queues.discard(queue)

    async def close(self) -> None:
        """Stop the watcher (the app shuts down)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        feeds = [asyncio.create_task(self._follow(f), name="review-feed") for f in self._feeds]
        try:
            await self._look()
        finally:
            for task in feeds:
                task.cancel()
            for task in feeds:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _follow(self, feed: ChangeFeed) -> None:
        """Prompt a look whenever ``feed`` tells of a change; start it again when cut."""
        while True:
            try:
                await feed.changes(lambda run_id: self._changed.set())
            except StoreError as exc:
                log.warning("review page: the store's change feed was cut (%s); looking every second", exc)
                self._changed.set()
                await asyncio.sleep(1.0)

    async def _wait(self) -> None:
        """Until the next look is due."""
        if not self._feeds:
            await asyncio.sleep(self.interval)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), _BACKSTOP)
        await asyncio.sleep(_SOON)
        self._changed.clear()

    async def _look(self) -> None:
        self._seen = None
        while self._queues:
            now: set[str] | None
            try:
                now = await self._snapshot()
            except Exception as exc:  # a store outage, say: the open pages wait for the next look
                log.warning("review page: reading the approvals failed: %s: %s", type(exc).__name__, exc)
                now = self._seen
            if now is not None and self._seen is not None and now != self._seen:
                change = {"added": sorted(now - self._seen), "removed": sorted(self._seen - now)}
                for queue in list(self._queues):
                    if queue.full():  # a listener that does not read: drop its oldest news
                        queue.get_nowait()
                    queue.put_nowait(change)
            self._seen = now
            self._looked.set()
            await self._wait()
        self._task = None

    def response(self, ping: float = 15.0) -> EventSourceResponse:
        """The ``text/event-stream`` response of one page: ``approvals`` events until it leaves."""
        queue = self.listen()

        async def stream() -> AsyncIterator[ServerSentEvent]:
            try:
                await self._looked.wait()  # changes from here on reach this page
                yield ServerSentEvent(comment="listening")
                while True:
                    change = await queue.get()
                    yield ServerSentEvent(data=json.dumps(change), event="approvals")
            finally:
                self.leave(queue)

        return EventSourceResponse(stream(), ping=ping, headers={"Cache-Control": "no-store"})
