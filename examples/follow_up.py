"""A durable timer, a retry and a fork: a follow-up mail sent a while after sign-up.

    python examples/follow_up.py

A run welcomes a new user, then sleeps (``Wait(Sleep(...), "FollowUp")``): it holds no
task while it sleeps, only a record in the SQLite file. The runner that started it closes
before the timer is due; a second runner, opened later on the same file, fires it. The
follow-up step calls a mail service that is down, so the run fails there; once the
service is back, ``runner.retry(run_id)`` continues the run at that step with the state
it had before it. Finally ``runner.fork(run_id, at="FollowUp", state=...)`` starts a new
run from that step with another tone, leaving the original as it was.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from datetime import UTC, datetime

from pydantic import BaseModel

from agentflow import END, START, Next, RunFailedError, RunStatus, Sleep, Wait, Workflow, WorkflowRunner


class SignUp(BaseModel):
    email: str


class Mailing(BaseModel):
    tone: str = "formal"
    sent: list[str] = []


MAIL_SERVICE = {"up": False}  # the follow-up step fails while the mail service is down


def welcome(ctx):
    print(f"  welcome: mailing {ctx.input.email}")
    ctx.set_state(sent=[*ctx.state.sent, "welcome"])
    return Wait(Sleep(1.0), "FollowUp")  # a durable timer: no task while it sleeps


def follow_up(ctx):
    if not MAIL_SERVICE["up"]:
        raise ConnectionError("mail service unreachable")
    text = "Dear user, how is it going?" if ctx.state.tone == "formal" else "Hey! How's it going?"
    print(f"  follow-up (attempt {ctx.attempt}, {ctx.state.tone}): {text!r}")
    ctx.set_state(sent=[*ctx.state.sent, "follow-up"])
    return Next(END, output={"to": ctx.input.email, "text": text})


def onboarding(path: str) -> Workflow:
    return (
        Workflow("Onboarding", "Welcome a user, follow up a while later")
        .input(SignUp)
        .state(Mailing)
        .flow({START: welcome, "FollowUp": follow_up})
        .persistence(store="sqlite", path=path)
    )


async def main(path: str) -> None:
    async with WorkflowRunner(onboarding(path)) as first:
        handle = await first.run({"email": "ada@example.com"})
        info = await handle.wait_for(RunStatus.WAITING)
        events = [e async for e in _until_waiting(handle)]
        due = datetime.fromtimestamp(events[-1].data["deadline"], UTC)
        print(f"run {handle.run_id[:8]} is {info.status.value}: sleeping until {due:%H:%M:%S.%f} UTC")
    print("first runner closed; the timer is not due yet")

    await asyncio.sleep(1.2)  # the timer comes due while no runner is open
    async with WorkflowRunner(onboarding(path)) as second:
        print("second runner opened on the same store")
        run = await second.attach(handle.run_id)
        try:
            await run.result(timeout=10)
        except RunFailedError as err:
            print(
                f"the timer fired in the second runner; the run failed at step {err.step!r}: {err.error_type}"
            )

        MAIL_SERVICE["up"] = True
        result = await (await second.retry(handle.run_id)).result(timeout=10)
        print(f"retried: {result.status.value} {result.output} sent={result.state.sent}")

        fork = await second.fork(handle.run_id, at="FollowUp", state={"tone": "casual"})
        forked = await fork.result(timeout=10)
        print(f"fork {fork.run_id[:8]} at 'FollowUp': {forked.status.value} {forked.output['text']!r}")
        original = await (await second.attach(handle.run_id)).result()
        print(f"original untouched: {original.output['text']!r}")


async def _until_waiting(handle):
    async for ev in handle.events():
        yield ev
        if ev.kind == "waiting":
            return


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(os.path.join(folder, "onboarding.db")))
