"""The one way a step is called: sync or async, its timeout, its retry policy, retry events.

Flow steps, parallel branches and imperative ``ctx.step`` calls all come through
:func:`invoke`. A step without options is called inline (the common case, kept lean);
with a timeout, a sync step runs in a worker thread so it can be abandoned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..definition.steps import StepFunction
from ..types import NO_USAGE
from .context import Frame, StepContext

__all__ = ["OnRetry", "invoke"]

#: Told of each failed attempt that will be retried: ``(attempt, error)``.
OnRetry = Callable[[int, BaseException], None]


async def invoke(
    spec: StepFunction,
    args: tuple[Any, ...],
    frame: Frame,
    on_retry: OnRetry | None = None,
    ctx: StepContext[Any, Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """Call ``spec.fn(*args, **kwargs)`` under its timeout and retry policy.

    Each attempt after the first starts from the state the first one saw, with fresh
    agent handles (so its agent calls get the same journal keys and finished ones come
    back from the journal), and, in a parallel branch, no updates carried over.
    ``ctx.attempt`` counts on from the value the caller set (above 1 for a step of a
    retried run, which counts its earlier attempts too).
    """
    policy = spec.retry
    if policy is None:
        return await _once(spec, args, kwargs or {})
    attempt = 0
    base = ctx.attempt - 1 if ctx is not None else 0
    async for trial in policy.retrying():
        with trial:
            attempt += 1
            if attempt > 1:
                frame.state = frame.base
                await frame.close_agents()
                if ctx is not None and not frame.scope:
                    ctx._run.step_usage = NO_USAGE  # the attempt's replayed agent calls count it again
                if frame.updates is not None:
                    frame.updates = {}
            if ctx is not None:
                ctx.attempt = base + attempt
            try:
                return await _once(spec, args, kwargs or {})
            except Exception as exc:
                if on_retry is not None and attempt < policy.max_attempts and policy.retryable(exc):
                    on_retry(base + attempt, exc)
                raise
    raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover


async def _once(spec: StepFunction, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    fn = spec.fn
    # A sync callable may return a coroutine (``lambda ctx: build(ctx)``): it is awaited too.
    if spec.timeout is None:
        out = fn(*args, **kwargs)
        return await out if spec.is_async or asyncio.iscoroutine(out) else out
    async with asyncio.timeout(spec.timeout):
        out = fn(*args, **kwargs) if spec.is_async else await asyncio.to_thread(fn, *args, **kwargs)
        return await out if asyncio.iscoroutine(out) else out
