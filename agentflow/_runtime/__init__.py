"""The runtime: many runs in one process (private).

``supervisor`` (the runs of a workflow this process owns; the engine's Kernel) ·
``leases`` (renewal and control flags) · ``timers`` (gate deadlines) · ``notify``
(waking watchers) · ``listeners`` (told of approvals parked and decided: webhooks).
"""
