"""How the review page shows untrusted run data: Markdown, JSON trees and diffs, as safe HTML.

Everything here is a pure function from a value to :class:`markupsafe.Markup` that a
template may insert as it is. Agent output is untrusted, so:

- Markdown is rendered by markdown-it-py with raw HTML off, then sanitized by nh3 with an
  explicit allow-list of tags and attributes; links keep only ``http``, ``https`` and
  ``mailto`` URLs (relative ones are dropped) and get ``rel="noopener noreferrer"``.
  Images are not rendered (the page's CSP would block remote ones anyway): ``![alt](url)``
  shows as a link.
- Every other value (JSON keys and leaves, diff lines) is escaped.
- No output carries a ``style`` or event-handler attribute: the page's CSP allows style
  from its stylesheet only, so every look is a CSS class (``tree-*``, ``diff-*``).

A context can be megabytes. :func:`markdown` renders the first :data:`MARKDOWN_CHARS`
characters; :func:`tree` shows at most :data:`TREE_VALUES` values, :data:`TREE_DEPTH`
levels and :data:`TREE_CHARS` characters of text; :func:`diff` compares at most
:data:`DIFF_LINES` lines and :data:`DIFF_CHARS` characters a side. Whatever is cut is said
where it was cut.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import nh3
import pydantic_core
from markdown_it import MarkdownIt
from markupsafe import Markup, escape

__all__ = [
    "DIFF_CHARS",
    "DIFF_LINES",
    "MARKDOWN_CHARS",
    "TREE_CHARS",
    "TREE_DEPTH",
    "TREE_VALUES",
    "context",
    "diff",
    "markdown",
    "tree",
]

#: Characters of a text rendered as Markdown at most (markdown-it-py renders dense
#: Markdown at some 50,000-100,000 characters a second); the rest is left out, and said so.
MARKDOWN_CHARS = 50_000
#: Values (leaves and containers) a tree shows at most.
TREE_VALUES = 5_000
#: Levels of nesting a tree shows at most.
TREE_DEPTH = 24
#: Characters of string leaves a tree shows at most, all strings together (a long string
#: is shown whole until this budget runs out).
TREE_CHARS = 256_000
#: Lines a side a diff compares at most.
DIFF_LINES = 5_000
#: Characters a side a diff compares at most.
DIFF_CHARS = 256_000
#: Lines longer than this are marked changed as a whole, not word by word.
_WORD_DIFF_CHARS = 2_000
#: Levels of the tree that start unfolded.
_OPEN_LEVELS = 2

_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5",
    "h6", "hr", "i", "kbd", "li", "ol", "p", "pre", "s", "strong", "sub", "sup", "table",
    "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip
_ATTRIBUTES = {"a": {"href", "title"}, "abbr": {"title"}, "ol": {"start"}}
_CLEANER = nh3.Cleaner(
    tags=_TAGS,
    attributes=_ATTRIBUTES,
    url_schemes={"http", "https", "mailto"},
    url_relative="deny",
    link_rel="noopener noreferrer",
    strip_comments=True,
)
# html=False: raw HTML in the text is shown as text. Tables and ~~strike~~ as GitHub has them.
_MD = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"]).disable("image")


def markdown(text: str) -> Markup:
    """``text`` rendered as Markdown and sanitized, in ``<div class="markdown">``.

    Raw HTML in ``text`` is shown as text; links keep absolute ``http(s)``/``mailto`` URLs
    only; nothing in the result can run script. A text longer than
    :data:`MARKDOWN_CHARS` is cut at a line break before it, and a ``markdown-cut`` note
    says how much was left out.
    """
    text = str(text)
    note = ""
    if len(text) > MARKDOWN_CHARS:
        cut = text.rfind("\n", 0, MARKDOWN_CHARS) + 1 or MARKDOWN_CHARS
        note = (
            f'<p class="markdown-cut">The text is long: {len(text) - cut:,} more characters '
            f"(of {len(text):,}) are not shown.</p>"
        )
        text = text[:cut]
    html = _CLEANER.clean(_MD.render(text))
    return Markup(f'<div class="markdown">{html}{note}</div>')


def tree(value: Any) -> Markup:
    """``value`` (any JSON value; other values as pydantic would dump them) as a tree.

    Objects and arrays are ``<details class="tree-node tree-object|tree-array">`` with a
    ``<summary>`` (the key and the size) and a ``<ul class="tree-items">``; the first two
    levels start open. Leaves are ``<span class="tree-leaf tree-string|tree-number|
    tree-boolean|tree-null">`` (a string with line breaks is also ``tree-multiline``).
    Keys (``tree-key``) and leaves are escaped. What passes the limits (see the module)
    is cut and a ``tree-cut`` element says what is missing.
    """
    out: list[str] = []
    budget = _Budget()
    _node(value, None, 0, budget, out)
    note = budget.note()
    return Markup(f'<div class="tree">{"".join(out)}{note}</div>')


class _Budget:
    """What a tree may still show, and what it left out."""

    def __init__(self) -> None:
        self.values = TREE_VALUES
        self.chars = TREE_CHARS
        self.cut = False

    def note(self) -> str:
        if not self.cut:
            return ""
        return (
            f'<p class="tree-cut tree-cut-note">This value is large: the tree shows at most '
            f"{TREE_VALUES:,} values, {TREE_DEPTH} levels and {TREE_CHARS:,} characters of text.</p>"
        )


def _node(value: Any, key: str | None, depth: int, budget: _Budget, out: list[str]) -> None:
    budget.values -= 1
    label = ""
    if key is not None:
        shown, cut = _clip(key, budget)
        label = f'<span class="tree-key">{escape(shown)}</span>{cut}'
    if isinstance(value, Mapping):
        _container(value.items(), len(value), "object", label, depth, budget, out)
    elif isinstance(value, list | tuple):
        _container(enumerate(value), len(value), "array", label, depth, budget, out)
    elif value is None or isinstance(value, str | bool | int | float):
        sep = '<span class="tree-sep">: </span>' if label else ""
        out.append(f"{label}{sep}{_leaf(value, budget)}")
    else:  # datetimes, models, sets…: as their JSON form
        try:
            plain = pydantic_core.to_jsonable_python(value, fallback=str)
        except Exception:
            plain = str(value)
        budget.values += 1
        _node(plain, key, depth, budget, out)


def _container(
    items: Iterable[tuple[Any, Any]],
    size: int,
    kind: str,
    label: str,
    depth: int,
    budget: _Budget,
    out: list[str],
) -> None:
    noun = ("key", "keys") if kind == "object" else ("item", "items")
    count = f'<span class="tree-size">{size:,} {noun[size != 1]}</span>'
    if size == 0:
        sep = '<span class="tree-sep">: </span>' if label else ""
        empty = "{}" if kind == "object" else "[]"
        out.append(f'{label}{sep}<span class="tree-leaf tree-{kind} tree-empty">{empty}</span>')
        return
    if depth >= TREE_DEPTH:
        budget.cut = True
        out.append(
            f'{label} {count} <span class="tree-cut">nested deeper than {TREE_DEPTH} levels: not shown</span>'
        )
        return
    opened = " open" if depth < _OPEN_LEVELS else ""
    head = f"{label} {count}" if label else count
    out.append(f'<details class="tree-node tree-{kind}"{opened}><summary>{head}</summary>')
    out.append('<ul class="tree-items">')
    shown = 0
    for k, v in items:
        if budget.values <= 0 or budget.chars <= 0:
            budget.cut = True
            out.append(f'<li class="tree-cut">… {size - shown:,} more {noun[1]} not shown</li>')
            break
        out.append('<li class="tree-item">')
        _node(v, str(k), depth + 1, budget, out)
        out.append("</li>")
        shown += 1
    out.append("</ul></details>")


def _leaf(value: str | bool | int | float | None, budget: _Budget) -> str:
    if value is None:
        return '<span class="tree-leaf tree-null">null</span>'
    if isinstance(value, bool):
        return f'<span class="tree-leaf tree-boolean">{"true" if value else "false"}</span>'
    if isinstance(value, int):
        try:
            text = str(value)
        except ValueError:  # past Python's limit on the digits of an int as text
            text = f"(a number of about {value.bit_length() * 0.30103:,.0f} digits)"
        return f'<span class="tree-leaf tree-number">{text}</span>'
    if isinstance(value, float):
        text = repr(value) if math.isfinite(value) else ("NaN" if math.isnan(value) else "Infinity")
        return f'<span class="tree-leaf tree-number">{escape(text)}</span>'
    value, cut = _clip(value, budget)
    kind = "tree-string tree-multiline" if "\n" in value else "tree-string"
    return f'<span class="tree-leaf {kind}">{escape(value)}</span>{cut}'


def _clip(text: str, budget: _Budget) -> tuple[str, str]:
    """``text`` as far as the budget of characters goes, and the note saying what was cut."""
    if len(text) <= budget.chars:
        budget.chars -= len(text)
        return text, ""
    budget.cut = True
    kept = max(budget.chars, 0)
    budget.chars = 0
    return text[:kept], f'<span class="tree-cut">… {len(text) - kept:,} more characters not shown</span>'


def diff(
    before: str,
    after: str,
    mode: Literal["split", "unified"] | str = "split",
    context_lines: int | None = None,
) -> Markup:
    """The line diff of ``before`` and ``after`` (difflib), escaped.

    ``mode="split"``: ``<table class="diff diff-split">``, before on the left and after on
    the right, one ``<tr class="diff-equal|diff-replace|diff-delete|diff-insert">`` a line
    pair with line numbers (``diff-lineno``); in a changed pair the words that differ are
    ``<del class="diff-word">`` / ``<ins class="diff-word">``. ``context_lines=N`` folds
    unchanged runs to N lines each side (a ``diff-skip`` row says how many were left out);
    None shows every line.

    ``mode="unified"``: ``<pre class="diff diff-unified">``, one ``<span class="diff-line
    diff-insert|diff-delete|diff-equal|diff-hunk|diff-file">`` a line (3 lines of context,
    or ``context_lines``).

    Each side is compared up to :data:`DIFF_CHARS` characters and :data:`DIFF_LINES`
    lines; a ``diff-cut`` note says what was left out.
    """
    if mode not in ("split", "unified"):
        raise ValueError(f"diff mode must be 'split' or 'unified', not {mode!r}")
    before, after = str(before), str(after)
    note = ""
    if len(before) > DIFF_CHARS or len(after) > DIFF_CHARS:
        note += (
            f'<p class="diff-cut">The text is long: the diff compares its first {DIFF_CHARS:,} characters '
            f"(before has {len(before):,}, after has {len(after):,}).</p>"
        )
        before, after = before[:DIFF_CHARS], after[:DIFF_CHARS]
    a, b = before.splitlines(), after.splitlines()
    if len(a) > DIFF_LINES or len(b) > DIFF_LINES:
        note += (
            f'<p class="diff-cut">The text is long: the diff compares its first {DIFF_LINES:,} lines '
            f"(before has {len(a):,}, after has {len(b):,}).</p>"
        )
        a, b = a[:DIFF_LINES], b[:DIFF_LINES]
    body = _split(a, b, context_lines) if mode == "split" else _unified(a, b, context_lines)
    return Markup(body + note)


def _split(a: list[str], b: list[str], context_lines: int | None) -> str:
    rows = [
        '<table class="diff diff-split"><thead><tr><th class="diff-lineno"></th><th>Before</th>'
        '<th class="diff-lineno"></th><th>After</th></tr></thead><tbody>'
    ]
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    for n, (tag, i1, i2, j1, j2) in enumerate(ops):
        if tag == "equal":
            rows.extend(_equal_rows(a, i1, i2, j1, n == 0, n == len(ops) - 1, context_lines))
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            i, j = i1 + k, j1 + k
            old = a[i] if i < i2 else None
            new = b[j] if j < j2 else None
            if old is not None and new is not None:
                left, right = _words(old, new)
                rows.append(_row("diff-replace", i + 1, left, j + 1, right))
            elif old is not None:
                rows.append(_row("diff-delete", i + 1, str(escape(old)), None, None))
            else:
                rows.append(_row("diff-insert", None, None, j + 1, str(escape(new or ""))))
    rows.append("</tbody></table>")
    return "".join(rows)


def _equal_rows(
    a: list[str], i1: int, i2: int, j1: int, first: bool, last: bool, context_lines: int | None
) -> list[str]:
    def rows(lo: int, hi: int) -> list[str]:
        return [
            _row("diff-equal", i + 1, str(escape(a[i])), j1 + i - i1 + 1, str(escape(a[i])))
            for i in range(lo, hi)
        ]

    if context_lines is None:
        return rows(i1, i2)
    head = i1 if first else min(i2, i1 + context_lines)
    tail = i2 if last else max(head, i2 - context_lines)
    if tail - head <= 1:  # folding one line saves nothing
        return rows(i1, i2)
    skipped = tail - head
    lines = "line" if skipped == 1 else "lines"
    skip = f'<tr class="diff-skip"><td colspan="4">… {skipped:,} unchanged {lines}</td></tr>'
    return [*rows(i1, head), skip, *rows(tail, i2)]


def _row(kind: str, i: int | None, left: str | None, j: int | None, right: str | None) -> str:
    def cells(number: int | None, text: str | None, side: str) -> str:
        if text is None:
            return f'<td class="diff-lineno"></td><td class="{side} diff-empty"></td>'
        return f'<td class="diff-lineno">{number}</td><td class="{side}">{text}</td>'

    return f'<tr class="{kind}">{cells(i, left, "diff-old")}{cells(j, right, "diff-new")}</tr>'


_TOKEN = re.compile(r"\w+|\s+|[^\w\s]", re.UNICODE)


def _words(old: str, new: str) -> tuple[str, str]:
    """``old`` and ``new`` escaped, with the words that differ marked."""
    if len(old) > _WORD_DIFF_CHARS or len(new) > _WORD_DIFF_CHARS:
        return f'<del class="diff-word">{escape(old)}</del>', f'<ins class="diff-word">{escape(new)}</ins>'
    x, y = _TOKEN.findall(old), _TOKEN.findall(new)
    left: list[str] = []
    right: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, x, y, autojunk=False).get_opcodes():
        gone, came = escape("".join(x[i1:i2])), escape("".join(y[j1:j2]))
        if tag == "equal":
            left.append(gone)
            right.append(came)
            continue
        if gone:
            left.append(f'<del class="diff-word">{gone}</del>')
        if came:
            right.append(f'<ins class="diff-word">{came}</ins>')
    return "".join(left), "".join(right)


def _unified(a: list[str], b: list[str], context_lines: int | None) -> str:
    lines = list(
        difflib.unified_diff(
            a, b, "before", "after", n=3 if context_lines is None else context_lines, lineterm=""
        )
    )
    if not lines:
        return '<p class="diff-same">No changes.</p>'
    out = ['<pre class="diff diff-unified">']
    for n, line in enumerate(lines):
        if n < 2 and line.startswith(("---", "+++")):
            kind = "diff-file"
        elif line.startswith("@@"):
            kind = "diff-hunk"
        elif line.startswith("+"):
            kind = "diff-insert"
        elif line.startswith("-"):
            kind = "diff-delete"
        else:
            kind = "diff-equal"
        out.append(f'<span class="diff-line {kind}">{escape(line)}</span>\n')
    out.append("</pre>")
    return "".join(out)


_PAIRS = (("before", "after"), ("old", "new"))


def context(value: Any, mode: Literal["split", "unified"] | str = "split") -> Markup:
    """An approval's ``context``, shown the way it reads best.

    - a string: Markdown (:func:`markdown`);
    - a mapping with ``before`` and ``after`` (or ``old`` and ``new``): their :func:`diff`
      (in ``mode``; a side that is not a string is compared as indented JSON), in
      ``<div class="context-diff">``, then the mapping's other keys as a :func:`tree` in
      ``<div class="context-rest">``;
    - None: nothing (an empty Markup);
    - anything else: a :func:`tree`.
    """
    if value is None:
        return Markup("")
    if isinstance(value, str):
        return markdown(value)
    if isinstance(value, Mapping):
        for old, new in _PAIRS:
            if old in value and new in value:
                shown = diff(_text(value[old]), _text(value[new]), mode)
                rest = {k: v for k, v in value.items() if k not in (old, new)}
                more = f'<div class="context-rest">{tree(rest)}</div>' if rest else ""
                return Markup(f'<div class="context-diff">{shown}</div>{more}')
    return tree(value)


def _text(value: Any) -> str:
    """A diff side: a string as it is, anything else as indented JSON (keys sorted)."""
    if isinstance(value, str):
        return value
    try:
        plain = pydantic_core.to_jsonable_python(value, fallback=str)
        return json.dumps(plain, indent=2, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        return str(value)
