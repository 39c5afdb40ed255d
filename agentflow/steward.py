"""``Steward``: a registry of workflows, for discovery, description and running by name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .definition.steps import START
from .definition.workflow import Workflow
from .errors import AgentflowError, WorkflowDefinitionError
from .runner import RunHandle, WorkflowRunner

__all__ = ["Steward", "WorkflowInfo"]


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    """What a registered workflow is: its name, description, schemas and steps."""

    name: str
    description: str
    input_schema: dict[str, Any] | None
    state_schema: dict[str, Any] | None
    steps: list[str]


class Steward:
    """Keeps workflows by name and runs them; one runner per workflow, made on first use.

    Args:
        name: the registry's name (for display).
    """

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._workflows: dict[str, Workflow] = {}
        self._runners: dict[str, WorkflowRunner] = {}

    def register(self, workflow: Workflow) -> Workflow:
        """Add ``workflow`` (validated now); returns it, so it also works as a decorator target."""
        if not isinstance(workflow, Workflow):
            raise WorkflowDefinitionError(f"Steward.register takes a Workflow, got {workflow!r}")
        workflow.compile()
        known = self._workflows.get(workflow.name)
        if known is not None and known is not workflow:
            raise WorkflowDefinitionError(
                f"steward {self.name!r} already has a workflow named {workflow.name!r}"
            )
        self._workflows[workflow.name] = workflow
        return workflow

    def get(self, name: str) -> Workflow:
        """The workflow named ``name``; an unknown name raises an error listing the known ones."""
        try:
            return self._workflows[name]
        except KeyError:
            raise AgentflowError(
                f"steward {self.name!r} has no workflow {name!r}; known: {sorted(self._workflows)}"
            ) from None

    def workflows(self) -> list[WorkflowInfo]:
        """Every registered workflow, by name."""
        return [self._info(wf) for _, wf in sorted(self._workflows.items())]

    def _info(self, wf: Workflow) -> WorkflowInfo:
        spec = wf.compile()
        steps = [s for s in spec.steps if s != START] if not spec.imperative else [spec.main.name]  # type: ignore[union-attr]
        return WorkflowInfo(
            name=spec.name,
            description=spec.description,
            input_schema=spec.input_model.model_json_schema() if spec.input_model else None,
            state_schema=spec.state_model.model_json_schema() if spec.state_model else None,
            steps=steps,
        )

    def describe(self, name: str) -> dict[str, Any]:
        """A JSON-able description: schemas, steps, output schema and the Mermaid chart."""
        wf = self.get(name)
        info = self._info(wf)
        spec = wf.compile()
        return {
            "name": info.name,
            "description": info.description,
            "input_schema": info.input_schema,
            "state_schema": info.state_schema,
            "output_schema": spec.output_model.model_json_schema() if spec.output_model else None,
            "steps": info.steps,
            "mode": "execute" if spec.imperative else "flow",
            "mermaid": wf.mermaid(),
        }

    def runner(self, name: str) -> WorkflowRunner:
        """The runner of workflow ``name`` (one per workflow, made on first use)."""
        wf = self.get(name)
        runner = self._runners.get(name)
        if runner is None:
            runner = self._runners[name] = WorkflowRunner(wf)
        return runner

    async def run(self, name: str, input: Any = None, run_id: str | None = None) -> RunHandle:
        """Start a run of workflow ``name``; returns its handle."""
        return await self.runner(name).run(input, run_id=run_id)

    async def close(self) -> None:
        """Close every runner this steward made."""
        for runner in self._runners.values():
            await runner.close()
        self._runners.clear()

    @classmethod
    def discover(cls, module: str, steward: Steward | None = None) -> Steward:
        """Import ``module`` and register every Workflow defined at its top level."""
        st = steward or cls()
        mod = importlib.import_module(module)
        found = [v for v in vars(mod).values() if isinstance(v, Workflow)]
        for wf in found:
            st.register(wf)
        return st

    @classmethod
    def from_entry_points(cls, group: str = "agentflow.workflows", name: str = "default") -> Steward:
        """Register the workflows that installed packages expose under ``group``.

        An entry point may name a Workflow or a module (whose workflows are all registered).
        """
        st = cls(name)
        for ep in entry_points(group=group):
            obj = ep.load()
            if isinstance(obj, Workflow):
                st.register(obj)
            elif hasattr(obj, "__dict__"):
                for v in vars(obj).values():
                    if isinstance(v, Workflow):
                        st.register(v)
            else:
                raise WorkflowDefinitionError(
                    f"entry point {ep.name!r} in {group!r} is neither a Workflow nor a module"
                )
        return st

    def __repr__(self) -> str:
        return f"<Steward {self.name!r}: {sorted(self._workflows)}>"
