"""Step options and what a step may return: ``step``, ``RetryPolicy``, ``Next``, ``START``/``END``."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, overload

import tenacity
from pydantic import BaseModel

from ..errors import AgentflowError, WorkflowDefinitionError

__all__ = ["END", "START", "Next", "RetryPolicy", "StepFunction", "as_step", "is_async_callable", "step"]

#: The entry of a flow: ``{START: first_step_fn, ...}``.
START: Final = "__start__"
#: Returned by a step to finish the run.
END: Final = "__end__"


@dataclass(frozen=True, slots=True)
class Next:
    """Go to ``target``, recording ``output`` as this step's output.

    ``Next(END, output=value)`` ends the run with ``value`` as the run's output.
    """

    target: str
    output: Any = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failing step is retried (exponential backoff through tenacity).

    Args:
        max_attempts: attempts in all, the first included.
        initial_delay: seconds before the second attempt.
        max_delay: cap on the delay between attempts.
        multiplier: growth of the delay per attempt.
        retry_on: exception types that are retried.
        non_retryable: exception types never retried, even if they match ``retry_on``.
            agentflow's own errors (invalid state, unknown step, budget...) are never
            retried: retrying cannot fix them.
    """

    max_attempts: int = 3
    initial_delay: float = 0.1
    max_delay: float = 10.0
    multiplier: float = 2.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise WorkflowDefinitionError(
                f"RetryPolicy.max_attempts must be at least 1, not {self.max_attempts}"
            )

    def retryable(self, exc: BaseException) -> bool:
        """True when ``exc`` should be retried under this policy."""
        if isinstance(exc, AgentflowError | asyncio.CancelledError) or isinstance(exc, self.non_retryable):
            return False
        return isinstance(exc, self.retry_on)

    def retrying(self) -> tenacity.AsyncRetrying:
        """A tenacity controller for one step execution."""
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=tenacity.wait_exponential(
                multiplier=self.initial_delay, exp_base=self.multiplier, max=self.max_delay
            ),
            retry=tenacity.retry_if_exception(self.retryable),
            reraise=True,
        )


class StepFunction:
    """A step callable with options attached by :func:`step`. Calls pass through."""

    __slots__ = ("__dict__", "fn", "form", "is_async", "name", "output", "plain", "retry", "timeout")

    fn: Callable[..., Any]
    name: str

    def __init__(
        self,
        fn: Callable[..., Any],
        output: type[BaseModel] | None,
        retry: RetryPolicy | None,
        timeout: float | None,
        name: str | None,
        form: type[BaseModel] | None = None,
    ) -> None:
        if not callable(fn):
            raise WorkflowDefinitionError(f"step() needs a callable, got {fn!r}")
        if output is not None and not (isinstance(output, type) and issubclass(output, BaseModel)):
            raise WorkflowDefinitionError(f"step(output=...) must be a pydantic model class, got {output!r}")
        if form is not None and not (isinstance(form, type) and issubclass(form, BaseModel)):
            raise WorkflowDefinitionError(f"step(form=...) must be a pydantic model class, got {form!r}")
        if timeout is not None and timeout <= 0:
            raise WorkflowDefinitionError(f"step(timeout=...) must be positive, got {timeout!r}")
        inner = fn.fn if isinstance(fn, StepFunction) else fn
        self.fn = inner
        self.is_async = is_async_callable(inner)
        self.output = output
        self.form = form
        self.retry = retry
        self.timeout = timeout
        self.plain = retry is None and timeout is None  # called inline, without invoke()
        self.name = str(name or getattr(inner, "__name__", type(inner).__name__))
        functools.update_wrapper(self, inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<step {self.name}>"


def is_async_callable(fn: Any) -> bool:
    """True for coroutine functions, including callables whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def _policy(retry: int | RetryPolicy | None) -> RetryPolicy | None:
    if retry is None or isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, bool) or not isinstance(retry, int):
        raise WorkflowDefinitionError(f"step(retry=...) takes an int or a RetryPolicy, got {retry!r}")
    return RetryPolicy(max_attempts=retry) if retry > 1 else None


@overload
def step(
    fn: Callable[..., Any],
    *,
    output: type[BaseModel] | None = None,
    retry: int | RetryPolicy | None = None,
    timeout: float | None = None,
    name: str | None = None,
    form: type[BaseModel] | None = None,
) -> StepFunction: ...


@overload
def step(
    fn: None = None,
    *,
    output: type[BaseModel] | None = None,
    retry: int | RetryPolicy | None = None,
    timeout: float | None = None,
    name: str | None = None,
    form: type[BaseModel] | None = None,
) -> Callable[[Callable[..., Any]], StepFunction]: ...


def step(
    fn: Callable[..., Any] | None = None,
    *,
    output: type[BaseModel] | None = None,
    retry: int | RetryPolicy | None = None,
    timeout: float | None = None,
    name: str | None = None,
    form: type[BaseModel] | None = None,
) -> StepFunction | Callable[[Callable[..., Any]], StepFunction]:
    """Attach options to a step; usable as ``step(fn, ...)`` or ``@step(...)``.

    Args:
        fn: the step callable (a sync or async function of ``ctx``).
        output: a pydantic model the step's output is validated into; after a reload
            from a store, ``ctx.step_results[name]`` is an instance of it again.
        retry: attempts in all (``retry=3``) or a :class:`RetryPolicy`.
        timeout: seconds one attempt may take (``TimeoutError`` past it). A sync step
            with a timeout runs in a worker thread so it can be abandoned.
        name: the name its output is stored under when used as a parallel branch.
        form: the form model of the gate this step returns (``HumanApproval(form=...)``),
            for a step whose code does not name it (a gate built elsewhere at run time):
            the reviewer's data is validated into it and the next step sees it typed.
    """
    policy = _policy(retry)

    def wrap(f: Callable[..., Any]) -> StepFunction:
        return StepFunction(f, output, policy, timeout, name, form)

    return wrap(fn) if fn is not None else wrap


def as_step(fn: Any, what: str) -> StepFunction:
    """``fn`` as a StepFunction (options-free when it is a plain callable)."""
    if isinstance(fn, StepFunction):
        return fn
    if not callable(fn):
        raise WorkflowDefinitionError(f"{what} must be a callable of ctx, got {fn!r}")
    return StepFunction(fn, None, None, None, None)
