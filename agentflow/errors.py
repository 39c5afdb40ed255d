"""The exception tree of agentflow.

Every error the package raises derives from :class:`AgentflowError`::

    AgentflowError
    ├── WorkflowDefinitionError      a workflow is defined wrongly (raised at build time)
    ├── InvalidInputError            run input failed validation; no run was created
    ├── StateValidationError         ctx.set_state got a value the state model refuses
    ├── UnknownStepError             a step returned a name that is not a step
    ├── StepLimitExceeded            a run passed its max_steps loop guard
    ├── InvalidStateError            a transition that makes no sense (resume a finished run)
    ├── EventLoopError               a runner used from an event loop other than its own
    ├── NotAuthorizedError           a decision by someone who is not an approver
    ├── NonDeterminismError          an imperative replay asked for steps in another order
    ├── RunFailedError               awaited result of a run that failed
    ├── RunStoppedError              awaited result of a run that was stopped
    ├── RunRejectedError             awaited result of a run that was rejected or expired
    ├── PoolTimeoutError             no agent handle became free within acquire_timeout
    ├── BudgetExceededError          an agent call would pass the token budget; it was not sent
    ├── ProviderError                an LLM provider refused a call for good
    ├── OutputValidationError        an agent's structured output did not fit its model
    └── StoreError                   the store could not be read or written
        ├── CorruptRecordError       a stored record cannot be decoded
        │   └── IncompatibleRunError a run the current definition cannot load (version, step, field)
        └── LeaseLostError           this process no longer owns the run it tried to advance
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "AgentflowError",
    "BudgetExceededError",
    "CorruptRecordError",
    "EventLoopError",
    "IncompatibleRunError",
    "InvalidInputError",
    "InvalidStateError",
    "LeaseLostError",
    "MaxTurnsExceeded",
    "NonDeterminismError",
    "NotAuthorizedError",
    "OutputValidationError",
    "PoolTimeoutError",
    "ProviderError",
    "RunFailedError",
    "RunNotFoundError",
    "RunRejectedError",
    "RunStoppedError",
    "StateValidationError",
    "StepLimitExceeded",
    "StoreError",
    "UnknownStepError",
    "WorkflowDefinitionError",
    "redact",
]

# API keys and bearer tokens as providers and HTTP libraries echo them in error messages:
# OpenAI (sk-, sk-proj-, masked sk-...****abcd) and Anthropic (sk-ant-) keys, an
# Authorization header's token, and ``api_key=...``-style assignments.
_SECRETS = (
    (re.compile(r"\b((?i:bearer)\s+)[\w.~+/*-]{4,}=*"), r"\1[redacted]"),
    (re.compile(r"(?<![\w-])(?:sk|pk|rk)-[\w*-]{4,}"), "[redacted]"),
    (
        re.compile(
            r"\b((?:api[_-]?key|x-api-key|authorization|access[_-]?token|secret|password)[\"']?\s*[:=]\s*"
            r"[\"']?)(?!\[redacted\]|Bearer\b)[^\s\"',;}]{6,}",
            re.IGNORECASE,
        ),
        r"\1[redacted]",
    ),
)


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with each of ``secrets`` (8 characters or more), API keys, bearer tokens and
    ``api_key=...`` values replaced by ``[redacted]``.

    Applied to every :class:`ProviderError` message, and to every error message and
    traceback before it reaches a store or an event.
    """
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class AgentflowError(Exception):
    """Root of every error raised by agentflow."""


class WorkflowDefinitionError(AgentflowError):
    """A workflow is defined wrongly; raised when it is built, never mid-run."""


