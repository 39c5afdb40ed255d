"""Keys: every Redis key agentflow uses, built in one place from ``key_prefix``.

Layout (``P`` is the key prefix)::

    P run:{<run_id>}:rec       HASH   the RunRecord, one JSON string per field
    P run:{<run_id>}:events    LIST   the run's events, JSON, oldest first
    P run:{<run_id>}:outputs   LIST   the run's step outputs, JSON, oldest first
    P run:{<run_id>}:journal   HASH   journal key -> JSON value
    P runs                     ZSET   every run id, scored by created_at
    P wf:<workflow>:runs       ZSET   the workflow's run ids, scored by created_at
    P wf:<workflow>:gates      ZSET   ids of the workflow's runs waiting at a gate with
                                      a deadline, scored by that deadline

The four keys of a run share the hash tag ``{<run_id>}`` so the run's commit script,
which touches all of them, runs on Redis Cluster. The index keys span runs, so they
cannot share that tag: they are written next to the script (in the same pipeline) and
may briefly disagree with the records; readers check every index entry against the
record and drop the stale ones. Run ids must be non-empty (an empty hash tag would
scatter a run's keys across slots).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Keys", "RunKeys"]


class RunKeys(NamedTuple):
    """The keys holding one run; all in one Redis Cluster slot."""

    rec: str
    events: str
    outputs: str
    journal: str


class Keys:
    """Builds every key from ``prefix``.

    Args:
        prefix: prepended verbatim to every key (e.g. ``"deploy:"``).
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._all = f"{prefix}runs"

    def run(self, run_id: str) -> RunKeys:
        """The keys of run ``run_id``."""
        base = f"{self.prefix}run:{{{run_id}}}:"
        return RunKeys(base + "rec", base + "events", base + "outputs", base + "journal")

    def all_runs(self) -> str:
        """The index of every run, scored by ``created_at``."""
        return self._all

    def workflow_runs(self, workflow: str) -> str:
        """The index of ``workflow``'s runs, scored by ``created_at``."""
        return f"{self.prefix}wf:{workflow}:runs"

    def gates(self, workflow: str) -> str:
        """The index of ``workflow``'s runs waiting at a gate, scored by its deadline."""
        return f"{self.prefix}wf:{workflow}:gates"
