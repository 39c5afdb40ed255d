"""How the engine unwinds a step it cannot go on with: a stop, or a park inside the step."""

from __future__ import annotations

__all__ = ["Stop", "Suspend"]


class Stop(Exception):
    """Internal: the run must stop (asked here, or by another process through the control flag)."""


class Suspend(BaseException):
    """Internal: the run parked (a gate, a pause, a tool call's approval); unwinds user code,
    which cannot catch it by accident."""