class InvalidInputError(AgentflowError):
    """Run input failed validation against the workflow's input model.

    Attributes:
        errors: pydantic's list of field errors.
    """

    def __init__(self, message: str, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class StateValidationError(AgentflowError):
    """``ctx.set_state`` received a value the state model refuses.

    Attributes:
        field: the first offending field, when pydantic names one.
        errors: pydantic's list of field errors.
    """

    def __init__(self, message: str, field: str | None = None, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.errors = errors or []


class UnknownStepError(AgentflowError):
    """A step returned the name of a step the workflow does not have."""


class StepLimitExceeded(AgentflowError):
    """A run executed more steps than the workflow's ``max_steps`` guard allows."""


class InvalidStateError(AgentflowError):
    """A run was asked for a transition its status does not allow."""


class EventLoopError(AgentflowError, RuntimeError):
    """A runner was used from an event loop other than the one its runs advance in.

    Its runs' tasks belong to the loop it was first used in; a call from another would
    start or follow runs there that nothing advances. Use one runner per loop (attach a
    run from a new runner), or ``runner.run_sync`` from code that is not async.
    """


class RunNotFoundError(AgentflowError):
    """No run with that id is in the store (of this workflow)."""


class NotAuthorizedError(AgentflowError):
    """A decision came from someone not listed among the gate's approvers."""


class NonDeterminismError(AgentflowError):
    """An imperative workflow replayed its journal in a different order."""


class RunFailedError(AgentflowError):
    """The awaited run failed.

    Attributes:
        run_id: the run.
        step: the step that failed.
        error_type: the exception's class name.
        message: the exception's message.
        traceback: the traceback text kept with the run.
    """

    def __init__(
        self, run_id: str, step: str | None, error_type: str, message: str, traceback: str = ""
    ) -> None:
        super().__init__(f"run {run_id} failed at step {step!r}: {error_type}: {message}")
        self.run_id = run_id
        self.step = step
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class RunStoppedError(AgentflowError):
    """The awaited run was stopped before it finished."""

    def __init__(self, run_id: str, step: str | None = None) -> None:
        super().__init__(f"run {run_id} was stopped" + (f" at step {step!r}" if step else ""))
        self.run_id = run_id
        self.step = step


class RunRejectedError(AgentflowError):
    """The awaited run ended at a gate: rejected, or expired without a decision.

    Attributes:
        run_id: the run.
        status: ``"rejected"`` or ``"expired"``.
        reason: the rejecting reviewer's reason, if any.
    """

    def __init__(self, run_id: str, status: str, reason: str | None = None, by: str | None = None) -> None:
        what = f"rejected by {by}" if by else status
        super().__init__(f"run {run_id} was {what}" + (f": {reason}" if reason else ""))
        self.run_id = run_id
        self.status = status
        self.reason = reason
        self.by = by


class MaxTurnsExceeded(AgentflowError):
    """An agent loop made ``max_turns`` model calls without a final answer (names run, step, agent)."""


class PoolTimeoutError(AgentflowError):
    """No handle of an agent's pool became free within ``acquire_timeout``."""


class BudgetExceededError(AgentflowError):
    """An agent call would pass the token budget, so it was not sent."""


class ProviderError(AgentflowError):
    """An LLM provider refused a call in a way retrying does not fix.

    Attributes:
        status: the HTTP status, when there was one.
        provider: the provider's name.
    """

    def __init__(self, message: str, status: int | None = None, provider: str | None = None) -> None:
        super().__init__(redact(message))  # servers quote the key they were sent in some errors
        self.status = status
        self.provider = provider


class OutputValidationError(AgentflowError):
    """An agent's structured output did not validate, even after one repair attempt."""


class StoreError(AgentflowError):
    """The store could not be read or written."""


class CorruptRecordError(StoreError):
    """A stored record cannot be decoded; names the run and the key."""

    def __init__(self, run_id: str, key: str, cause: str) -> None:
        super().__init__(f"run {run_id}: stored record at {key!r} is unreadable: {cause}")
        self.run_id = run_id
        self.key = key


class IncompatibleRunError(CorruptRecordError):
    """A stored run that the definition now serving it cannot load.

    Its step is gone, its state does not validate against the state model, no
    migration leads from its version to the workflow's, or a migration raised. The run
    is never half-resumed: it stays where it was (a parked run stays parked; a run
    being recovered fails with this error, and ``retry`` takes it up after a fix).

    A subclass of :class:`CorruptRecordError`: what handles a record that cannot be
    read handles this one, which the stored data is fine for but the code is not.

    Attributes:
        run_id: the run.
        version: the version the run is at (``RunRecord.version``).
        current: the version of the definition that tried to load it.
        step: the step the run is at (or goes on at), or None.
        field: the state field, step name or ``"version"`` that does not fit, or None.
        reason: what is wrong, in words.
    """

    def __init__(
        self,
        run_id: str,
        version: str,
        current: str,
        step: str | None,
        field: str | None,
        reason: str,
    ) -> None:
        where = f" at step {step!r}" if step else ""
        what = f" (field {field!r})" if field else ""
        StoreError.__init__(
            self,
            f"run {run_id} (version {version!r}){where} cannot be loaded by version {current!r} "
            f"of its workflow{what}: {reason}",
        )
        self.run_id = run_id
        self.key = field or "version"
        self.version = version
        self.current = current
        self.step = step
        self.field = field
        self.reason = reason


class LeaseLostError(StoreError):
    """This process no longer holds the run's lease, so its commit was refused."""

    def __init__(self, run_id: str, detail: str = "") -> None:
        super().__init__(
            f"run {run_id}: lease lost, another process owns the run now" + (f" ({detail})" if detail else "")
        )
        self.run_id = run_id
