"""Where the SQLite store's calls run: inline on a connection that never waits, else on its thread.

A call first runs on the caller's thread (the event loop's), on a
connection that never waits: its ``busy_timeout`` is 0, so when another connection
(another process, or this store's own thread) holds the write lock, SQLite answers
SQLITE_BUSY at once, the call's transaction has written nothing, and the call is handed
to the store's thread, which owns a second connection that waits for the lock
(``busy_timeout``) while the loop goes on. Reads never wait for writers in WAL mode, so
they stay on the loop, and so do writes that flush nothing to the disk: at
``durability="normal"`` every write, at ``"full"`` lease renewals. What may take long
goes to the thread from the start: every other write at ``"full"`` (a commit flushes
the disk there, a tenth of a millisecond on an idle SSD but milliseconds on a busy
one), deletes (as long as the run is big), and the purge of expired runs. Checkpoints
flush the disk too, so the loop's connection never runs one: after about 16 MB
written on it, it asks the thread for one, in two parts. The first copies the WAL
while the loop goes on writing; the second takes the write lock, copies what was
written meanwhile and starts the WAL over (a checkpoint racing a writer that never
pauses cannot finish, and the WAL would only grow), and the loop's writes go to the
thread while it runs. Only the thread of the first call has a loop connection;
calls from other threads (another event loop) go to the store's thread. ``sibling()``
gives a second store (thread and connections) on the same file, so lease renewals do
not queue behind a slow call.

This module holds the machinery: the loop's connection (one per thread and fork), the
store's thread fed by a queue (one wake-up each way per call), and the checkpoints it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from ..errors import StoreError
from . import sqlite_schema as sql

__all__ = ["BATCH", "CHECKPOINT_BYTES", "CONTENDED_FOR", "Durability", "TwoConnections"]

T = TypeVar("T")
Durability = Literal["normal", "full"]
#: Bytes written on the loop's connection after which the store's thread checkpoints
#: (SQLite's own automatic checkpoint comes at 1000 pages of 4 KiB, a quarter of it).
#: The part of a checkpoint the writes wait for costs about the same however long the
#: WAL: two flushes and what was written while the first part ran.
CHECKPOINT_BYTES = 16_000_000
#: Seconds after a write of the loop found the write lock taken during which the loop's
#: writes go together (one transaction a turn of the loop).
CONTENDED_FOR = 0.25
#: Calls the store's thread runs in one transaction at most (those waiting when it starts).
BATCH = 100
#: What one write costs in the WAL besides its values: a few whole pages.
_PAGES = 4 * 4096
# SQLITE_BUSY and SQLITE_LOCKED (primary codes): another connection has the lock.
_LOCKED = frozenset({5, 6})
# Bumped in a forked child: a connection opened before the fork is not used after it.
_forks = [0]
_inherited: list[sqlite3.Connection] = []  # the parent's loop connections, never closed here
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class TwoConnections:
    """The calls of a SQLite store: on the loop's connection first, on the store's thread when they must wait.

    The store sets the attributes below in its ``__init__``.
    """

    path: str
    durability: Durability
    _jobs: queue.SimpleQueue[_Job | None]
    _thread: threading.Thread | None
    _closed: bool
    _inline: sqlite3.Connection | None
    _home: tuple[int, int] | None
    _unchecked: int
    _checkpoint: _Pending
    _contended: float  # until when (monotonic) the loop's writes go together (see _together)
    _gathered: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], int]] | None

    async def _call(
        self,
        what: str,
        run_id: str | None,
        job: Callable[[sqlite3.Connection], T],
        inline: bool = True,
        write: bool = False,
        size: int = 0,
    ) -> T:
        """Run ``job(connection)`` on the loop's connection, or on the store's thread.

        With ``inline``, the job runs here first; if another connection holds the lock
        (SQLITE_BUSY: the job's transaction wrote nothing), it goes to the thread. A
        ``write`` (of about ``size`` bytes) goes to the thread while the second part of a
        checkpoint holds the write lock there (``_Pending.restarting``), so that the WAL
        starts over after it. For a while after a write found the lock taken, the loop's
        writes go together (:meth:`_together`).
        """
        if self._closed:
            subject = f"run {run_id}: " if run_id else ""
            raise StoreError(f"{subject}{what} refused: the SQLite store on {self.path} is closed")
        try:
            if inline and not (write and self._checkpoint.restarting):
                db = self._local()
                if db is not None:
                    if write and time.monotonic() < self._contended:
                        return await self._together(job, size)
                    try:
                        result = job(db)
                    except sqlite3.OperationalError as exc:
                        if exc.sqlite_errorcode & 0xFF not in _LOCKED:
                            raise
                        if write:
                            self._contended = time.monotonic() + CONTENDED_FOR
                    else:
                        if write:
                            self._wrote(size)
                        return result
            return await self._submit(job)
        except sqlite3.Error as exc:
            subject = f"run {run_id}: " if run_id else ""
            raise StoreError(f"{subject}SQLite {what} on {self.path} failed: {exc}") from exc

    def _together(self, job: Callable[[sqlite3.Connection], T], size: int) -> asyncio.Future[T]:
        """Run ``job`` with the other writes made in this turn of the loop, in one transaction.

        While other processes write the same file, each transaction is a turn at its one
        write lock: the writes a turn of the loop makes (many runs' commits) take one turn
        together, at its end, instead of one each, and those that find the lock taken
        go to the thread together, where they wait for it as one.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._gathered is None:
            self._gathered = []
            loop.call_soon(self._write_together)
        self._gathered.append((job, future, size))
        return future

    def _write_together(self) -> None:
        """Run the writes :meth:`_together` gathered: on the loop's connection if the lock is
        free at once, else on the store's thread (as one call); settle each one's future."""
        gathered, self._gathered = self._gathered or [], None
        if not gathered:  # written already (the store closed meanwhile)
            return
        jobs = [job for job, _, _ in gathered]
        futures = [future for _, future, _ in gathered]
        db = self._local()
        if db is not None and not self._checkpoint.restarting and not self._closed:
            try:
                outcomes = _all(jobs, db)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in _LOCKED:
                    _fail(futures, exc)
                    return
                self._contended = time.monotonic() + CONTENDED_FOR  # the lock is taken: the thread waits
            except BaseException as exc:
                _fail(futures, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            else:
                self._wrote(sum(size for _, _, size in gathered))
                _settle_each(futures, outcomes)
                return
        self._submit(functools.partial(_all, jobs)).add_done_callback(
            functools.partial(_settle_done, futures)
        )

    def _local(self) -> sqlite3.Connection | None:
        """The loop's connection if this thread is the one that uses it (and it is open)."""
        here = (_forks[0], threading.get_ident())
        if self._home == here:
            return self._inline
        if self._home is None or self._home[0] != here[0]:  # the first call, or in a forked child
            if self._inline is not None:
                _inherited.append(self._inline)  # the parent's: closing it here could disturb the parent
            self._home, self._inline = here, None
            self._submit(functools.partial(_open_inline, self.path)).add_done_callback(self._opened)
        return None

    def _opened(self, future: asyncio.Future[sqlite3.Connection]) -> None:
        """Take the loop's connection the thread opened (first queued job, so first done)."""
        if future.cancelled() or future.exception() is not None:
            self._home = None  # the next call tries again; this one's own job reports the error
        elif self._closed:
            future.result().close()
        else:
            self._inline = future.result()

    def _wrote(self, size: int) -> None:
        """Count a write on the loop's connection; now and then, ask the thread for a checkpoint."""
        self._unchecked += size + _PAGES
        if self._unchecked >= CHECKPOINT_BYTES:
            self._unchecked = 0
            if not self._checkpoint.pending:  # one at a time: those behind it would find nothing
                self._checkpoint.pending = True
                self._jobs.put((None, None, sql.checkpoint))

    def _submit(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._thread is None or not self._thread.is_alive():  # first call, or in a forked child
            self._checkpoint.pending = self._checkpoint.restarting = False
            args = (self._jobs, self.path, self.durability, self._checkpoint)
            self._thread = threading.Thread(target=_serve, args=args, name="agentflow-sqlite", daemon=True)
            self._thread.start()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future.get_loop(), future, job))
        return future


def _close(db: sqlite3.Connection) -> None:
    """The job that makes the store's thread close its connection and stop."""


def _open_inline(path: str, db: sqlite3.Connection) -> sqlite3.Connection:
    """The job that opens the loop's connection, once the thread's has made the file ready."""
    return sql.connect_inline(path)


#: A job, with the loop and future that wait for it (None for a checkpoint nobody waits for).
_Job = tuple[
    asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None", Callable[[sqlite3.Connection], Any]
]


class _Pending:
    """A checkpoint asked of the store's thread: ``pending`` from when the loop asks until
    it is done, ``restarting`` while its second part holds the write lock (the loop's
    writes go to the thread then). Set and cleared as the comments say.

    Plain attributes, not a lock or an event: a fork can never catch them held.
    """

    __slots__ = ("pending", "restarting")

    def __init__(self) -> None:
        self.pending = False  # set by the loop, cleared by the thread
        self.restarting = False  # set and cleared by the thread


def _serve(jobs: queue.SimpleQueue[_Job | None], path: str, durability: Durability, asked: _Pending) -> None:
    """The store's thread: runs the jobs on the connection it owns, settles each job's future.

    The jobs that wait when it takes one run with it, in one transaction (:func:`_run`):
    when the write lock is contended, or every write flushes the disk, a process waits
    for the lock and commits once for many calls instead of once for each.
    A plain thread and a queue rather than an executor: one wake-up each way per call.
    Checkpoints run on a connection of their own, which waits for locks only briefly,
    in one call (while the loop is busy, each call back into Python waits for its turn).
    """
    db: sqlite3.Connection | None = None
    checkpointer: sqlite3.Connection | None = None
    later: _Job | None = None  # a checkpoint or close met while gathering calls, run after them
    try:
        while True:
            item, later = (later, None) if later is not None else (jobs.get(), None)
            if item is None:
                return
            loop, future, job = item
            if job is sql.checkpoint or job is _close:
                outcome: tuple[Any, BaseException | None] = (None, None)
                try:
                    if job is sql.checkpoint:
                        try:
                            if checkpointer is None:
                                checkpointer = sql.connect_checkpointer(path, durability)
                            sql.checkpoint_behind(checkpointer)  # the loop goes on writing meanwhile
                            asked.restarting = True
                            sql.checkpoint(checkpointer)
                        finally:
                            asked.restarting = asked.pending = False  # writes go back to the loop
                    else:  # closed before close() returns
                        for connection in (checkpointer, db):
                            if connection is not None:
                                connection.close()
                        db = checkpointer = None
                except BaseException as exc:
                    outcome = (None, exc)
                _tell(loop, future, outcome)
                if job is _close:
                    return
                del item, loop, future, job, outcome
                continue
            batch, later = _gather(jobs, item)
            try:
                if db is None:
                    db = sql.connect(path, durability)
                    db.execute("PRAGMA busy_timeout = 0")  # the calls wait for the lock in _waiting
                _settle_all(batch, _run(db, [job for _, _, job in batch]))
            except BaseException as exc:  # the connection, or the shared BEGIN or COMMIT
                _settle_all(batch, [(None, exc)] * len(batch))
            del item, loop, future, job, batch  # hold nothing (the store included) while idle
            if later is not None and later[2] is _stop:
                return
    finally:
        for connection in (checkpointer, db):
            if connection is not None:
                connection.close()


def _gather(jobs: queue.SimpleQueue[_Job | None], first: _Job) -> tuple[list[_Job], _Job | None]:
    """``first`` and the calls queued behind it (up to ``BATCH``); and the checkpoint, close
    or end of the queue met while gathering them (run after them), if any."""
    batch = [first]
    while len(batch) < BATCH:
        try:
            more = jobs.get_nowait()
        except queue.Empty:
            break
        if more is None:
            return batch, (None, None, _stop)
        if more[2] is sql.checkpoint or more[2] is _close:
            return batch, more
        batch.append(more)
    return batch, None


def _settle_all(batch: list[_Job], outcomes: list[tuple[Any, BaseException | None]]) -> None:
    for (loop, future, _), outcome in zip(batch, outcomes, strict=True):
        _tell(loop, future, outcome)


def _each(
    jobs: list[Callable[[sqlite3.Connection], Any]], db: sqlite3.Connection
) -> list[tuple[Any, BaseException | None]]:
    """Run ``jobs`` one after the other in the transaction open on ``db``: each one's result
    or error (its own transaction a savepoint, rolled back alone)."""
    outcomes: list[tuple[Any, BaseException | None]] = []
    for job in jobs:
        try:
            outcomes.append((job(db), None))
        except Exception as exc:
            outcomes.append((None, exc))
    return outcomes


def _all(
    jobs: list[Callable[[sqlite3.Connection], Any]], db: sqlite3.Connection
) -> list[tuple[Any, BaseException | None]]:
    """:func:`_each` in one transaction: its own, or the one open already (the thread's
    batch). The write lock taken by another connection fails its ``BEGIN``, having
    written nothing.

    Raises:
        sqlite3.Error: the transaction could not begin or commit.
    """
    if db.in_transaction:
        return _each(jobs, db)
    db.execute("BEGIN IMMEDIATE")
    try:
        outcomes = _each(jobs, db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes


def _fail(futures: list[asyncio.Future[Any]], exc: BaseException) -> None:
    for future in futures:
        _settle(
            future, None, exc if isinstance(exc, Exception) else StoreError("the SQLite call was interrupted")
        )


def _settle_each(
    futures: list[asyncio.Future[Any]], outcomes: list[tuple[Any, BaseException | None]]
) -> None:
    """Settle each of ``futures`` with its outcome (a result, or an error)."""
    for future, outcome in zip(futures, outcomes, strict=True):
        _settle(future, *outcome)


def _settle_done(futures: list[asyncio.Future[Any]], done: asyncio.Future[list[tuple[Any, Any]]]) -> None:
    """Settle ``futures`` from the outcomes of one call of :func:`_all` on the thread."""
    if done.cancelled() or done.exception() is not None:
        exc = done.exception() if not done.cancelled() else StoreError("the SQLite call was cancelled")
        for future in futures:
            _settle(future, None, exc)
        return
    _settle_each(futures, done.result())


def _stop(db: sqlite3.Connection) -> None:
    """Stands for the end of the queue (None) met while gathering calls."""


def _run(
    db: sqlite3.Connection, batch: list[Callable[[sqlite3.Connection], Any]]
) -> list[tuple[Any, BaseException | None]]:
    """Run the calls of ``batch``: one in its own transaction, as on the loop's connection;
    several in one transaction (one commit, one flush at ``durability="full"``), each
    call's own transaction a savepoint in it, so that a call that fails rolls back alone
    and the others are committed.

    Raises:
        sqlite3.Error: the shared transaction could not begin or commit (nothing of it is
            written: every call of the batch fails with it).
    """
    if len(batch) == 1:
        try:
            return [(_waiting(db, batch[0]), None)]
        except BaseException as exc:
            return [(None, exc)]
    return _waiting(db, functools.partial(_all, batch))  # a BEGIN that finds the lock taken is tried again


def _waiting(db: sqlite3.Connection, job: Callable[[sqlite3.Connection], T]) -> T:
    """``job(db)``, again while it finds the write lock taken (it wrote nothing then), up
    to ``BUSY_TIMEOUT``.

    Looked for again every 50 µs to 1 ms: SQLite's own wait (``busy_timeout``) sleeps
    1, 2, 5, 10, 15... ms between looks, so a call that found the lock taken waited 9 ms
    (the median, two workers and a client on one file) for a lock held 0.1 ms at a time.

    Raises:
        sqlite3.OperationalError: the lock stayed taken (``database is locked``).
    """
    deadline = time.monotonic() + sql.BUSY_TIMEOUT
    delay = 50e-6
    while True:
        try:
            return job(db)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in _LOCKED or time.monotonic() >= deadline:
                raise
        time.sleep(delay)  # the store's thread: the event loop never waits here
        delay = min(delay * 2, 1e-3)


def _tell(
    loop: asyncio.AbstractEventLoop | None,
    future: asyncio.Future[Any] | None,
    outcome: tuple[Any, BaseException | None],
) -> None:
    if loop is not None and future is not None:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, *outcome)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if not future.cancelled():
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
