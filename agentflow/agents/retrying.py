"""Retrying transient provider failures with tenacity, honouring ``Retry-After``.

Provider packages turn their SDK's own retries off (``max_retries=0``) and send every
call through a :class:`RetryPolicy`, so one policy, with bounded attempts and a capped
server-directed wait, governs every provider call. Nothing here knows any SDK: a
provider says which failures are transient, and where a failure's response headers are
when they are not at ``exc.response.headers``.

The first attempt is made directly; tenacity's retry loop is set up only once that
attempt has failed with a transient error, so a call that succeeds at once costs no
retry bookkeeping. Attempts, waits and the error finally raised are the same as when
every attempt runs inside the loop.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

__all__ = ["RetryPolicy", "WaitRetryAfter", "response_headers", "retry_after_seconds"]

_T = TypeVar("_T")


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, else ``Retry-After`` (seconds or a date).

    Returns None when the headers name no usable wait; never a negative number.
    """
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def response_headers(exc: BaseException) -> Mapping[str, str] | None:
    """The headers of the HTTP response a failure carries (``exc.response.headers``), if any."""
    response: Any = getattr(exc, "response", None)
    return getattr(response, "headers", None)


class WaitRetryAfter(wait_base):
    """Wait what the failed response's ``Retry-After`` says (capped), else back off exponentially.

    Args:
        initial: first backoff in seconds (doubling each attempt, plus up to ``initial`` jitter).
        maximum: longest backoff.
        cap: longest server-directed wait honoured.
        headers: finds a failure's response headers.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        cap: float,
        headers: Callable[[BaseException], Mapping[str, str] | None] = response_headers,
    ) -> None:
        # wait_exponential's `multiplier` works on all supported tenacity; jitter's `initial` is deprecated.
        self._fallback = wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial)
        self._cap = cap
        self._headers = headers

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if exc is not None:
            delay = retry_after_seconds(self._headers(exc))
            if delay is not None:
                return min(delay, self._cap)
        return float(self._fallback(retry_state))


class RetryPolicy:
    """Calls an async function, retrying its transient failures with backoff.

    Args:
        transient: True for a failure worth another attempt (rate limit, 5xx, timeout,
            dropped connection); any other failure is raised at once.
        max_attempts: attempts per call, the first included.
        backoff: first retry wait in seconds when the server names none (doubles each time,
            plus up to ``backoff`` of jitter).
        max_backoff: longest computed wait.
        max_retry_after: longest ``Retry-After`` / ``retry-after-ms`` honoured.
        headers: finds a failure's response headers (default: ``exc.response.headers``).

    Raises:
        ValueError: ``max_attempts`` is below 1.
    """

    __slots__ = ("_retry", "_stop", "_transient", "_wait", "max_attempts")

    def __init__(
        self,
        transient: Callable[[BaseException], bool],
        *,
        max_attempts: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_retry_after: float = 60.0,
        headers: Callable[[BaseException], Mapping[str, str] | None] = response_headers,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self._transient = transient
        self._wait = WaitRetryAfter(backoff, max_backoff, max_retry_after, headers)
        self._stop = stop_after_attempt(max_attempts)
        self._retry = retry_if_exception(transient)

    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a failure this policy retries."""
        return self._transient(exc)

    async def call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """``await fn()``, again after each transient failure, up to ``max_attempts`` times in all.

        Each attempt calls ``fn`` anew. The last failure is raised as it is (not wrapped),
        as is any failure that is not transient.
        """
        try:
            return await fn()
        except Exception as exc:
            if self.max_attempts == 1 or not self._transient(exc):
                raise
            failed: BaseException | None = exc
        retrying = AsyncRetrying(stop=self._stop, wait=self._wait, retry=self._retry, reraise=True)
        async for attempt in retrying:
            with attempt:
                if failed is not None:
                    # The direct first attempt, replayed so that tenacity counts it and
                    # waits after it exactly as if it had made it.
                    first, failed = failed, None
                    raise first
                return await fn()
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
