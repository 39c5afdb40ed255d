"""Workflows for ``Steward.discover`` tests: every top-level Workflow here is registered."""

from __future__ import annotations

from pydantic import BaseModel

from agentflow import END, START, Next, Workflow, step


class Greeting(BaseModel):
    name: str


class Tally(BaseModel):
    greeted: int = 0


def greet(ctx):
    ctx.set_state(greeted=ctx.state.greeted + 1)
    return Next(END, output=f"hello {ctx.input.name}")


hello = Workflow("Hello", "Greets someone").input(Greeting).state(Tally).flow({START: greet})


async def _shout(ctx):
    return (await ctx.step("upper", str.upper, ctx.input.name)) + "!"


shout = Workflow("Shout").input(Greeting).execute(_shout)


class Piece(BaseModel):
    name: str
    size: int


@step(output=Piece)
def piece(ctx):
    """A branch with a declared output, reached by other modules as ``sample_workflows.piece``."""
    return {"name": "bolt", "size": 3}


NOT_A_WORKFLOW = "ignored by discover"
