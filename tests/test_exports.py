"""The public namespace: ``agentflow.__all__`` is pinned (SPEC sections 10 and 11)."""

from __future__ import annotations

import subprocess
import sys

import agentflow

#: SPEC section 11: everything a user needs, importable from ``agentflow``.
SPEC_NAMES = [
    "Workflow",
    "START",
    "END",
    "Next",
    "Wait",
    "HumanApproval",
    "Decision",
    "Parallel",
    "BranchError",
    "step",
    "RetryPolicy",
    "WorkflowRunner",
    "RunHandle",
    "RunInfo",
    "RunResult",
    "RunStatus",
    "RunEvent",
    "Steward",
    "WorkflowInfo",
    "Agent",
    "AgentReply",
    "Usage",
    "TokenBudget",
    "Store",
    # SPEC section 11, "as they arrive"
    "StepContext",
    "RunNotFoundError",
    "Sleep",
    "Run",
    "Approval",
    "tool",
    "ToolContext",
    "ToolCall",
    "AgentRun",
    "MaxTurnsExceeded",
    "MCPServer",
    "Worker",
    "WorkerStatistics",
    "RateLimit",
    "Webhook",
    # SPEC section 17: a check of the stored runs before a deploy
    "check_runs",
    "Incompatible",
    # notebooks and scripts that are not async
    "run_sync",
]

#: SPEC section 10: the errors, all importable from ``agentflow``.
SPEC_ERRORS = [
    "AgentflowError",
    "WorkflowDefinitionError",
    "InvalidInputError",
    "StateValidationError",
    "UnknownStepError",
    "StepLimitExceeded",
    "InvalidStateError",
    "NotAuthorizedError",
    "RunFailedError",
    "RunStoppedError",
    "RunRejectedError",
    "NonDeterminismError",
    "PoolTimeoutError",
    "BudgetExceededError",
    "ProviderError",
    "OutputValidationError",
    "StoreError",
    "CorruptRecordError",
    "LeaseLostError",
    "IncompatibleRunError",
    # a runner used from an event loop other than its own
    "EventLoopError",
]

#: The pinned public namespace, sorted. Adding or removing a public name is an API change.
EXPECTED = [
    "Agent",
    "AgentReply",
    "AgentRun",
    "AgentflowError",
    "Approval",
    "BranchError",
    "BudgetExceededError",
    "CorruptRecordError",
    "Decision",
    "END",
    "EventLoopError",
    "HumanApproval",
    "Incompatible",
    "IncompatibleRunError",
    "InvalidInputError",
    "InvalidStateError",
    "LeaseLostError",
    "MCPServer",
    "MaxTurnsExceeded",
    "Next",
    "NonDeterminismError",
    "NotAuthorizedError",
    "OutputValidationError",
    "Parallel",
    "PoolTimeoutError",
    "ProviderError",
    "RateLimit",
    "RetryPolicy",
    "Run",
    "RunEvent",
    "RunFailedError",
    "RunHandle",
    "RunInfo",
    "RunNotFoundError",
    "RunRejectedError",
    "RunResult",
    "RunStatus",
    "RunStoppedError",
    "START",
    "Sleep",
    "StateValidationError",
    "StepContext",
    "StepLimitExceeded",
    "Steward",
    "Store",
    "StoreError",
    "TokenBudget",
    "ToolCall",
    "ToolContext",
    "UnknownStepError",
    "Usage",
    "Wait",
    "Webhook",
    "Worker",
    "WorkerStatistics",
    "Workflow",
    "WorkflowDefinitionError",
    "WorkflowInfo",
    "WorkflowRunner",
    "check_runs",
    "run_sync",
    "step",
    "tool",
]


def test_all_is_pinned() -> None:
    assert sorted(agentflow.__all__) == EXPECTED
    assert len(set(agentflow.__all__)) == len(agentflow.__all__), "a name is listed twice"


def test_pinned_list_is_exactly_the_spec() -> None:
    assert EXPECTED == sorted(SPEC_NAMES + SPEC_ERRORS)


def test_every_public_name_is_importable() -> None:
    for name in agentflow.__all__:
        assert getattr(agentflow, name, None) is not None, name


def test_errors_share_one_root() -> None:
    for name in SPEC_ERRORS:
        err = getattr(agentflow, name)
        assert isinstance(err, type) and issubclass(err, agentflow.AgentflowError), name
    assert issubclass(agentflow.AgentflowError, Exception)
    assert issubclass(agentflow.CorruptRecordError, agentflow.StoreError)
    assert issubclass(agentflow.LeaseLostError, agentflow.StoreError)


def test_run_status_is_a_str_enum_of_the_lifecycle() -> None:
    status = agentflow.RunStatus
    assert status.COMPLETED == "completed"
    assert isinstance(status.WAITING, str)
    assert [s.value for s in status] == [
        "pending",
        "running",
        "paused",
        "waiting",
        "completed",
        "failed",
        "stopped",
        "rejected",
        "expired",
    ]
    assert {s for s in status if s.is_final} == {
        status.COMPLETED,
        status.FAILED,
        status.STOPPED,
        status.REJECTED,
        status.EXPIRED,
    }


def test_the_core_imports_no_llm_sdk_and_no_http_client() -> None:
    # A fresh interpreter: this test process has the SDKs loaded already.
    code = """
import pkgutil, importlib, sys, agentflow
for module in pkgutil.walk_packages(agentflow.__path__, "agentflow."):
    if not module.name.endswith("__main__"):  # `python -m agentflow`: running it is the command line
        importlib.import_module(module.name)
print(sorted(m for m in ("openai", "anthropic", "httpx", "httpx2", "aiohttp") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
