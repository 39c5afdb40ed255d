"""Versions of a workflow, and the migrations that bring a parked run from one to the next.

A run records the version of the definition it started on (``Workflow(..., version=)``).
When a definition of another version picks it up, the migrations declared with
``Workflow.migrate`` are chained from the run's version to the definition's, each
taking the stored state (JSON) and returning the new one. Nothing here runs a
migration: :mod:`agentflow._engine.versions` does, once per run, and commits the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import WorkflowDefinitionError

__all__ = ["Migration", "MigrateFn", "chain_of", "check_version", "migrations_of"]

#: A migration's function: the stored state (JSON data, a dict) → the new state.
MigrateFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``Workflow.migrate(from_version, fn, steps=..., to=...)`` declared.

    Attributes:
        source: the version it upgrades from.
        target: the version it upgrades to (the next declared migration's ``source``,
            else the workflow's version, unless ``to`` was given).
        fn: the state upgrade.
        steps: old step name → new step name, applied to where the run is and where its
            gate goes on (``target``, ``on_reject``, ``on_timeout``).
    """

    source: str
    target: str
    fn: MigrateFn
    steps: Mapping[str, str] = field(default_factory=dict)


def check_version(version: Any, what: str) -> str:
    """``version`` if it can name a version (a non-empty string without spaces around it).

    Raises:
        WorkflowDefinitionError: it cannot.
    """
    if not isinstance(version, str) or not version or version != version.strip():
        raise WorkflowDefinitionError(f"{what}: a version is a non-empty string such as '2', got {version!r}")
    return version


def migrations_of(
    workflow: str, version: str, declared: list[tuple[str, MigrateFn, dict[str, str], str | None]]
) -> dict[str, Migration]:
    """The declared migrations by source version, each with its target, checked.

    Raises:
        WorkflowDefinitionError: two migrations from one version, a migration from the
            workflow's own version, or a chain that loops or does not reach ``version``.
    """
    out: dict[str, Migration] = {}
    for i, (source, fn, steps, to) in enumerate(declared):
        if source in out:
            raise WorkflowDefinitionError(f"workflow {workflow!r}: two migrations from version {source!r}")
        if source == version:
            raise WorkflowDefinitionError(
                f"workflow {workflow!r} is version {version!r}: a migration from it has nowhere to go"
            )
        target = to if to is not None else (declared[i + 1][0] if i + 1 < len(declared) else version)
        out[source] = Migration(source, target, fn, dict(steps))
    for source in out:
        chain_of(workflow, version, out, source)
    return out


def chain_of(
    workflow: str, version: str, migrations: Mapping[str, Migration], source: str
) -> list[Migration]:
    """The migrations that lead from ``source`` to ``version``, in order ([] when they are equal).

    Raises:
        WorkflowDefinitionError: the chain loops or stops before ``version`` (at build
            time for declared versions; the engine asks only for chains that exist).
    """
    chain: list[Migration] = []
    seen = {source}
    at = source
    while at != version:
        m = migrations.get(at)
        if m is None:
            raise WorkflowDefinitionError(
                f"workflow {workflow!r}: the migrations from version {source!r} stop at {at!r}, "
                f"not at the workflow's version {version!r}; add .migrate({at!r}, fn)"
            )
        if m.target in seen:
            raise WorkflowDefinitionError(
                f"workflow {workflow!r}: the migrations from version {source!r} loop at {m.target!r}"
            )
        seen.add(m.target)
        chain.append(m)
        at = m.target
    return chain
