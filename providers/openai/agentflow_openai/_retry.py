"""Retrying transient provider failures with tenacity, honouring ``Retry-After``.

The SDK's own retries are off (``max_retries=0``) so that one policy, with bounded
attempts and a capped server-directed wait, governs every provider call.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping
from typing import Any

from tenacity import RetryCallState, wait_exponential, wait_random
from tenacity.wait import wait_base

__all__ = ["WaitRetryAfter", "retry_after_seconds"]


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, else ``Retry-After`` (seconds or a date)."""
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


def _response_headers(exc: BaseException) -> Mapping[str, str] | None:
    response: Any = getattr(exc, "response", None)
    return getattr(response, "headers", None)


class WaitRetryAfter(wait_base):
    """Wait what the failed response's ``Retry-After`` says (capped), else back off exponentially.

    Args:
        initial: first backoff in seconds (doubling each attempt, plus up to ``initial`` jitter).
        maximum: longest backoff.
        cap: longest server-directed wait honoured.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        cap: float,
        headers: Callable[[BaseException], Mapping[str, str] | None] = _response_headers,
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
