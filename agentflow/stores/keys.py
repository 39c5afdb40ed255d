"""Keys: every Redis key agentflow uses, built in one place from ``key_prefix``.

Two layouts. The plain one (one Redis server) is the one agentflow always used; the
cluster one (Redis Cluster) is the same but for the index keys, which it shards over
slots. Run keys are the same in both. ``P`` is the key prefix, verbatim; ``<id>`` and
``<wf>`` are escaped; ``I`` is ``P#`` in the plain layout and ``P#ix{<tag>}:`` in the
cluster one (one of :data:`SHARDS` tags, below)::

    P#run:{<id>}:rec        HASH   the RunRecord, one JSON string per field
    P#run:{<id>}:events     LIST   the run's events, JSON, oldest first
    P#run:{<id>}:outputs    LIST   the run's step outputs, JSON, oldest first
    P#run:{<id>}:journal    HASH   journal key -> JSON value
    Ist:<status>            ZSET   runs by status (every workflow), scored by created_at
    Iwf:<wf>:st:<status>    ZSET   the workflow's runs by status, scored by created_at
    Iwf:<wf>:gates          ZSET   the workflow's runs waiting at a gate with a deadline,
                                   scored by that deadline
    P#buckets               ZSET   the time buckets of finished runs' index keys (below)
    P#changes               (pub/sub channel) a run's ``rec`` key, when it is created or its
                                   status, pending approvals or control flag change
    Iap:all                 ZSET   pending approvals, member ``<id> NUL <run id>``, scored
                                   by their created_at
    Iap:wf:<wf>             ZSET   the same, of one workflow's runs
    Iap:kind:<kind>         ZSET   the same, of one kind
    Iap:by:<approver>       ZSET   the same, that ``approver`` may decide
    Iap:at                  HASH   approval id -> ``<score> NUL <run id>``: where a pending
                                   approval sorts, so a page can start after it
    Iap:gone:<day>          HASH   the same for approvals decided on that day (UTC); the key
                                   expires two days later
    P#limit:{<key>}:calls   ZSET   an agent rate limit's calls in its window, scored by when
                                   they went (see ``redis_limits``; ``<key>`` escaped)
    P#limit:{<key>}:tokens  HASH   the same calls' tokens
    P#limit:{<key>}:slots   ZSET   its concurrency slots held, scored by when they expire
    P#{credentials}         HASH   credential key -> JSON value (the review page's
                                   reviewers and session key; see ``redis_credentials``)

Unambiguous: ``#`` is escaped everywhere after the prefix, so the prefix is what comes
before a key's last ``#``: two prefixes never build the same key, whatever run ids or
workflow names they are given. Run ids and workflow names are escaped (``%XX`` for
``%``, ``#``, ``:``, ``{``, ``}``, spaces and control characters), so an id cannot
close its hash tag nor pass for another key's tail.

The four keys of a run share the hash tag ``{<id>}``, so the run's scripts, which
touch all of them, run on Redis Cluster. Index keys span runs, so they cannot share it:
they are written in front of the scripts (in the same round trip on one server; on a
cluster, confirmed before the script is sent) and may briefly disagree with the
records; readers check every entry against the record. An index entry is ``<run id>
NUL <version>``: the record's ``_ix`` field holds the version of its current entries,
and a write that changes the run's status gives it a new one. An entry whose version
the record no longer holds is stale for good, so dropping it can never drop a live
entry, whoever re-added the run meanwhile.

Shards (cluster layout): a run's index entries go to the shard of its id
(:meth:`Keys.shard_of`; an approval's place, to that of the approval's id), so every
index command names one key, and the writes of many runs spread over the cluster's
nodes; readers read every shard and merge. The tags are picked so that their slots are
evenly spaced over the 16,384, which spreads the shards evenly over masters that split
the slots evenly. The plain layout is one shard: its keys are the ones older versions
wrote.

Finished runs, with a ttl, are indexed in time buckets (``...:st:<status>:t<w>.<n>``:
bucket ``n`` of width ``w`` ms, by the time the run expires), and each bucket key
expires a little after the last run it can hold. Index entries leave with their runs,
without a reaper. ``P#buckets`` lists the buckets in use, scored by when they expire.
"""

from __future__ import annotations

import binascii
import re
from typing import NamedTuple

from ..errors import StoreError

__all__ = ["SHARDS", "Bucket", "Keys", "RunKeys", "entry", "entry_run", "escape", "limit_keys", "slot"]

_UNSAFE = re.compile(r"[%#:{}\x00-\x20\x7f]")

# A bucket is at least this wide, and its key outlives its last run by one width.
_MIN_WIDTH_MS = 60_000

#: Index shards of the cluster layout. Every process sharing a cluster and key prefix
#: must use the same number: it decides where each run's entries are.
SHARDS = 16

_SLOTS = 16_384  # Redis Cluster's hash slots


