"""The ``Workflow`` builder and its validated, immutable form ``WorkflowSpec``."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from pydantic import BaseModel, ValidationError

from ..agents.config import Agent, AgentsConfig, TokenBudget
from ..errors import WorkflowDefinitionError
from ..stores.contract import Store
from ..types import Webhook
from .compose import referenced_workflows
from .gates import forms_of
from .graph import mermaid, outline, scope_of
from .steps import END, START, StepFunction, as_step
from .versions import MigrateFn, Migration, check_version, migrations_of

__all__ = ["Persistence", "Workflow", "WorkflowSpec"]

_STORES = ("memory", "sqlite", "redis", "postgres")


@dataclass(frozen=True, slots=True)
class Persistence:
    """What ``Workflow.persistence(...)`` recorded."""

    enabled: bool = True
    store: str | Store = "sqlite"
    key_prefix: str = ""
    url: str | None = None
    path: str | None = None
    ttl: float | None = None
    lease_ttl: float = 15.0
    durability: str | None = None
    #: Where this workflow's approvals are announced (``approval_pending`` / ``approval_decided``).
    webhooks: tuple[Webhook, ...] = ()


@dataclass(frozen=True)
class WorkflowSpec:
    """A validated workflow, as the engine runs it."""

    name: str
    description: str
    input_model: type[BaseModel] | None
    state_model: type[BaseModel] | None
    initial_state: dict[str, Any]
    output_model: type[BaseModel] | None
    steps: dict[str, StepFunction]
    main: StepFunction | None
    max_steps: int
    persistence: Persistence | None
    agents: AgentsConfig | None
    output_types: dict[str, type[BaseModel]] = field(default_factory=dict)
    #: The form models of the gates each step may return (``HumanApproval(form=...)``),
    #: found from the steps' code or declared with ``step(fn, form=...)``.
    forms: dict[str, tuple[type[BaseModel], ...]] = field(default_factory=dict)
    #: Workflows a step may run as children (``Run(...)``, ``ctx.run``), by name: found
    #: from the steps' code or declared with ``.children(...)``.
    children: dict[str, Workflow] = field(default_factory=dict)
    #: Who decides a tool call's unknown outcome when the tool names no approvers.
    operators: tuple[str, ...] = ()
    #: The version runs started on this definition record (``Workflow(..., version=)``).
    version: str = "1"
    #: ``.migrate(...)`` declarations by the version they upgrade from.
    migrations: dict[str, Migration] = field(default_factory=dict)

    @property
    def imperative(self) -> bool:
        """True for ``.execute(fn)`` workflows."""
        return self.main is not None


def _check_model(model: Any, what: str) -> type[BaseModel]:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise WorkflowDefinitionError(f"{what} must be a pydantic model class, got {model!r}")
    return model


def _referenced_steps(fn: Callable[..., Any], found: dict[str, type[BaseModel]], depth: int = 0) -> None:
    """Collect declared output models of StepFunctions a function refers to by global or closure name.

    This is how branch outputs (``Parallel([build_linux, ...])``) come back typed after a
    reload: the types are known from the code, never read from the store.
    """
    code = getattr(fn, "__code__", None)
    if code is None or depth > 3:
        return
    scope = scope_of(fn)
    codes = [code]
    while codes:
        c = codes.pop()
        names = (*c.co_names, *c.co_freevars)
        # ``module.fn`` compiles to the names "module" and "fn": look the attribute names
        # up on every module the code refers to as well.
        modules = [m for m in (scope.get(n) for n in names) if isinstance(m, types.ModuleType)]
        for name in names:
            obj = scope.get(name)
            if not isinstance(obj, StepFunction):
                obj = next((a for m in modules if isinstance(a := getattr(m, name, None), StepFunction)), obj)
            if isinstance(obj, StepFunction):
                if obj.output is not None:
                    found.setdefault(obj.name, obj.output)
                _referenced_steps(obj.fn, found, depth + 1)
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def _children_by_function(name: str, fn: Callable[..., Any]) -> list[tuple[str, set[Workflow], bool]]:
    """``(label, workflows, runs)`` for ``fn`` (labelled ``name``) and each function its code calls.

    ``runs``: the function's code names ``Run``, so what it returns may be a child run
    (only then is a child's output model taken as its output type).
    """
    out = [(name, set(referenced_workflows(fn)), _names_run(fn))]
    code = getattr(fn, "__code__", None)
    scope = scope_of(fn)
    for ref in (*code.co_names, *code.co_freevars) if code is not None else ():
        obj = scope.get(ref)
        if isinstance(obj, StepFunction):
            out.append((obj.name, set(referenced_workflows(obj.fn)), _names_run(obj.fn)))
        elif isinstance(obj, types.FunctionType) and obj is not fn:
            out.append((obj.__name__, set(referenced_workflows(obj)), _names_run(obj)))
    return [entry for entry in out if entry[1]]


def _names_run(fn: Callable[..., Any]) -> bool:
    """True when ``fn``'s code (nested code included) refers to the name ``Run``."""
    code = getattr(fn, "__code__", None)
    codes = [code] if isinstance(code, types.CodeType) else []
    while codes:
        c = codes.pop()
        if "Run" in c.co_names or "Run" in c.co_freevars:
            return True
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return False


class Workflow:
    """A durable workflow: typed input and state, steps, gates, parallel branches.

    Build it with chained calls; each returns the workflow::

        wf = Workflow("Deploy").input(DeployInput).state(DeployState).flow({START: ..., ...})

    Definition mistakes raise :class:`WorkflowDefinitionError` here or, at the latest,
    when the workflow is handed to ``WorkflowRunner``; never half-way through a run.
    """

    def __init__(self, name: str, description: str = "", version: str = "1") -> None:
        if not isinstance(name, str) or not name.strip():
            raise WorkflowDefinitionError("a workflow needs a non-empty name")
        self.name = name
        self.description = description
        #: What every run started on this definition records (``RunInfo.version``).
        self.version = check_version(version, f"workflow {name!r}")
        self._migrations: list[tuple[str, MigrateFn, dict[str, str], str | None]] = []
        self._input: type[BaseModel] | None = None
        self._state: type[BaseModel] | None = None
        self._initial: dict[str, Any] | None = None
        self._output: type[BaseModel] | None = None
        self._flow: dict[str, StepFunction] | None = None
        self._main: StepFunction | None = None
        self._persistence: Persistence | None = None
        self._agents: AgentsConfig | None = None
        self._operators: tuple[str, ...] = ()
        self._max_steps = 10_000
        self._children: list[Workflow] = []
        self._spec: WorkflowSpec | None = None

    def _changed(self) -> Self:
        self._spec = None
        return self

    def input(self, model: type[BaseModel]) -> Self:
        """Declare the input model; run input is validated against it before anything is stored."""
        self._input = _check_model(model, f"{self.name}.input()")
        return self._changed()

    def state(self, model: type[BaseModel], initial: Mapping[str, Any] | BaseModel | None = None) -> Self:
        """Declare the state model, and the initial state when its fields lack defaults."""
        self._state = _check_model(model, f"{self.name}.state()")
        if isinstance(initial, BaseModel):
            initial = initial.model_dump()
        self._initial = dict(initial) if initial is not None else None
        return self._changed()

    def output(self, model: type[BaseModel]) -> Self:
        """Declare the run's output model; the final output is validated into it."""
        self._output = _check_model(model, f"{self.name}.output()")
        return self._changed()

    def flow(self, steps: Mapping[str, Callable[..., Any]]) -> Self:
        """The steps: ``{START: fn, "Name": fn, ...}``; each fn is a sync or async callable of ctx."""
        if self._main is not None:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} has .execute(); use .flow() or .execute(), not both"
            )
        if not isinstance(steps, Mapping):
            raise WorkflowDefinitionError(f"{self.name}.flow() takes a mapping of step name to callable")
        if START not in steps:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} has no START step: add {{START: first_step, ...}}"
            )
        flow: dict[str, StepFunction] = {}
        for name, fn in steps.items():
            if not isinstance(name, str) or not name:
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r}: step names must be strings, got {name!r}"
                )
            if name == END or (name.startswith("__") and name != START):
                raise WorkflowDefinitionError(f"workflow {self.name!r}: step name {name!r} is reserved")
            flow[name] = as_step(fn, f"workflow {self.name!r} step {name!r}")
        self._flow = flow
        return self._changed()

    def execute(self, fn: Callable[..., Any]) -> Self:
        """Imperative mode: ``fn(ctx)`` is the whole workflow, replayed from its journal on resume."""
        if self._flow is not None:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} has .flow(); use .flow() or .execute(), not both"
            )
        spec = as_step(fn, f"workflow {self.name!r} .execute()")
        if not spec.is_async:
            raise WorkflowDefinitionError(f"workflow {self.name!r}: .execute() needs an async function")
        self._main = spec
        return self._changed()

    def persistence(
        self,
        enabled: bool = True,
        store: str | Store = "sqlite",
        key_prefix: str = "",
        url: str | None = None,
        path: str | None = None,
        ttl: float | None = None,
        lease_ttl: float = 15.0,
        durability: str | None = None,
        webhooks: Sequence[Webhook] = (),
    ) -> Self:
        """Where runs live: ``"sqlite"`` (the embedded default), ``"redis"``, ``"postgres"``, ``"memory"``
        or a Store.

        Args:
            enabled: False keeps runs in memory.
            store: the store kind or instance.
            key_prefix: prefix of every key (Redis), or namespace of every row (SQLite, PostgreSQL).
            url: Redis URL (else ``REDIS_URL``, else ``redis://localhost:6379/0``), or
                PostgreSQL URL (else ``DATABASE_URL``, else libpq's defaults).
            path: SQLite file (default ``agentflow.db``).
            ttl: seconds finished runs are kept.
            lease_ttl: seconds after which a run whose owner stopped renewing may be recovered.
            durability: SQLite only: ``"full"`` (survives a power loss) or ``"normal"``
                (survives a process crash); None for the store's default.
            webhooks: where ``approval_pending`` and ``approval_decided`` are POSTed
                (:class:`~agentflow.Webhook`); every runner of the workflow sends them,
                off the run's path (:mod:`agentflow.webhooks`).
        """
        if isinstance(store, str) and store not in _STORES:
            raise WorkflowDefinitionError(
                f"unknown store {store!r}; choose one of {list(_STORES)} or pass a Store"
            )
        if not isinstance(store, str) and not isinstance(store, Store):
            raise WorkflowDefinitionError(f"store must be one of {list(_STORES)} or a Store, got {store!r}")
        if lease_ttl <= 0:
            raise WorkflowDefinitionError(f"lease_ttl must be positive, got {lease_ttl}")
        if ttl is not None and ttl <= 0:
            raise WorkflowDefinitionError(f"ttl must be positive, got {ttl}")
        if durability not in (None, "full", "normal"):
            raise WorkflowDefinitionError(f"durability must be 'full' or 'normal', got {durability!r}")
        hooks = tuple(webhooks)
        for hook in hooks:
            problem = hook.problem() if isinstance(hook, Webhook) else f"not a Webhook: {hook!r}"
            if problem is not None:
                raise WorkflowDefinitionError(f"workflow {self.name!r}: {problem}")
        self._persistence = Persistence(
            enabled, store, key_prefix, url, path, ttl, lease_ttl, durability, hooks
        )
        return self._changed()

    def agents(
        self,
        agents: Mapping[str, Agent],
        max_handles: int = 8,
        acquire_timeout: float | None = None,
        budget: TokenBudget | None = None,
    ) -> Self:
        """LLM agents steps reach through ``ctx.agents``; at most ``max_handles`` open per agent."""
        for name, agent in agents.items():
            if not isinstance(agent, Agent):
                raise WorkflowDefinitionError(f"agent {name!r} must be an Agent(...), got {agent!r}")
        if max_handles < 1:
            raise WorkflowDefinitionError(f"max_handles must be at least 1, got {max_handles}")
        self._agents = AgentsConfig(dict(agents), max_handles, acquire_timeout, budget)
        return self._changed()

    def max_steps(self, n: int) -> Self:
        """The loop guard: a run that starts more than ``n`` steps fails with StepLimitExceeded."""
        if n < 1:
            raise WorkflowDefinitionError(f"max_steps must be at least 1, got {n}")
        self._max_steps = n
        return self._changed()

    def children(self, *workflows: Workflow) -> Self:
        """Declare workflows a step may run as children (needed when one is chosen at run time).

        Workflows a step's code refers to by name are found without this.
        """
        for wf in workflows:
            if not isinstance(wf, Workflow):
                raise WorkflowDefinitionError(f"{self.name}.children() takes Workflows, got {wf!r}")
        self._children.extend(workflows)
        return self._changed()

    def operators(self, names: Sequence[str]) -> Self:
        """The people who decide what happens to a tool call whose outcome is unknown.

        A call of a tool that is not idempotent, cut off by a crash while it ran, parks
        the run on a ``tool_outcome`` approval: its tool's approvers decide it when the
        tool has ``approval=``, else these operators, else anyone.
        """
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise WorkflowDefinitionError(f"{self.name}.operators() takes a list of names, got {names!r}")
        self._operators = tuple(names)
        return self._changed()

    def migrate(
        self,
        from_version: str,
        fn: MigrateFn,
        steps: Mapping[str, str] | None = None,
        to: str | None = None,
    ) -> Self:
        """Upgrade runs parked on ``from_version`` when this definition picks them up.

        ``fn(state)`` gets the run's stored state (JSON data: a dict, as the older
        version stored it) and returns the new one, which must validate against this
        definition's state model. ``steps`` renames steps (old name → new name): where
        the run is and where its gate goes on. Outputs already recorded keep the names
        they were recorded under in ``ctx.step_results``.

        Migrations chain: ``Workflow("W", version="3").migrate("1", f12).migrate("2", f23)``
        brings a version-1 run through both. A migration leads to the version of the next
        one declared, the last to the workflow's version; ``to`` says otherwise.

        A run is migrated once: the new state, step and version are committed (with a
        ``migrated`` event) before the run goes on. A migration that raises, or a state
        that does not validate after it, leaves the run where it was with an
        :class:`~agentflow.IncompatibleRunError`.
        """
        source = check_version(from_version, f"workflow {self.name!r} .migrate()")
        if not callable(fn):
            raise WorkflowDefinitionError(f"workflow {self.name!r} .migrate({source!r}): fn must be callable")
        renames = dict(steps or {})
        for old, new in renames.items():
            if not (isinstance(old, str) and isinstance(new, str) and old and new):
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r} .migrate({source!r}): steps maps step names to step names, "
                    f"got {old!r}: {new!r}"
                )
        target = None if to is None else check_version(to, f"workflow {self.name!r} .migrate(to=)")
        self._migrations.append((source, fn, renames, target))
        return self._changed()

    def compile(self) -> WorkflowSpec:
        """Validate the definition and freeze it (cached until the next builder call)."""
        if self._spec is not None:
            return self._spec
        if self._flow is None and self._main is None:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} has no steps: call .flow({{...}}) or .execute(fn)"
            )
        initial: dict[str, Any] = {}
        if self._state is not None:
            try:
                initial = self._state.model_validate(self._initial or {}).model_dump()
            except ValidationError as exc:
                missing = [".".join(map(str, e["loc"])) for e in exc.errors()]
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r}: state model {self._state.__name__} cannot be built from "
                    f"the initial state (fields {missing}); give defaults or .state(Model, initial={{...}})"
                ) from None
        steps = self._flow or {}
        output_types: dict[str, type[BaseModel]] = {}
        for name, fn in steps.items():
            if fn.output is not None:
                output_types[name] = fn.output
        for fn in [*steps.values(), *([self._main] if self._main else [])]:
            _referenced_steps(fn.fn, output_types)
        children = self._find_children(steps, output_types)
        gated = [*steps.items(), *([(self._main.name, self._main)] if self._main else [])]
        self._spec = WorkflowSpec(
            name=self.name,
            description=self.description,
            input_model=self._input,
            state_model=self._state,
            initial_state=initial,
            output_model=self._output,
            steps=steps,
            main=self._main,
            max_steps=self._max_steps,
            persistence=self._persistence,
            agents=self._agents,
            output_types=output_types,
            forms={name: models for name, fn in gated if (models := forms_of(fn))},
            children=children,
            operators=self._operators,
            version=self.version,
            migrations=migrations_of(self.name, self.version, self._migrations),
        )
        return self._spec

    def _find_children(
        self, steps: dict[str, StepFunction], output_types: dict[str, type[BaseModel]]
    ) -> dict[str, Workflow]:
        """The child workflows (declared, then found in step code) by name.

        A step (or a function it calls, such as a ``Parallel.map`` branch) that runs one
        child workflow with an ``.output(Model)`` has that model as its output type, so
        its result comes back typed after a reload.
        """
        found: dict[str, Workflow] = {}

        def add(wf: Workflow) -> None:
            other = found.setdefault(wf.name, wf)
            if other is not wf:
                raise WorkflowDefinitionError(
                    f"workflow {self.name!r}: two different child workflows are named {wf.name!r}; "
                    "give each a name of its own"
                )

        for wf in self._children:
            add(wf)
        fns = [(name, fn.fn) for name, fn in steps.items()]
        if self._main is not None:
            fns.append((self._main.name, self._main.fn))
        for name, fn in fns:
            for label, kids, runs in _children_by_function(name, fn):
                for wf in kids:
                    add(wf)
                models = {wf._output for wf in kids}
                if runs and len(models) == 1 and None not in models and (self._main is None or label != name):
                    model = next(iter(models))
                    assert model is not None
                    output_types.setdefault(label, model)
        return found

    def mermaid(self) -> str:
        """A Mermaid flowchart of the steps and their edges, gates and parallel branches marked."""
        if self._main is not None:
            main = f'main["{self._main.name} (imperative)"]'
            return f"flowchart TD\n    __start__([START]) --> {main} --> __end__([END])"
        return mermaid(dict(self._flow or {}))

    def _repr_markdown_(self) -> str:
        head = f"**{self.name}**" + (f": {self.description}" if self.description else "")
        return f"{head}\n\n```mermaid\n{self.mermaid()}\n```"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """In a notebook: the Mermaid graph (``text/markdown``) and its steps as text."""
        return {"text/markdown": self._repr_markdown_(), "text/plain": self.outline()}

    def outline(self) -> str:
        """The workflow as plain text: its name, then each step and where it may go."""
        head = f"Workflow {self.name!r}" + (f": {self.description}" if self.description else "")
        if self._main is not None:
            return f"{head}\n  {self._main.name} (imperative: steps as the function runs them)"
        return f"{head}\n{outline(dict(self._flow or {}))}"

    def __repr__(self) -> str:
        kind = "execute" if self._main else f"{len(self._flow or {})} steps"
        return f"<Workflow {self.name!r} ({kind})>"
