"""What a handle's model call is held to before it is sent: the run's budget, and the
agent's rate limit.

``check_budget`` refuses a call that could pass the run's ``TokenBudget`` (a
:class:`~agentflow.errors.BudgetExceededError` naming the agent and what was spent);
``turn`` waits for the call's turn under the agent's ``RateLimit``, reserving the tokens
it may use, and records the wait on the run (``agent_throttled``) and in the pool's
statistics. The handle calls both on every model call that is not replayed.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import BudgetExceededError
from .spi import Permit, ProviderRequest

if TYPE_CHECKING:
    from .handle import AgentHandle

__all__ = ["check_budget", "turn"]


def check_budget(handle: AgentHandle, request: ProviderRequest) -> None:
    """Refuse ``request`` if it could pass the run's token budget, or the run spent its cost budget."""
    budget = handle._accessor._pools.config.budget
    if budget is None:
        return
    journal = handle._accessor._journal
    cap = budget.max_tokens
    if cap is not None:
        spent, most = journal.spent(), request.max_tokens
        if spent >= cap or (most is not None and spent + most > cap):
            this_call = f" and this call may use up to {most}" if most is not None else ""
            raise BudgetExceededError(
                f"agent {handle.agent_name!r}: the run has spent {spent} of its {cap}-token "
                f"budget{this_call}, so the call was not sent"
            )
    if budget.max_cost is not None:
        cost = journal.cost()
        if cost is not None and cost >= budget.max_cost:
            raise BudgetExceededError(
                f"agent {handle.agent_name!r}: the run has spent ${cost} of its ${budget.max_cost} "
                "budget, so the call was not sent"
            )


async def turn(handle: AgentHandle, request: ProviderRequest) -> Permit | None:
    """Wait for this request's turn under the agent's ``RateLimit`` (None: no limit).

    A wait is counted in the pool's statistics and recorded on the run as an
    ``agent_throttled`` event: ``{"agent", "seconds", "limit", "key"}``, ``limit``
    being the one waited for longest.
    """
    limit = handle.agent.limit
    limiter = handle._accessor._pools.limiter
    if limit is None or limiter is None:
        return None
    pool = handle._pool
    tokens = _estimate(request) if limit.tokens_per_minute is not None else 0
    permit = await limiter.acquire(pool.limit_key, limit, tokens)
    if permit.waited > 0:
        pool.waited += 1
        pool.wait_seconds += permit.waited
        pool.last_wait = permit.waited
        data = {
            "agent": handle.agent_name,
            "seconds": round(permit.waited, 3),
            "limit": permit.reason,
            "key": pool.limit_key,
        }
        handle._accessor._journal.emit("agent_throttled", data)
    return permit


def _estimate(request: ProviderRequest) -> int:
    """Tokens a request may use, reserved under a ``tokens_per_minute`` limit until its reply
    says: its ``max_tokens``, plus a token per four characters of what it sends."""
    chars = len(request.instructions or "")
    for m in request.messages:
        chars += len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
    for t in request.tools:
        chars += len(t.name) + len(t.description) + len(json.dumps(t.parameters))
    if request.output_schema is not None:
        chars += len(json.dumps(request.output_schema))
    return chars // 4 + (request.max_tokens or 0)
