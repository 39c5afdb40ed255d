"""The inbox: every pending approval of the served workflows, newest first, filtered and paged.

Each served workflow's approvals come from its runner's ``approvals(...)`` (the store's
approval index, not a scan of runs); the inbox merges them newest first. A page's
cursor says where each workflow's list stopped, so the next page goes on from there in
every list at once and no approval is shown twice or skipped.

Filters: ``workflow``, ``kind``, ``mine`` (those the reviewer may decide: naming them as
an approver, or a ``tool_outcome`` with no approvers, which anyone may decide) and
``age`` (older than: ``"30m"``, ``"1h"``, ``"1d"``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import heapq
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import StoreError
from ..runner import WorkflowRunner
from ..types import Approval
from .desk import Desk, can_decide

__all__ = ["Filters", "Page", "KINDS", "page", "parse_age"]

KINDS = ("gate", "tool_call", "tool_outcome")
_AGE = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Approvals asked of a list at once when a filter the index cannot apply skips some.
_BATCH = 100
#: The end of a list (its cursor once every approval of it was shown).
_DONE = "~"


def parse_age(text: str | None) -> float | None:
    """Seconds of an age filter (``"90s"``, ``"30m"``, ``"1h"``, ``"2d"``); None for none.

    Raises:
        ValueError: not a number and one of the units s, m, h, d.
    """
    if not text:
        return None
    m = _AGE.match(text)
    if m is None:
        raise ValueError(f"age {text!r}: write a number and a unit, e.g. 30m, 1h, 2d")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class Filters:
    """What the inbox shows: see the module's docstring."""

    workflow: str | None = None
    kind: str | None = None
    mine: bool = False
    age: float | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """A page of the inbox: approvals newest first, whether the reviewer may decide each,
    and the cursor of the next page (None on the last)."""

    items: list[tuple[Approval, bool]]
    next: str | None


Fetch = Callable[[str | None, int], Awaitable[list[Approval]]]


@dataclass
class _List:
    """One source of approvals (a workflow's, maybe filtered) and where it stands."""

    key: str
    fetch: Fetch
    keep: Callable[[Approval], bool] | None
    after: str | None
    buffered: list[Approval]
    ended: bool = False


def _encode(cursor: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(cursor, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode(cursor: str | None) -> dict[str, str]:
    if not cursor:
        return {}
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise ValueError("the page cursor is damaged; go back to the first page") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ValueError("the page cursor is damaged; go back to the first page")
    return {str(k): v for k, v in raw.items()}


def _fetch(runner: WorkflowRunner, workflow: str, kind: str | None, approver: str | None) -> Fetch:
    """A page of ``workflow``'s pending approvals from the store's index, after an id."""

    def fetch(after: str | None, limit: int) -> Awaitable[list[Approval]]:
        return runner.approvals(approver=approver, workflow=workflow, kind=kind, limit=limit, after=after)

    return fetch


def _lists(desk: Desk, reviewer: str, filters: Filters, cursor: dict[str, str]) -> list[_List]:
    cutoff = None if filters.age is None else time.time() - filters.age

    def old_enough(a: Approval) -> bool:
        return cutoff is None or a.created_at.timestamp() <= cutoff

    def anyones(a: Approval) -> bool:
        return not a.approvers and old_enough(a)

    age = None if cutoff is None else old_enough
    names = desk.workflows if filters.workflow is None else [filters.workflow]
    sources: list[tuple[str, Fetch, Callable[[Approval], bool] | None]] = []
    for name in names:
        runner = desk.runner(name)
        if not filters.mine:
            sources.append((name, _fetch(runner, name, filters.kind, None), age))
            continue
        sources.append((f"{name}\0by", _fetch(runner, name, filters.kind, reviewer), age))
        if filters.kind in (None, "tool_outcome"):  # anyone may decide one without approvers
            sources.append((f"{name}\0anyone", _fetch(runner, name, "tool_outcome", None), anyones))
    out = []
    for key, fetch, keep in sources:
        at = cursor.get(key)
        out.append(_List(key, fetch, keep, at, [], ended=at == _DONE))
    return out


async def _fill(src: _List, want: int) -> None:
    """Buffer up to ``want`` approvals of ``src`` that pass its filter (or all it has left)."""
    while not src.ended and len(src.buffered) < want:
        need = want - len(src.buffered)
        batch = need if src.keep is None else max(need, _BATCH)
        got = await src.fetch(src.after, batch)
        src.buffered += got if src.keep is None else [a for a in got if src.keep(a)]
        if got:
            src.after = got[-1].id
        if len(got) < batch:
            src.ended = True


async def page(
    desk: Desk, reviewer: str, filters: Filters, limit: int = 50, after: str | None = None
) -> Page:
    """A page of at most ``limit`` pending approvals, newest first, after cursor ``after``.

    Raises:
        ValueError: ``after`` is not a cursor this inbox made.
        RunNotFoundError: ``filters.workflow`` is not served here.
    """
    cursor = _decode(after)
    try:
        return await _page(desk, reviewer, filters, limit, cursor)
    except StoreError:
        if not cursor:
            raise
        # A list's last shown approval is gone from the store (its run deleted): start over.
        return await _page(desk, reviewer, filters, limit, {})


async def _page(desk: Desk, reviewer: str, filters: Filters, limit: int, cursor: dict[str, str]) -> Page:
    sources = _lists(desk, reviewer, filters, cursor)
    starts = {s.key: s.after for s in sources}
    await asyncio.gather(*(_fill(src, limit + 1) for src in sources))  # each list is a store call
    # Newest first by (created_at, id), as each list is sorted.
    merged = heapq.merge(
        *([(s.key, a) for a in s.buffered] for s in sources),
        key=lambda ka: (-ka[1].created_at.timestamp(), _desc(ka[1].id)),
    )
    taken: list[tuple[str, Approval]] = []
    for item in merged:
        if len(taken) == limit:
            break
        taken.append(item)
    shown = {s.key: 0 for s in sources}
    last: dict[str, str | None] = dict(starts)
    for key, a in taken:
        shown[key] += 1
        last[key] = a.id
    more = False
    nxt: dict[str, str] = {}
    for src in sources:
        left = len(src.buffered) > shown[src.key] or not src.ended
        more = more or left
        at = last[src.key] if left else _DONE
        if at is not None:
            nxt[src.key] = at
    items = [(a, can_decide(a, reviewer)) for _, a in taken]
    return Page(items, _encode(nxt) if more else None)


class _desc(str):
    """A string that sorts in reverse (ids descending, after created_at descending)."""

    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)
