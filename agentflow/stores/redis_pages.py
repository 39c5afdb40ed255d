"""Reading many Redis sorted sets as one, newest first, a page at a time.

The store's indexes are sorted sets scored by time; a listing reads several of them
merged (one per status, time bucket and, on a cluster, shard), ordered by ``(score,
member)`` descending, from a cursor on. :class:`Pages` keeps a few entries of each set
fetched ahead and hands out the largest head of all (a k-way merge), fetching more of a
set only once its fetched entries are used up and only as many as are still wanted; the
sets that need more are fetched together, one round trip for all of them. So a page
costs what it returns, plus a couple of entries per set, whatever the sets hold.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import Any

from .redis_wire import Command, Wire

__all__ = ["Pages", "score_pairs"]

_TIES = 10_000  # entries sharing one score that paging tells apart


def score_pairs(reply: Any) -> list[tuple[bytes, float]]:
    """A WITHSCORES reply (flat in RESP2, pairs in RESP3) as ``(member, score)``."""
    if reply and isinstance(reply[0], list | tuple):
        return [(m, float(s)) for m, s in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]


class _Rev:
    """A member ordered backwards, so the min-heap hands out the largest first."""

    __slots__ = ("member",)

    def __init__(self, member: bytes) -> None:
        self.member = member

    def __lt__(self, other: _Rev) -> bool:
        return self.member > other.member

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Rev) and self.member == other.member

    __hash__ = None  # type: ignore[assignment]


class Pages:
    """The entries of the sorted sets ``keys`` merged, newest first, past ``cursor``.

    Args:
        wire: the store's round trips.
        what: the operation, for error messages.
        keys: the sorted sets.
        cursor: ``(score, member)`` of the last entry of the previous page: only entries
            below it are read; None for the first page.
    """

    def __init__(
        self, wire: Wire, what: str, keys: Sequence[bytes], cursor: tuple[float, bytes] | None
    ) -> None:
        self.wire = wire
        self.what = what
        self.keys = keys
        self._marks: list[tuple[float, bytes] | None] = [cursor] * len(keys)  # where each next read starts
        self._ahead: list[deque[tuple[float, bytes]]] = [deque() for _ in keys]
        self._done = [False] * len(keys)  # nothing left past the mark
        self._heads: list[tuple[float, _Rev, int]] = []  # each set's largest entry not handed out
        self._dry = list(range(len(keys)))  # sets to fetch from before the next entry is handed out
        self._first = True

    async def take(self, count: int) -> list[tuple[float, bytes, int]]:
        """The next ``count`` entries (fewer when the sets hold no more) as ``(score,
        member, index of its set)``."""
        out: list[tuple[float, bytes, int]] = []
        while len(out) < count:
            if self._dry:
                dry, self._dry = self._dry, []
                await self._fetch(dry, count - len(out))
                for i in dry:
                    self._push(i)
            if not self._heads:
                break
            neg, rev, i = heapq.heappop(self._heads)
            out.append((-neg, rev.member, i))
            if not self._push(i) and not self._done[i]:
                self._dry.append(i)  # its next entry may be larger than every other head
        return out

    def _push(self, i: int) -> bool:
        if not self._ahead[i]:
            return False
        at, member = self._ahead[i].popleft()
        heapq.heappush(self._heads, (-at, _Rev(member), i))
        return True

    async def _fetch(self, which: list[int], want: int) -> None:
        """Read more entries of each of the sets ``which``, past their marks, in one round
        trip: as many as are still wanted, or, on the first read of many sets, twice their
        share of it (a set that holds more is read again once its share is used)."""
        if self._first and len(which) > 1:
            size = 2 * want // len(which) + 2
        else:
            size = want + 1
        self._first = False
        commands: list[Command] = []
        for i in which:
            key, mark = self.keys[i], self._marks[i]
            if mark is None:
                commands.append(_zrange(key, b"+inf", size))
            else:
                at = repr(mark[0]).encode()
                commands.append(_zrange(key, b"(" + at, size))
                commands.append([b"ZRANGE", key, at, at, *_REV, b"0", b"%d" % _TIES, b"WITHSCORES"])
        replies = await self.wire.retrying(self.what, None, lambda: self.wire.call(commands))
        pos = 0
        for i in which:
            mark = self._marks[i]
            fetched: list[tuple[float, bytes]] = []
            if mark is not None:  # those sharing the mark's score, past its member
                fetched += [(s, m) for m, s in score_pairs(replies[pos + 1]) if m < mark[1]]
            below = score_pairs(replies[pos])
            pos += 1 if mark is None else 2
            fetched += [(s, m) for m, s in below]
            self._done[i] = len(below) < size
            if fetched:
                self._marks[i] = fetched[-1]
                self._ahead[i].extend(fetched)


_REV = (b"BYSCORE", b"REV", b"LIMIT")


def _zrange(key: bytes, top: bytes, size: int) -> Command:
    return [b"ZRANGE", key, top, b"-inf", *_REV, b"0", b"%d" % size, b"WITHSCORES"]