def slot(key: bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (CRC16 of its hash tag, or of the whole key)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % _SLOTS


def _shard_tags(n: int) -> tuple[str, ...]:
    """``n`` hash tags whose slots fall one in each ``n``-th of the slots."""
    tags: list[str | None] = [None] * n
    k = 0
    while None in tags:
        tag = f"s{k}"
        i = slot(tag.encode()) * n // _SLOTS
        if tags[i] is None:
            tags[i] = tag
        k += 1
    return tuple(t for t in tags if t is not None)


def escape(part: str) -> str:
    """``part`` with the characters that structure a key replaced by ``%XX``."""
    return _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", part)


def limit_keys(prefix: str, key: str) -> list[str]:
    """The keys of rate limit ``key`` under ``prefix``: calls, tokens, slots; one hash tag,
    so the script that takes a turn names one slot of a cluster (the same in both layouts)."""
    base = f"{prefix}#limit:{{{escape(key)}}}"
    return [f"{base}:calls", f"{base}:tokens", f"{base}:slots"]


def entry(run_id: str, version: bytes) -> bytes:
    """The index member of ``run_id`` at ``version``.

    Ordered like the run ids (the NUL sorts first), so ties on the score page by id.
    """
    return run_id.encode() + b"\0" + version


def entry_run(member: bytes) -> tuple[str, bytes]:
    """``(run_id, version)`` of an index member."""
    run_id, _, version = member.partition(b"\0")
    return run_id.decode(errors="replace"), version


class RunKeys(NamedTuple):
    """The keys holding one run; all in one Redis Cluster slot."""

    rec: str
    events: str
    outputs: str
    journal: str


class Bucket(NamedTuple):
    """The time bucket a finished run's index entries go to (see the module doc)."""

    name: str  # "<width ms>.<n>"
    expires_at: float  # Unix seconds the bucket's keys may go, on any clock within a width
    ttl_ms: int  # how long from now (this machine's clock) the keys must live


class Keys:
    """Builds every key from ``prefix``.

    Args:
        prefix: prepended verbatim to every key (e.g. ``"deploy:"``).
        cluster: the cluster layout (index keys sharded over :data:`SHARDS` slots);
            else the plain one.

    Raises:
        StoreError: ``cluster`` with a prefix whose braces would put the keys of one run
            in different slots (say ``"app{}"``).
    """

    def __init__(self, prefix: str = "", cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self._base = f"{prefix}#"
        if cluster:
            tags = _shard_tags(SHARDS)
            self._shards = tuple(f"{self._base}ix{{{tag}}}:" for tag in tags)
            sample = self.run("r")
            if len({slot(k.encode()) for k in sample}) != 1:
                raise StoreError(
                    f"key_prefix {prefix!r} cannot be used on Redis Cluster: its braces make a hash tag "
                    "that would put one run's keys in different slots; drop the braces or close them "
                    'around a name ("{app}:" keeps every key in one slot)'
                )
        else:
            self._shards = (self._base,)
        #: The shards a reader reads (``range(1)`` in the plain layout).
        self.shards = range(len(self._shards))

    def shard_of(self, name: str) -> int:
        """The index shard of run (or approval) ``name``: 0 in the plain layout."""
        n = len(self._shards)
        return binascii.crc_hqx(name.encode(), 0) % n if n > 1 else 0

    def run(self, run_id: str) -> RunKeys:
        """The keys of run ``run_id``.

        Raises:
            StoreError: the run id is empty (its keys would have no hash tag).
        """
        if not run_id:
            raise StoreError("a run id must not be empty")
        base = f"{self._base}run:{{{escape(run_id)}}}:"
        return RunKeys(base + "rec", base + "events", base + "outputs", base + "journal")

    def status(
        self, status: str, workflow: str | None = None, bucket: str | None = None, shard: int = 0
    ) -> str:
        """The index of runs in ``status`` (of ``workflow``, or of every workflow), in ``shard``.

        ``bucket`` names a time bucket of a finished status (see :meth:`bucket`).
        """
        base = self._shards[shard]
        scope = base if workflow is None else f"{base}wf:{escape(workflow)}:"
        key = f"{scope}st:{status}"
        return key if bucket is None else f"{key}:t{bucket}"

    def gates(self, workflow: str, shard: int = 0) -> str:
        """The index of ``workflow``'s runs waiting at a gate, scored by its deadline."""
        return f"{self._shards[shard]}wf:{escape(workflow)}:gates"

    def approvals(self, scope: str = "all", value: str | None = None, shard: int = 0) -> str:
        """An index of pending approvals: ``all``, or by ``wf``, ``kind`` or ``by`` (approver) ``value``."""
        base = self._shards[shard]
        return f"{base}ap:all" if value is None else f"{base}ap:{scope}:{escape(value)}"

    def approval_places(self, day: int | None = None, shard: int = 0) -> str:
        """Where approvals sort: pending ones, or (``day``, days since 1970 UTC) those decided then."""
        base = self._shards[shard]
        return f"{base}ap:at" if day is None else f"{base}ap:gone:{day}"

    def changes(self) -> str:
        """The pub/sub channel a run's record key is published on when the run changes status."""
        return f"{self._base}changes"

    def credentials(self) -> str:
        """The hash of the prefix's credentials: one key with a hash tag of its own, the same
        in both layouts."""
        return f"{self._base}{{credentials}}"

    def buckets(self) -> str:
        """The registry of time buckets in use, scored by when their keys expire."""
        return f"{self._base}buckets"

    @staticmethod
    def bucket(ttl: float, now: float) -> Bucket:
        """The bucket of a run finishing at ``now`` (this machine's clock) that expires after ``ttl``.

        Buckets are an eighth of the ttl wide (a minute at least), so about ten are in
        use at a time, and each key outlives the runs it holds by at most two widths.
        The key's lifetime is given relative to ``now``: a clock that is off shifts the
        bucket, not how long its runs stay indexed.
        """
        width = max(_MIN_WIDTH_MS, int(ttl * 1000) // 8)
        n = int((now + ttl) * 1000) // width
        end = (n + 2) * width  # the bucket's end, plus a width of slack
        return Bucket(f"{width}.{n}", end / 1000, max(1, end - int(now * 1000)))
