"""``agentflow worker MODULE``: claim and advance the module's runs until SIGTERM."""

from __future__ import annotations

import argparse
from typing import Any

from ..steward import Steward
from ..worker import Worker


async def _work(steward: Steward, args: argparse.Namespace, out: Any) -> int:
    """Serve the module's workflows until SIGTERM / SIGINT, then say what was done."""
    worker = Worker(steward, concurrency=args.concurrency, grace=args.grace)
    names = ", ".join(w.name for w in steward.workflows())
    print(f"worker serving {names} (concurrency {args.concurrency}); stop with SIGTERM", file=out, flush=True)
    await worker.serve()
    stats = await worker.statistics()
    print(
        f"worker stopped: {stats.claimed} runs handed over, {stats.recovered} recovered, "
        f"{stats.dropped} queue entries dropped",
        file=out,
        flush=True,
    )
    return 0
