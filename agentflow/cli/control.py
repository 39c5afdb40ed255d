"""Steering runs: ``pause``, ``resume``, ``stop``, ``retry``, ``fork``, ``recover``.

``resume``, ``retry`` and ``fork`` advance the run in this process and follow it until
it ends or parks (``--no-follow`` returns at once, leaving the run to a worker's
``recover()`` once this process's lease runs out); they exit 1 when it failed.
"""

from __future__ import annotations

import argparse

from ..errors import InvalidStateError
from ..runner import RunHandle, WorkflowRunner
from ..steward import Steward
from .follow import Follower, exit_code
from .lookup import UsageError, check_stores, find_run, runners
from .output import Output
from .runs import parse_json

__all__ = ["fork", "pause_resume_stop", "recover", "retry"]


async def _went_on(handle: RunHandle, args: argparse.Namespace, out: Output) -> int:
    if args.follow:
        return exit_code(await Follower(out, args.module).follow(handle))
    # This process exits now and releases the run: it is not advancing.
    if out.json:
        out.json_line({"run_id": handle.run_id, "status": (await handle.info()).status.value})
    else:
        out.line(f"run {handle.run_id} waits for a worker to go on (agentflow recover {args.module})")
    return 0


async def pause_resume_stop(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``pause`` (the step in flight finishes first), ``resume`` (and follow), ``stop`` (final)."""
    check_stores(steward)
    _, handle = await find_run(steward, args.run_id)
    if args.command == "resume":
        await handle.resume()
        return await _went_on(handle, args, out)
    await (handle.pause() if args.command == "pause" else handle.stop())
    info = await handle.info()
    if out.json:
        out.json_line({"run_id": info.run_id, "status": info.status.value})
    else:
        where = f" at step {info.step}" if info.step else ""
        out.line(f"run {info.run_id} is {info.status.value}{where}")
    return 0


async def retry(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``retry MODULE RUN``: a failed run continues at its failing step."""
    check_stores(steward)
    runner, handle = await find_run(steward, args.run_id)
    return await _went_on(await runner.retry(handle.run_id), args, out)


async def _reached(runner: WorkflowRunner, run_id: str) -> list[str]:
    """The steps the run started (or was paused before), in the order it first reached them."""
    seen: dict[str, None] = {}
    for ev in await runner.store.events(run_id):
        if ev.kind in ("step_started", "paused") and ev.step:
            seen.setdefault(ev.step)
    return list(seen)


async def fork(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``fork MODULE RUN --at STEP [--state JSON] [--run-id ID]``: a new run from that point."""
    check_stores(steward)
    runner, source = await find_run(steward, args.run_id)
    state = parse_json(args.state, "--state")
    try:
        handle = await runner.fork(source.run_id, at=args.at, state=state, run_id=args.new_run_id)
    except InvalidStateError:
        steps = await _reached(runner, source.run_id)
        if args.at in steps:
            raise
        raise UsageError(
            f"run {source.run_id} never reached step {args.at!r}; it reached {steps}: fork at one of them"
        ) from None
    if not out.json:
        out.line(f"forked run {source.run_id} at step {args.at!r} as run {handle.run_id}")
    return await _went_on(handle, args, out)


async def recover(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``recover MODULE``: resume the runs whose owner died, following each until it ends or parks."""
    check_stores(steward)
    code = 0
    follower = Follower(out, args.module)
    for runner in runners(steward):
        for handle in await runner.recover():
            if not out.json:
                out.line(f"recovered {handle.run_id} ({runner.spec.name})")
            code = max(code, exit_code(await follower.follow(handle)))
    return code
