"""What the review page shows of run data: Markdown, JSON trees and diffs that no agent
output can turn into script, and that stay bounded when a context is megabytes.

Safety is checked by parsing the output with the standard library's HTML parser and
walking every tag and attribute, not by looking for substrings.
"""

from __future__ import annotations

import json
import time
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import jinja2
import pytest
from markupsafe import Markup

from agentflow.review import render
from agentflow.review.render import context, diff, markdown, tree

PAYLOADS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](jav&#x61;script:alert(1))",
    "[x](%6A%61vascript:alert(1))",
    "[x](vbscript:msgbox(1))",
    "[x](file:///etc/passwd)",
    '<a href="javascript:alert(1)">click</a>',
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![x](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+)",
    "![x](javascript:alert(1))",
    "<svg onload=alert(1)><script>alert(1)</script></svg>",
    "<svg><a xlink:href='javascript:alert(1)'><text>x</text></a></svg>",
    "<math><mi xlink:href='javascript:alert(1)'>x</mi></math>",
    "<javascript:alert(1)>",
    "<data:text/html,<script>alert(1)</script>>",
    "[ref][1]\n\n[1]: javascript:alert(1)",
    '[x](https://ok.example "t\\" onmouseover=\\"alert(1)")',
    "<iframe src=https://evil.example></iframe><object data=x></object><embed src=x>",
    "<style>body{display:none}</style><link rel=stylesheet href=https://evil.example/x.css>",
    "<form action=https://evil.example><button formaction=x>go</button></form>",
    '<details open ontoggle="alert(1)">x</details>',
    '<p style="background:url(javascript:alert(1))">x</p>',
    "`<script>alert(1)</script>`\n\n```html\n<script>alert(1)</script>\n```",
    "<meta http-equiv=refresh content='0;url=javascript:alert(1)'><base href=javascript:/>",
    "<!-- <script>alert(1)</script> -->",
    "</div><script>alert(1)</script>",
]

#: What rendered Markdown may contain (nothing else).
MARKDOWN_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "del", "div", "em", "h1", "h2", "h3", "h4",
    "h5", "h6", "hr", "i", "kbd", "li", "ol", "p", "pre", "s", "strong", "sub", "sup",
    "table", "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip
MARKDOWN_ATTRIBUTES = {"href", "title", "rel", "start", "class"}
#: What trees and diffs may contain.
STRUCTURE_TAGS = {
    "del", "details", "div", "ins", "li", "p", "pre", "span", "summary", "table", "tbody",
    "td", "th", "thead", "tr", "ul",
}  # fmt: skip
STRUCTURE_ATTRIBUTES = {"class", "open", "colspan"}


