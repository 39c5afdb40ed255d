"""Static edges of a flow, read from its step functions' source, and the Mermaid chart."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .steps import END, START

__all__ = ["Edge", "edges_of", "mermaid", "outline", "scope_of"]


def scope_of(fn: Callable[..., Any]) -> dict[str, Any]:
    """The names ``fn``'s code can see: its globals, and its closure's cells over them."""
    code = getattr(fn, "__code__", None)
    scope: dict[str, Any] = dict(getattr(fn, "__globals__", {}))
    if code is None:
        return scope
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            scope[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return scope


@dataclass(frozen=True, slots=True)
class Edge:
    """``source`` may go to ``target``; ``kind`` is next, approve, reject, timeout, parallel,
    child (a child run ended) or fail (a child run failed)."""

    source: str
    target: str
    kind: str = "next"
    branches: tuple[str, ...] = ()


def _source_node(fn: Callable[..., Any]) -> ast.AST | None:
    """The AST of ``fn`` (a def or a lambda), or None when the source is unavailable."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    if getattr(fn, "__name__", "") != "<lambda>":
        try:
            return ast.parse(src)
        except SyntaxError:
            return None
    # A lambda's source is the whole line(s) it sits in; cut from "lambda" and shrink
    # the tail until it parses, then take the lambda matching the code's first line.
    start = src.find("lambda")
    while start >= 0:
        text = src[start:]
        for end in range(len(text), 0, -1):
            try:
                tree = ast.parse(text[:end].strip(), mode="eval")
            except SyntaxError:
                continue
            found = next((n for n in ast.walk(tree) if isinstance(n, ast.Lambda)), None)
            if found is not None:
                return found
            break
        start = src.find("lambda", start + 1)
    return None


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _const(node: ast.AST | None, known: set[str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
        return node.value
    if node is not None and _name(node) == "END":
        return END
    return None


def _branch_names(node: ast.AST) -> tuple[str, ...]:
    if isinstance(node, ast.Dict):
        return tuple(k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    if isinstance(node, ast.List | ast.Tuple):
        return tuple(n for n in (_name(e) for e in node.elts) if n)
    return ()


def _returned(tree: ast.AST) -> Iterator[ast.expr]:
    """The expressions a def returns, or a lambda's body."""
    if isinstance(tree, ast.Lambda):
        yield tree.body
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None:
            yield node.value


def _targets(expr: ast.expr, source: str, known: set[str]) -> Iterator[Edge]:
    """Edges an expression in return position leads to."""
    if isinstance(expr, ast.IfExp):
        yield from _targets(expr.body, source, known)
        yield from _targets(expr.orelse, source, known)
        return
    if isinstance(expr, ast.BoolOp):
        for v in expr.values:
            yield from _targets(v, source, known)
        return
    target = _const(expr, known)
    if target:
        yield Edge(source, target, "next")
        return
    if not isinstance(expr, ast.Call):
        return
    callee = _name(expr.func)
    kwargs = {k.arg: k.value for k in expr.keywords if k.arg}
    args = list(expr.args)
    if callee == "Next":
        target = _const(args[0] if args else kwargs.get("target"), known)
        if target:
            yield Edge(source, target, "next")
    elif callee == "Wait":
        for kind, pos, key in (
            ("approve", 1, "target"),
            ("reject", 2, "on_reject"),
            ("timeout", 3, "on_timeout"),
        ):
            target = _const(args[pos] if len(args) > pos else kwargs.get(key), known)
            if target:
                yield Edge(source, target, kind)
    elif callee == "Run":
        for kind, pos, key in (("child", 2, "target"), ("fail", 3, "on_fail"), ("reject", 4, "on_reject")):
            target = _const(args[pos] if len(args) > pos else kwargs.get(key), known)
            if target:
                yield Edge(source, target, kind)
    elif callee in ("Parallel", "map"):
        pos = 2 if callee == "map" else 1
        target = _const(args[pos] if len(args) > pos else kwargs.get("target"), known)
        if callee == "map":
            branches = tuple(n for n in [_name(args[0])] if n) if args else ()
        else:
            branches = _branch_names(args[0]) if args else ()
        if target:
            yield Edge(source, target, "parallel", branches)


def _walk_calls(tree: ast.AST, source: str, known: set[str]) -> Iterator[Edge]:
    for expr in _returned(tree):
        yield from _targets(expr, source, known)


def edges_of(steps: dict[str, Callable[..., Any]]) -> list[Edge]:
    """Edges found from each step's returns (string literals naming steps, END, Wait, Parallel)."""
    known = set(steps) - {START}
    out: list[Edge] = []
    for name, fn in steps.items():
        inner = getattr(fn, "fn", fn)
        tree = _source_node(inner)
        if tree is None:
            # No source (a REPL, exec, a compiled module): the names a step can return
            # are still constants of its code, so the edges are drawn from those.
            out.extend(Edge(name, target) for target in _code_targets(inner, known))
            continue
        seen: set[tuple[str, str]] = set()
        for edge in _walk_calls(tree, name, known):
            if (edge.target, edge.kind) not in seen:
                seen.add((edge.target, edge.kind))
                out.append(edge)
    return out


def _code_targets(fn: Callable[..., Any], known: set[str]) -> list[str]:
    """Step names (and END) among the string constants of ``fn``'s code, nested code included.

    END is also found as the global name ``END`` (``Next(END, ...)``) when it is the constant.
    """
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)  # noqa: B004
    found: list[str] = []
    codes = [code] if isinstance(code, types.CodeType) else []
    end_by_name = getattr(fn, "__globals__", {}).get("END") == END
    while codes:
        c = codes.pop()
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                codes.append(const)
            elif isinstance(const, str) and (const in known or const == END) and const not in found:
                found.append(const)
        if end_by_name and "END" in c.co_names and END not in found:
            found.append(END)
    return found


def unknown_edges(steps: dict[str, Callable[..., Any]]) -> list[str]:
    """Steps whose edges could be read neither from source nor from code constants."""
    known = set(steps) - {START}
    return [
        name
        for name, fn in steps.items()
        if _source_node(getattr(fn, "fn", fn)) is None and not _code_targets(getattr(fn, "fn", fn), known)
    ]


def _node_id(name: str) -> str:
    if name == START:
        return "__start__"
    if name == END:
        return "__end__"
    return "s_" + "".join(c if c.isalnum() else "_" for c in name)


def mermaid(steps: dict[str, Callable[..., Any]]) -> str:
    """A Mermaid flowchart: steps, edges, gates (hexagons) and parallel branches."""
    edges = edges_of(steps)
    gates = {e.source for e in edges if e.kind in ("approve", "reject", "timeout", "child", "fail")}
    lines = ["flowchart TD", "    __start__([START])", "    __end__([END])"]
    for name in steps:
        if name == START:
            continue
        label = name.replace('"', "'")
        lines.append(
            f'    {_node_id(name)}{{{{"{label} ⏸"}}}}'
            if name in gates
            else f'    {_node_id(name)}["{label}"]'
        )
    for name in unknown_edges(steps):
        # Said, not silently left out: the chart would otherwise look complete.
        lines.append(f"    %% edges of step {name!r} unknown: its source is not available")
    labels = {
        "approve": "approved",
        "reject": "rejected",
        "timeout": "timed out",
        "child": "child run ended",
        "fail": "child run failed",
    }
    for e in edges:
        src, dst = _node_id(e.source), _node_id(e.target)
        if e.kind == "parallel" and e.branches:
            for b in e.branches:
                bid = f"{src}__{_node_id(b)}"
                lines.append(f'    {src} -. parallel .-> {bid}[/"{b}"/]')
                lines.append(f"    {bid} --> {dst}")
        elif e.kind in labels:
            lines.append(f"    {src} -- {labels[e.kind]} --> {dst}")
        elif e.kind == "parallel":
            lines.append(f"    {src} -- parallel --> {dst}")
        else:
            lines.append(f"    {src} --> {dst}")
    return "\n".join(lines)


def outline(steps: dict[str, Callable[..., Any]]) -> str:
    """The steps and their edges as plain text, one step a line: ``Build -> Test``.

    Gates are marked ``(gate)``; an edge that is not a plain next step says its kind
    (``approved``, ``rejected``, ``parallel [a, b]``...); ``?``: a step whose edges are
    unknown (its source is not available). What :func:`mermaid` draws.
    """
    edges = edges_of(steps)
    gates = {e.source for e in edges if e.kind in ("approve", "reject", "timeout", "child", "fail")}
    labels = {"approve": "approved", "reject": "rejected", "timeout": "timed out"}
    labels |= {"child": "child run ended", "fail": "child run failed"}
    names = {START: "START", END: "END"}
    out: dict[str, list[str]] = {}
    for e in edges:
        how = labels.get(e.kind, "")
        if e.kind == "parallel":
            how = f"parallel [{', '.join(e.branches)}]" if e.branches else "parallel"
        target = names.get(e.target, e.target)
        out.setdefault(e.source, []).append(f"{target} ({how})" if how else target)
    unknown = set(unknown_edges(steps))
    lines = []
    for name in steps:
        mark = " (gate)" if name in gates else ""
        targets = ", ".join(out.get(name, [])) or ("?" if name in unknown else "-")
        lines.append(f"  {names.get(name, name)}{mark} -> {targets}")
    return "\n".join(lines)
