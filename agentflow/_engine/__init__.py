"""The engine: how one run advances (private; the public API is in :mod:`agentflow`).

``run`` (the live run and its commits) · ``context`` (``ctx``) · ``invoke`` (the one
way to call a step) · ``values`` (typed values at the edge) · ``journal`` · ``gates``
(parking, deciding, resuming) · ``fanout`` (parallel branches) · ``flow`` and
``imperative`` (the two interpreters) · ``drive`` (how a run leaves) · ``kernel`` (the
Protocol the runtime implements for it).
"""
