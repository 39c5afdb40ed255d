"""Webhooks: ``approval_pending`` and ``approval_decided`` POSTed as signed JSON, off the run's path.

A :class:`WebhookSender` listens to a runner's supervisor (``attach``; every workflow the
runner serves, its children's included) and is told, synchronously, of each approval a
stored commit parks a run on and of each decision stored (a timeout's too). It only
queues what it is told: a task of its own sends each delivery to each
:class:`~agentflow.Webhook` that wants the event, so a slow or unreachable receiver
never slows a run down, and never fails one.

What a receiver gets::

    POST <url>
    Content-Type: application/json
    X-Agentflow-Event: approval_pending | approval_decided
    X-Agentflow-Delivery: <id>          one per approval and event: the same for every attempt,
                                        and when a recovered run parks at the same approval again
    X-Agentflow-Timestamp: <unix seconds>
    X-Agentflow-Signature: sha256=<hex HMAC-SHA256 of f"{timestamp}.{body}" under the secret>

    {"id": <delivery id>, "type": <event>, "at": <unix seconds>, "workflow": ..., "run_id": ...,
     "approval": <Approval.to_json()>, "decision": <Decision.to_json()> | null,
     "outcome": null | "approved" | "rejected" | "responded" | "expired"}

:func:`verify` checks a delivery (signature in constant time, timestamp not stale).

Delivery: a 2xx answer delivers. Connection errors, timeouts, 5xx and 429 are retried
with exponential backoff and jitter (a ``Retry-After`` is honoured, capped), up to
``Webhook.attempts`` in all; another answer is not retried. The two events of one
approval sent by one process reach a webhook in order; different approvals go out
concurrently. At most
``queue_size`` deliveries wait: past that, the oldest is dropped (with a warning).
Deliveries are not stored: one still queued when the process dies is lost, and a
decision made by another process is announced by that one (if it has webhooks).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import importlib.util
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic_core

from ._runtime.listeners import ApprovalListener
from .agents.retrying import RetryPolicy
from .errors import WorkflowDefinitionError
from .types import Approval, Decision, Webhook

if TYPE_CHECKING:
    import httpx

    from .runner import WorkflowRunner

__all__ = ["SIGNATURE", "WebhookSender", "delivery_id", "sign", "verify"]

log = logging.getLogger("agentflow")

#: Seconds between two warnings of deliveries dropped from a full queue.
_WARN_EVERY = 10.0

#: The header names of a delivery.
SIGNATURE, TIMESTAMP, EVENT, DELIVERY = (
    "X-Agentflow-Signature",
    "X-Agentflow-Timestamp",
    "X-Agentflow-Event",
    "X-Agentflow-Delivery",
)


def delivery_id(event: str, approval: str) -> str:
    """The id of ``event`` for approval ``approval``: the same in every process and attempt."""
    return "wh_" + hashlib.sha256(f"{event}\0{approval}".encode()).hexdigest()[:24]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Agentflow-Signature`` value of ``body`` sent at ``timestamp``: ``sha256=<hex>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    body: bytes | str,
    headers: Mapping[str, str],
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """True when ``body`` and ``headers`` are a delivery signed with ``secret`` within ``tolerance`` s.

    For receivers: pass the raw body as received (before any JSON parsing) and the
    request's headers (names in any case). The signature is compared in constant time;
    a timestamp further than ``tolerance`` seconds from ``now`` (default: the clock)
    is refused, so a captured delivery cannot be replayed later. Dedupe on
    ``X-Agentflow-Delivery``: a retry after a lost answer comes again.
    """
    found = {k.lower(): v for k, v in headers.items()}
    stamp, signature = found.get(TIMESTAMP.lower()), found.get(SIGNATURE.lower())
    if not stamp or not signature:
        return False
    try:
        sent = int(stamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance:
        return False
    raw = body.encode() if isinstance(body, str) else body
    return hmac.compare_digest(sign(secret, stamp, raw), signature)


def _outcome(decision: Decision | None) -> str | None:
    if decision is None:
        return None
    if decision.timed_out:
        return "expired"
    if decision.responded:
        return "responded"
    return "approved" if decision.approved else "rejected"


@dataclass(frozen=True, slots=True)
class _Delivery:
    hook: Webhook
    event: str
    workflow: str
    run_id: str
    approval: Approval
    decision: Decision | None
    at: float

    @property
    def id(self) -> str:
        return delivery_id(self.event, self.approval.id)

    def body(self) -> bytes:
        decision = self.decision
        return pydantic_core.to_json(
            {
                "id": self.id,
                "type": self.event,
                "at": self.at,
                "workflow": self.workflow,
                "run_id": self.run_id,
                "approval": self.approval.to_json(),
                "decision": None if decision is None else decision.to_json(),
                "outcome": _outcome(decision),
            }
        )


def _new_client(tls: bool) -> httpx.AsyncClient:
    """The client deliveries are sent with; with no https webhook, no CA bundle is read (no TLS)."""
    import httpx

    return httpx.AsyncClient(follow_redirects=False, verify=tls)


def _transient(exc: BaseException) -> bool:
    import httpx

    if isinstance(exc, httpx.TransportError):  # connection refused or cut, timeouts
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code == 429
    return False


class WebhookSender:
    """Sends ``approval_pending`` / ``approval_decided`` of the runners it is attached to.

    Args:
        webhooks: where to send (each checked: a wrong one raises ``WorkflowDefinitionError``).
        queue_size: deliveries waiting at most; past it the oldest is dropped.
        concurrency: deliveries in flight at most (a retrying one counts).
        backoff: first retry wait in seconds (doubling, plus up to as much jitter).
        max_backoff: longest computed wait between attempts.
        max_retry_after: longest ``Retry-After`` honoured.

    Attributes:
        delivered / failed / dropped: deliveries answered 2xx, given up (refused or out
            of attempts) and dropped from a full queue (or undelivered at ``close``).
    """

    def __init__(
        self,
        webhooks: Sequence[Webhook],
        queue_size: int = 1000,
        concurrency: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        max_retry_after: float = 300.0,
    ) -> None:
        if importlib.util.find_spec("httpx") is None:
            raise WorkflowDefinitionError(
                "webhooks are sent with httpx, which is not installed: pip install 'agentflow-core[review]'"
            )
        self.webhooks = tuple(webhooks)
        for hook in self.webhooks:
            problem = hook.problem() if isinstance(hook, Webhook) else f"not a Webhook: {hook!r}"
            if problem is not None:
                raise WorkflowDefinitionError(problem)
        if queue_size < 1 or concurrency < 1:
            raise WorkflowDefinitionError("a webhook sender's queue_size and concurrency must be at least 1")
        self.queue_size = queue_size
        self.delivered = self.failed = self.dropped = 0
        self._policies = {
            hook: RetryPolicy(
                _transient,
                max_attempts=hook.attempts,
                backoff=backoff,
                max_backoff=max_backoff,
                max_retry_after=max_retry_after,
            )
            for hook in set(self.webhooks)
        }
        self._queue: deque[_Delivery] = deque()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._lanes: dict[tuple[str, str], asyncio.Task[None]] = {}  # (url, approval) -> its last delivery
        self._flying: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._attached: list[list[ApprovalListener]] = []
        self._closed = False
        self._warned_at = -_WARN_EVERY

    # -- listening -------------------------------------------------------------

    def attach(self, runner: WorkflowRunner) -> None:
        """Send the approvals of ``runner``'s runs (its child workflows' too) from now on."""
        listeners = runner.supervisor.listeners
        if not any(entry is self for entry in listeners):
            listeners.append(self)
            self._attached.append(listeners)

    def pending(self, workflow: str, run_id: str, approvals: Sequence[Approval]) -> None:
        """Queue ``approval_pending`` of each of ``approvals`` (the listener hook; returns at once)."""
        at = time.time()
        for hook in self.webhooks:
            if "approval_pending" in hook.events:
                for approval in approvals:
                    self._put(_Delivery(hook, "approval_pending", workflow, run_id, approval, None, at))

    def decided(self, workflow: str, run_id: str, approval: Approval, decision: Decision) -> None:
        """Queue ``approval_decided`` of ``approval`` (the listener hook; returns at once)."""
        at = time.time()
        for hook in self.webhooks:
            if "approval_decided" in hook.events:
                self._put(_Delivery(hook, "approval_decided", workflow, run_id, approval, decision, at))

    def _put(self, delivery: _Delivery) -> None:
        if self._closed:
            return
        if len(self._queue) >= self.queue_size:
            old = self._queue.popleft()
            self.dropped += 1
            now = time.monotonic()
            if now >= self._warned_at + _WARN_EVERY:  # a flood of drops logs a line every 10 s
                self._warned_at = now
                log.warning(
                    "webhooks: %d deliveries waiting, the receivers are behind; dropped the oldest "
                    "(%s of approval %s, run %s, to %s); %d dropped in all",
                    len(self._queue) + 1,
                    old.event,
                    old.approval.id,
                    old.run_id,
                    old.hook.url,
                    self.dropped,
                )
        self._queue.append(delivery)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="agentflow:webhooks")

    # -- sending ---------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Start each queued delivery once a slot is free, after the one before it of its approval."""
        if self._client is None:
            # In a thread: importing httpx and making its client (an SSL context, the CA
            # bundle read) take tens of milliseconds the runs sharing this loop would wait.
            tls = any(hook.url.lower().startswith("https:") for hook in self.webhooks)
            self._client = await asyncio.to_thread(_new_client, tls)
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            if not self._queue:
                self._slots.release()
                continue
            delivery = self._queue.popleft()
            lane = (delivery.hook.url, delivery.approval.id)
            task = asyncio.get_running_loop().create_task(self._send(delivery, self._lanes.get(lane)))
            self._lanes[lane] = task
            self._flying.add(task)
            task.add_done_callback(functools.partial(self._done, lane))

    def _done(self, lane: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._flying.discard(task)
        self._slots.release()
        if self._lanes.get(lane) is task:
            del self._lanes[lane]

    async def _send(self, delivery: _Delivery, after: asyncio.Task[None] | None) -> None:
        import httpx  # imported by _new_client already; not at the top: agentflow loads no HTTP client

        if after is not None:
            await asyncio.wait([after])  # pending before decided, to one receiver
        hook, body = delivery.hook, delivery.body()
        client = self._client
        assert client is not None  # made by _dispatch before any delivery starts

        async def attempt() -> None:
            stamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "agentflow-webhooks",
                EVENT: delivery.event,
                DELIVERY: delivery.id,
                TIMESTAMP: stamp,
                SIGNATURE: sign(hook.secret, stamp, body),
            }
            response = await client.post(hook.url, content=body, headers=headers, timeout=hook.timeout)
            response.raise_for_status()  # anything but 2xx (redirects are not followed)

        try:
            await self._policies[hook].call(attempt)
        except Exception as exc:  # httpx.HTTPError, or a URL httpx refuses: logged, never raised
            self.failed += 1
            if isinstance(exc, httpx.HTTPStatusError):
                why = f"answered {exc.response.status_code}"
            else:
                why = str(exc) or type(exc).__name__
            tried = f"after {hook.attempts} attempts" if _transient(exc) else "not retried"
            log.warning(
                "webhooks: %s of approval %s (run %s) to %s failed, %s: %s",
                delivery.event,
                delivery.approval.id,
                delivery.run_id,
                hook.url,
                tried,
                why,
            )
        else:
            self.delivered += 1

    # -- closing ---------------------------------------------------------------

    async def close(self, timeout: float = 10.0) -> None:
        """Stop listening, send what is queued for at most ``timeout`` seconds, then give up on the rest."""
        if self._closed:
            return
        self._closed = True
        for listeners in self._attached:
            listeners[:] = [entry for entry in listeners if entry is not self]
        self._attached.clear()
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(self._drain(task), timeout)
            except TimeoutError:
                left = len(self._queue) + len(self._flying)
                self.dropped += left
                log.warning("webhooks: closed with %d deliveries unsent after %.1f s", left, timeout)
                task.cancel()
                for t in list(self._flying):
                    t.cancel()
                await asyncio.gather(task, *self._flying, return_exceptions=True)
                self._queue.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _drain(self, task: asyncio.Task[None]) -> None:
        await asyncio.shield(task)
        while self._flying:
            await asyncio.wait(set(self._flying))

    def statistics(self) -> dict[str, Any]:
        """Deliveries ``delivered``, ``failed``, ``dropped``, and those ``queued`` or ``in_flight`` now."""
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "queued": len(self._queue),
            "in_flight": len(self._flying),
        }
