"""``agentflow reviewers add | list | remove MODULE [NAME]``: who may sign in to the review page."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import AgentflowError
from ..steward import Steward
from ..stores.contract import Store
from ..stores.memory import MemoryStore
from .lookup import _check_stores


def _review_store(steward: Steward) -> Store:
    """The store the module's workflows keep their runs in: their reviewers live there too.

    Raises:
        AgentflowError: the workflows use different stores, or keep runs in memory (the
            reviewers would be gone when the command exits).
    """
    places: dict[Any, list[str]] = {}
    for info in steward.workflows():
        p = steward.get(info.name).compile().persistence
        if p is None or not p.enabled or p.store == "memory" or isinstance(p.store, MemoryStore):
            raise AgentflowError(
                f"workflow {info.name!r} keeps its runs in memory, where reviewers would be gone when "
                "this command exits; give it a .persistence(store='sqlite' | 'redis' | 'postgres')"
            )
        if isinstance(p.store, str):
            path = os.path.abspath(p.path or "agentflow.db") if p.store == "sqlite" else None
            place: Any = (p.store, p.key_prefix, p.url, path)
        else:
            place = id(p.store)
        places.setdefault(place, []).append(info.name)
    if len(places) > 1:
        groups = "; ".join(", ".join(names) for names in places.values())
        raise AgentflowError(
            f"the workflows of the module keep their runs in different stores ({groups}), and reviewers "
            "live in one: serve and manage the reviewers of each store's workflows from a module of their own"
        )
    return steward.runner(steward.workflows()[0].name).store


async def _reviewers(steward: Steward, args: argparse.Namespace, out: Any) -> int:
    """``reviewers add | remove | list``: who may sign in to the review page (``serve``)."""
    from ..review.reviewers import Reviewers

    if args.action != "add":
        _check_stores(steward)
    try:
        reviewers = Reviewers(_review_store(steward))
        if args.action == "add":
            token = await reviewers.add(args.name)
            print(
                f"token of reviewer {args.name!r}, to sign in to the review page; it will not be shown "
                f"again (`agentflow reviewers remove {args.module} {args.name}` revokes it):",
                file=out,
            )
            print(token, file=out)
        elif args.action == "remove":
            revoked = await reviewers.remove(args.name)
            if not revoked:
                print(f"agentflow: no reviewer {args.name!r}", file=sys.stderr)
                return 3
            print(f"revoked {revoked} token(s) of reviewer {args.name!r}", file=out)
        else:
            for name in await reviewers.names():
                print(name, file=out)
    finally:
        await steward.close()
    return 0
