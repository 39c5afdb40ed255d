"""What a user declares: workflows, steps, gates, parallel branches, child runs. No I/O, no tasks."""

from .compose import Run
from .gates import Gate, HumanApproval, Sleep, Wait
from .parallel import BranchError, Parallel
from .steps import END, START, Next, RetryPolicy, StepFunction, step
from .workflow import Persistence, Workflow, WorkflowSpec

__all__ = [
    "END",
    "START",
    "BranchError",
    "Gate",
    "HumanApproval",
    "Next",
    "Parallel",
    "Persistence",
    "RetryPolicy",
    "Run",
    "Sleep",
    "StepFunction",
    "Wait",
    "Workflow",
    "WorkflowSpec",
    "step",
]
