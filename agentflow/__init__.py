"""agentflow: durable LLM workflows with typed state, human approval gates and pooled agents."""

from .agents import Agent, AgentReply, TokenBudget
from .errors import (
    AgentflowError,
    BudgetExceededError,
    CorruptRecordError,
    InvalidInputError,
    InvalidStateError,
    LeaseLostError,
    NonDeterminismError,
    NotAuthorizedError,
    OutputValidationError,
    PoolTimeoutError,
    ProviderError,
    RunFailedError,
    RunRejectedError,
    RunStoppedError,
    StateValidationError,
    StepLimitExceeded,
    StoreError,
    UnknownStepError,
    WorkflowDefinitionError,
)
from .gates import HumanApproval, Wait
from .parallel import BranchError, Parallel
from .records import Decision, RunEvent, RunInfo, RunResult, RunStatus, Usage
from .runner import RunHandle, WorkflowRunner
from .steps import END, START, Next, RetryPolicy, step
from .steward import Steward, WorkflowInfo
from .stores.base import Store
from .workflow import Workflow

__all__ = [
    "END",
    "START",
    "Agent",
    "AgentReply",
    "AgentflowError",
    "BranchError",
    "BudgetExceededError",
    "CorruptRecordError",
    "Decision",
    "HumanApproval",
    "InvalidInputError",
    "InvalidStateError",
    "LeaseLostError",
    "Next",
    "NonDeterminismError",
    "NotAuthorizedError",
    "OutputValidationError",
    "Parallel",
    "PoolTimeoutError",
    "ProviderError",
    "RetryPolicy",
    "RunEvent",
    "RunFailedError",
    "RunHandle",
    "RunInfo",
    "RunRejectedError",
    "RunResult",
    "RunStatus",
    "RunStoppedError",
    "StateValidationError",
    "StepLimitExceeded",
    "Steward",
    "Store",
    "StoreError",
    "TokenBudget",
    "UnknownStepError",
    "Usage",
    "Wait",
    "Workflow",
    "WorkflowDefinitionError",
    "WorkflowInfo",
    "WorkflowRunner",
    "step",
]
__version__ = "0.1.0"