class Page(HTMLParser):
    """Every tag, attribute and text of an HTML fragment, as a browser's parser sees them."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.texts: list[str] = []
        self.comments: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def assert_inert(html: str, tags: set[str], attributes: set[str]) -> Page:
    """``html`` holds only ``tags`` and ``attributes``, no handler, style or non-http(s) URL."""
    page = Page(html)
    assert not page.comments
    for tag, attrs in page.tags:
        assert tag in tags, f"tag <{tag}> in {html!r}"
        for name, value in attrs.items():
            assert name in attributes, f"attribute {name}= on <{tag}> in {html!r}"
            assert not name.startswith("on") and name not in ("style", "src", "srcdoc", "action")
            if name == "href":
                assert value is not None
                parts = urlsplit(value)
                assert parts.scheme in ("http", "https", "mailto"), value
                assert parts.scheme == "mailto" or parts.netloc, value
            if name == "class":
                assert value and "javascript" not in value.lower()
        if tag == "a":
            assert attrs.get("rel") == "noopener noreferrer"
    return page


@pytest.mark.parametrize("payload", PAYLOADS)
def test_markdown_never_carries_executable_markup(payload: str) -> None:
    html = markdown(payload)
    assert isinstance(html, Markup)
    assert_inert(str(html), MARKDOWN_TAGS, MARKDOWN_ATTRIBUTES)


def test_raw_html_in_markdown_is_shown_as_text() -> None:
    page = assert_inert(
        str(markdown("Hello <script>alert(1)</script> and <img src=x onerror=alert(1)>")),
        MARKDOWN_TAGS,
        MARKDOWN_ATTRIBUTES,
    )
    assert "<script>alert(1)</script>" in page.text
    assert "<img src=x onerror=alert(1)>" in page.text


def test_markdown_keeps_what_a_reviewer_reads() -> None:
    text = (
        "# Release 1.2\n\n*new* **bold** ~~gone~~ `code`\n\n- one\n- two\n\n3. three\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n> quoted\n\n"
        "[docs](https://docs.example/x?a=1&b=2) <https://auto.example/y> <ops@example.com> "
        "[relative](/runs/1) [anchor](#top)\n\n```\nprint(1)\n```\n"
    )
    page = assert_inert(str(markdown(text)), MARKDOWN_TAGS, MARKDOWN_ATTRIBUTES)
    tags = [t for t, _ in page.tags]
    for tag in ("h1", "em", "strong", "s", "code", "ul", "ol", "table", "td", "blockquote", "pre"):
        assert tag in tags
    hrefs = [a.get("href") for t, a in page.tags if t == "a"]
    assert "https://docs.example/x?a=1&b=2" in hrefs
    assert "https://auto.example/y" in hrefs
    assert "mailto:ops@example.com" in hrefs
    # links that lead into the review page itself (or nowhere) lose their target but keep their text
    assert [h for h in hrefs if h is None] and "relative" in page.text and "anchor" in page.text
    assert [a for t, a in page.tags if t == "ol"] == [{"start": "3"}]


def test_markdown_images_show_as_links_not_images() -> None:
    page = assert_inert(
        str(markdown("![diagram](https://img.example/d.png)")), MARKDOWN_TAGS, MARKDOWN_ATTRIBUTES
    )
    assert ("a", {"href": "https://img.example/d.png", "rel": "noopener noreferrer"}) in page.tags
    assert "diagram" in page.text


HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(1)>"


@pytest.mark.parametrize(
    "value",
    [
        {HOSTILE: HOSTILE, "link": "javascript:alert(1)", "nested": {HOSTILE: [HOSTILE, {HOSTILE: None}]}},
        [HOSTILE, 1, 2.5, True, None, {"</details></summary><script>x</script>": "</li>"}],
        HOSTILE,
        {"before": HOSTILE, "after": HOSTILE + "!", HOSTILE: HOSTILE},
        {"old": {HOSTILE: 1}, "new": {HOSTILE: 2}},
        {"svg": "<svg onload=alert(1)>", "data": "data:text/html,<script>alert(1)</script>"},
    ],
)
def test_trees_diffs_and_contexts_escape_keys_and_values(value: Any) -> None:
    for html in (tree(value), context(value), context(value, mode="unified")):
        tags = STRUCTURE_TAGS | MARKDOWN_TAGS
        page = assert_inert(str(html), tags, STRUCTURE_ATTRIBUTES | MARKDOWN_ATTRIBUTES)
        assert all(tag not in ("script", "img", "svg") for tag, _ in page.tags)
    page = assert_inert(str(tree(value)), STRUCTURE_TAGS, STRUCTURE_ATTRIBUTES)
    assert HOSTILE in page.text or "<svg onload=alert(1)>" in page.text


def test_tree_shows_types_by_class_and_keeps_long_strings_whole() -> None:
    long = "word " * 4_000
    page = Page(str(tree({"name": "x", "count": 3, "ratio": 0.5, "ok": False, "none": None, "long": long})))
    leaves = {t: a["class"] for t, a in page.tags if "tree-leaf" in (a.get("class") or "")}
    assert leaves  # the leaves are classed spans
    classes = [a.get("class") for _, a in page.tags]
    for kind in ("tree-string", "tree-number", "tree-boolean", "tree-null"):
        assert any(kind in (c or "") for c in classes), kind
    assert long in page.text
    assert ("details", {"class": "tree-node tree-object", "open": None}) in page.tags
    assert not any("tree-cut" in (c or "") for c in classes)


def test_tree_of_values_that_are_not_json() -> None:
    import datetime
    import decimal

    from pydantic import BaseModel

    class Draft(BaseModel):
        title: str
        at: datetime.date

    page = Page(
        str(tree({"draft": Draft(title="T", at=datetime.date(2026, 1, 2)), "cost": decimal.Decimal("1.5")}))
    )
    assert "2026-01-02" in page.text and "T" in page.text and "1.5" in page.text


def test_a_five_megabyte_context_renders_bounded_and_says_what_was_cut() -> None:
    big = {"records": [{"id": i, "body": "x" * 50, "tags": ["a", "b"]} for i in range(60_000)]}
    assert len(json.dumps(big)) > 5_000_000
    started = time.perf_counter()
    html = str(context(big))
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, elapsed
    assert len(html) < 2_000_000
    page = Page(html)
    cut = [t for t in page.texts if "not shown" in t]
    assert cut and any(f"{60_000 - 1_000:,}" in t or "more items not shown" in t for t in cut)
    assert "This value is large" in page.text


def test_a_five_megabyte_markdown_text_is_cut_at_a_line_and_says_so() -> None:
    text = "## Part\n\nSome *text* with [a link](https://x.example) and `code`.\n\n- one\n- two\n\n" * 70_000
    assert len(text) > 5_000_000
    started = time.perf_counter()
    html = str(markdown(text))
    assert time.perf_counter() - started < 5.0  # about half a second alone; the machine is shared
    page = assert_inert(html, MARKDOWN_TAGS, MARKDOWN_ATTRIBUTES | {"class"})
    assert len(html) < 4 * render.MARKDOWN_CHARS
    kept = text.rfind("\n", 0, render.MARKDOWN_CHARS) + 1
    assert f"{len(text) - kept:,} more characters (of {len(text):,}) are not shown" in page.text
    assert str(markdown("short")) == '<div class="markdown"><p>short</p>\n</div>'


def test_one_huge_string_is_cut_with_a_note() -> None:
    html = str(tree({"log": "y" * 3_000_000}))
    assert len(html) < render.TREE_CHARS + 10_000
    kept = render.TREE_CHARS - len("log")  # keys count too
    assert f"{3_000_000 - kept:,} more characters not shown" in Page(html).text


def test_huge_keys_and_numbers_are_bounded_too() -> None:
    html = str(tree({"big": 10**5000, "k" * 3_000_000: 1}))
    assert len(html) < render.TREE_CHARS + 10_000
    page = Page(html)
    assert f"{3_000_000 - render.TREE_CHARS + len('big'):,} more characters not shown" in page.text
    assert "(a number of about 5,000 digits)" in page.text


def test_deep_nesting_is_cut_at_the_depth_limit() -> None:
    value: Any = "bottom"
    for _ in range(200):
        value = {"down": value}
    page = Page(str(tree(value)))
    assert f"nested deeper than {render.TREE_DEPTH} levels" in page.text
    assert "bottom" not in page.text
    assert sum(1 for t, _ in page.tags if t == "details") == render.TREE_DEPTH


def test_split_diff_pairs_lines_and_marks_changed_words() -> None:
    page = Page(str(diff("one two three\nsame\ngone", "one 2 three\nsame\nadded\nmore")))
    rows = [a["class"] for t, a in page.tags if t == "tr" and a.get("class")]
    assert rows == ["diff-replace", "diff-equal", "diff-replace", "diff-insert"]
    html = str(diff("one two three", "one 2 three"))
    assert '<del class="diff-word">two</del>' in html and '<ins class="diff-word">2</ins>' in html


def test_split_diff_folds_long_unchanged_runs_when_asked() -> None:
    before = "\n".join(f"line {i}" for i in range(100))
    after = before.replace("line 50", "line fifty")
    page = Page(str(diff(before, after, context_lines=3)))
    assert "… 47 unchanged lines" in page.text and "… 46 unchanged lines" in page.text
    assert (
        len([t for t, _ in page.tags if t == "tr"]) == 1 + 1 + 3 + 1 + 3 + 1
    )  # head, skip, 3, changed, 3, skip
    assert "line 10" in Page(str(diff(before, after))).text  # unfolded by default


def test_unified_diff_classes_each_line() -> None:
    page = Page(str(diff("a\nb\nc", "a\nB\nc", mode="unified")))
    lines = [a["class"] for t, a in page.tags if t == "span"]
    assert lines == [
        "diff-line diff-file",
        "diff-line diff-file",
        "diff-line diff-hunk",
        "diff-line diff-equal",
        "diff-line diff-delete",
        "diff-line diff-insert",
        "diff-line diff-equal",
    ]
    assert "No changes." in Page(str(diff("same", "same", mode="unified"))).text
    with pytest.raises(ValueError, match="split"):
        diff("a", "b", mode="sideways")


def test_a_long_diff_compares_the_first_lines_and_says_so() -> None:
    before = "\n".join(str(i) for i in range(render.DIFF_LINES + 500))
    started = time.perf_counter()
    html = str(diff(before, before + "\nnew", mode="split"))
    assert time.perf_counter() - started < 2.0
    assert f"compares its first {render.DIFF_LINES:,} lines" in Page(html).text


def test_a_diff_of_megabyte_lines_is_cut_and_says_so() -> None:
    html = str(context({"before": "a" * 3_000_000, "after": "b" * 3_000_000}))
    assert len(html) < 3 * render.DIFF_CHARS
    assert f"compares its first {render.DIFF_CHARS:,} characters" in Page(html).text


def test_context_picks_markdown_diff_or_tree() -> None:
    assert str(context("**hi**")).startswith('<div class="markdown"><p><strong>hi</strong>')
    assert context(None) == Markup("")
    both = Page(str(context({"before": "v1 text", "after": "v2 text", "reason": "typo"})))
    assert ("table", {"class": "diff diff-split"}) in both.tags
    assert ("div", {"class": "context-rest"}) in both.tags and "typo" in both.text
    old_new = str(context({"old": {"a": 1, "b": [1, 2]}, "new": {"a": 1, "b": [1, 3]}}, mode="unified"))
    assert '<span class="diff-line diff-delete">-    2</span>' in old_new
    assert '<span class="diff-line diff-insert">+    3</span>' in old_new
    assert "context-rest" not in old_new  # nothing else to show
    only_before = Page(str(context({"before": "x"})))
    assert ("div", {"class": "tree"}) in only_before.tags
    assert ("div", {"class": "tree"}) in Page(str(context([1, 2]))).tags


def test_rendered_markup_goes_into_an_autoescaping_template_unescaped_once() -> None:
    env = jinja2.Environment(autoescape=True)
    template = env.from_string("<section>{{ body }}</section><p>{{ raw }}</p>")
    html = template.render(body=markdown("**b** <script>x</script>"), raw="<script>x</script>")
    page = Page(html)
    assert [t for t, _ in page.tags] == ["section", "div", "p", "strong", "p"]
    assert page.text.count("<script>x</script>") == 2
