"""Following many runs on a store without a change feed: one look at all of them.

A store that cannot push changes but can read many runs' versions at once
(:class:`~agentflow.stores.capabilities.ReadsVersions`: SQLite) is looked at by one
task per process every :data:`POLL` seconds, for every run a watcher here waits on; the
waiters of a run whose version changed (or that is seen for the first time, or is gone)
are woken and read it. A run that only moved on (new events, the same status and control
flag) wakes the watchers of its events, not those waiting for a status (``result()``,
``wait_for()``): a client following runs of ten steps reads each about three times, not
once per step. Without it, each waiter read its run's whole record every 100 ms:
a client waiting on 2,000 runs made 20,000 reads a second.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..errors import AgentflowError
from ..stores.capabilities import ReadsVersions

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["POLL", "follow"]

log = logging.getLogger("agentflow")

#: Seconds between two looks at the runs waited on.
POLL = 0.1

_UNSEEN = object()


async def follow(root: Supervisor, store: ReadsVersions) -> None:
    """Until the supervisor stops: every :data:`POLL` seconds, the versions of the runs
    waited on here, and a wake-up for the waiters of each one that changed."""
    notifier = root.notifier
    seen: dict[str, Any] = {}
    while not root.stopping:
        await asyncio.sleep(POLL)
        ids = list(notifier.waiters)
        if not ids:
            seen.clear()
            continue
        try:
            versions = await store.versions(ids)
        except AgentflowError as exc:  # the waiters look for themselves meanwhile (every second)
            root._feed_up = False
            log.debug("looking at the runs waited on failed (%s); trying again", exc)
            continue
        root._feed_up = True
        fresh: dict[str, Any] = {}
        for run_id in ids:
            version = versions.get(run_id)
            before = seen.get(run_id, _UNSEEN)
            if version is None or before is _UNSEEN or before is None or before[0] != version[0]:
                notifier.notify(run_id)  # new to this look, gone, or a new status or control flag
            elif before != version:
                notifier.notify_steps(run_id)  # moved on: only the watchers of its events care
            fresh[run_id] = version
        seen = fresh
