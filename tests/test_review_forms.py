"""Edit forms of the review page: built from an approval's JSON schema, rendered by the
``_fields.html`` macros, posted back as a browser posts a form, parsed and validated.

The round trip is the real one: ``fields(schema, value)`` → the Jinja2 template (autoescape
on) → the successful controls a browser would submit (read from the HTML with the standard
library's parser, with the browser's rules for checkboxes, selects and textareas) →
``parse`` gives the value back.
"""

from __future__ import annotations

import datetime
import enum
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import jinja2
import pydantic
import pytest
from helpers import wait_status
from playwright.async_api import Route, async_playwright
from pydantic import BaseModel, Field
from starlette.datastructures import FormData

from agentflow import (
    END,
    START,
    HumanApproval,
    InvalidInputError,
    Next,
    RunStatus,
    Wait,
    Workflow,
    WorkflowRunner,
)
from agentflow.definition.tools import ToolContext, tool
from agentflow.review import forms
from agentflow.review.forms import errors_from_pydantic, fields, parse
from agentflow.stores import MemoryStore

TEMPLATES = Path(forms.__file__).parent / "templates"


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Level(enum.IntEnum):
    ONE = 1
    TWO = 2


class Address(BaseModel):
    city: str = Field(min_length=1)
    zip: str | None = None


class Item(BaseModel):
    name: str = Field(min_length=1, title="Item name")
    qty: int = Field(default=1, ge=1)
    urgent: bool = False


class Release(BaseModel):
    """What an editor reviews before a release goes out."""

    title: str = Field(min_length=1, description="Shown as the page title")
    body: str = Field(max_length=5_000)
    summary: str = Field(default="", json_schema_extra={"format": "textarea"})
    priority: Priority = Priority.LOW
    level: Level | None = None
    channel: Literal["blog", "mail"] = "blog"
    kind: Literal["release"] = "release"
    publish: bool = False
    featured: bool | None = None
    count: int = Field(default=1, ge=0, le=10)
    ratio: float | None = None
    on: datetime.date | None = None
    contact: str | None = Field(default=None, json_schema_extra={"format": "email"})
    tags: list[str] = []
    scores: list[int] = []
    items: list[Item] = []
    home: Address
    work: Address | None = None
    meta: dict[str, int] = {}
    either: int | str = 0


FULL = Release(
    title='Release 2.0 <script>alert("x")</script> & "quotes"',
    body="\nFirst line\n\n  indented\r\nlast line with trailing space ",
    summary="short\nsummary",
    priority=Priority.HIGH,
    level=Level.TWO,
    channel="mail",
    publish=True,
    featured=False,
    count=0,
    ratio=0.25,
    on=datetime.date(2026, 12, 1),
    contact="ed@example.com",
    tags=["a", "<b>", "ünï"],
    scores=[3, -1],
    items=[Item(name="one", qty=2, urgent=True), Item(name="two")],
    home=Address(city="Oslo", zip="0150"),
    work=Address(city="Bergen"),
    meta={"views": 3},
    either="text",
)
SPARSE = Release(title="T", body="", home=Address(city="X"), featured=True, ratio=3.0)


class Post(HTMLParser):
    """The name/value pairs a browser submits for the form controls in an HTML fragment.

    The browser's rules: a checkbox counts only when checked (value "on" by default); a
    select submits its selected option (else its first); a textarea drops one newline
    right after its start tag and submits line breaks as CRLF; a text input's value has
    its line breaks stripped.
    """

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.pairs: list[tuple[str, str]] = []
        self.controls: list[tuple[str, dict[str, str | None]]] = []
        self._select: tuple[str, list[tuple[str, bool]]] | None = None
        self._option: dict[str, str | None] | None = None
        self._option_text = ""
        self._textarea: tuple[str, list[str]] | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("input", "select", "textarea"):
            self.controls.append((tag, a))
        name = a.get("name")
        if tag == "input" and name is not None and "disabled" not in a:
            kind = (a.get("type") or "text").lower()
            if kind == "checkbox":
                if "checked" in a:
                    self.pairs.append((name, a.get("value") or "on"))
            elif kind in ("text", "hidden"):
                self.pairs.append((name, (a.get("value") or "").replace("\r", "").replace("\n", "")))
        elif tag == "select" and name is not None:
            self._select = (name, [])
        elif tag == "option" and self._select is not None:
            self._option, self._option_text = a, ""
        elif tag == "textarea" and name is not None:
            self._textarea = (name, [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "option" and self._select is not None and self._option is not None:
            value = self._option.get("value")
            self._select[1].append(
                (self._option_text if value is None else value, "selected" in self._option)
            )
            self._option = None
        elif tag == "select" and self._select is not None:
            name, options = self._select
            chosen = [v for v, selected in options if selected] or [v for v, _ in options[:1]]
            self.pairs.extend((name, v) for v in chosen[-1:])
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            name, parts = self._textarea
            text = "".join(parts)
            text = text[1:] if text.startswith("\n") else text
            self.pairs.append((name, text.replace("\r\n", "\n").replace("\n", "\r\n")))
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._option is not None:
            self._option_text += data
        if self._textarea is not None:
            self._textarea[1].append(data)


class Tags(HTMLParser):
    """Every tag and its attributes, and the ``.field-error`` messages by ``data-field``."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.errors: dict[str, str] = {}
        self._error: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "p" and a.get("class") == "field-error":
            self._error = a.get("data-field") or ""
            self.errors[self._error] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "p":
            self._error = None

    def handle_data(self, data: str) -> None:
        if self._error is not None:
            self.errors[self._error] += data


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
)
PAGE = ENV.from_string(
    '{% from "_fields.html" import field, error with context %}'
    "{{ error('') }}{% for f in fields %}{{ field(f) }}{% endfor %}"
)


def render(flds: list[forms.Field], errors: dict[str, str] | None = None, **more: Any) -> str:
    return PAGE.render(fields=flds, errors=errors or {}, **more)


def browser_post(schema: dict[str, Any], value: Any) -> list[tuple[str, str]]:
    return Post(render(fields(schema, value))).pairs


def replaced(pairs: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    assert any(n == name for n, _ in pairs), name
    return [(n, value if n == name else v) for n, v in pairs]


SCHEMA = Release.model_json_schema()


@pytest.mark.parametrize("value", [FULL, SPARSE], ids=["full", "sparse"])
def test_a_model_round_trips_through_the_rendered_form(value: Release) -> None:
    data, errors = parse(SCHEMA, browser_post(SCHEMA, value))
    assert errors == {}
    expected = value.model_dump(mode="json")
    expected["body"] = expected["body"].replace(
        "\r\n", "\n"
    )  # a browser posts a textarea's line breaks as CRLF
    assert data == expected
    assert Release.model_validate(data) == value.model_copy(update={"body": expected["body"]})


def test_the_fields_describe_the_schema() -> None:
    by_path = {f.path: f for f in fields(SCHEMA, FULL)}
    kinds = {path: f.kind for path, f in by_path.items()}
    assert kinds == {
        "title": "string", "body": "text", "summary": "text", "priority": "enum", "level": "enum",
        "channel": "enum", "kind": "enum", "publish": "boolean", "featured": "enum", "count": "integer",
        "ratio": "number", "on": "string", "contact": "string", "tags": "list", "scores": "list",
        "items": "list", "home": "object", "work": "object", "meta": "json", "either": "json",
    }  # fmt: skip
    title = by_path["title"]
    assert (title.name, title.label, title.required, title.description) == (
        "data.title",
        "Title",
        True,
        "Shown as the page title",
    )
    assert by_path["level"].choices == [1, 2] and by_path["level"].nullable
    assert [o.label for o in by_path["featured"].options] == ["—", "yes", "no"]
    assert by_path["kind"].choices == ["release"]
    assert not by_path["work"].required and by_path["home"].required
    items = by_path["items"]
    assert [c.path for c in items.children] == ["items[0]", "items[1]", "items[2]"]
    assert items.children[-1].extra and not items.children[0].extra
    assert [c.path for c in items.children[0].children] == [
        "items[0].name",
        "items[0].qty",
        "items[0].urgent",
    ]
    assert items.children[0].children[0].label == "Item name"
    assert by_path["tags"].children[-1].text == ""
    defaults = {f.path: f.value for f in fields(SCHEMA)}
    assert defaults["priority"] == "low" and defaults["count"] == 1 and defaults["title"] is None


def test_a_reviewer_edits_and_the_data_follows() -> None:
    pairs = browser_post(SCHEMA, FULL)
    pairs = replaced(pairs, "data.title", "New title")
    pairs = replaced(pairs, "data.priority", "low")
    pairs = [(n, v) for n, v in pairs if not (n == "data.publish" and v == "on")]  # untick
    pairs = replaced(pairs, "data.featured", "")  # back to "not said"
    pairs = replaced(pairs, "data.tags[1]", "")  # an emptied item is removed
    pairs = replaced(pairs, "data.tags[3]", "added")  # the empty entry adds one
    pairs = replaced(pairs, "data.items[2].name", "three")
    pairs = replaced(pairs, "data.work.city", "")
    pairs = replaced(pairs, "data.work.zip", "5003")
    pairs = replaced(pairs, "data.meta", '{"views": 4, "likes": 1}')
    pairs = replaced(pairs, "data.ratio", " 1e3 ")
    data, errors = parse(SCHEMA, pairs)
    assert errors == {"work.city": "Must not be empty."}
    pairs = replaced(pairs, "data.work.zip", "")  # the whole optional address emptied: None
    data, errors = parse(SCHEMA, pairs)
    assert errors == {}
    assert data["title"] == "New title" and data["priority"] == "low"
    assert data["publish"] is False and data["featured"] is None
    assert data["tags"] == ["a", "ünï", "added"]
    assert data["items"][2] == {"name": "three", "urgent": False}  # qty left to its default
    assert data["work"] is None and data["meta"] == {"views": 4, "likes": 1} and data["ratio"] == 1000.0
    assert Release.model_validate(data).items[2] == Item(name="three", qty=1)


def test_ticking_remove_drops_an_item() -> None:
    pairs = browser_post(SCHEMA, FULL)
    assert ("remove", "items[0]") not in pairs  # unticked: not posted
    data, errors = parse(SCHEMA, [*pairs, ("remove", "items[0]"), ("remove", "tags[2]")])
    assert errors == {}
    assert data["items"] == [{"name": "two", "qty": 1, "urgent": False}] and data["tags"] == ["a", "<b>"]
    # errors in the items after a removed one are told at the inputs the reviewer sees
    pairs = replaced(pairs, "data.items[1].qty", "0")
    assert parse(SCHEMA, [*pairs, ("remove", "items[0]")])[1] == {"items[1].qty": "Must be at least 1."}


def test_removing_every_item_gives_an_empty_list() -> None:
    pairs = browser_post(SCHEMA, FULL)
    pairs = [(n, v) for n, v in pairs if not n.startswith("data.tags[")]
    data, errors = parse(SCHEMA, pairs)
    assert errors == {} and data["tags"] == []


@pytest.mark.parametrize(
    ("name", "value", "path", "message"),
    [
        ("data.count", "abc", "count", "Enter a whole number."),
        ("data.count", "11", "count", "Must be at most 10."),
        ("data.count", "-1", "count", "Must be at least 0."),
        ("data.ratio", "lots", "ratio", "Enter a number."),
        ("data.ratio", "nan", "ratio", "Enter a number."),
        ("data.title", "", "title", "Must not be empty."),
        ("data.priority", "urgent", "priority", "Choose one of the options."),
        ("data.level", "3", "level", "Choose one of the options."),
        ("data.on", "2026-13-01", "on", "Enter a date as YYYY-MM-DD."),
        ("data.contact", "not an address", "contact", "Enter an email address."),
        ("data.scores[0]", "1.5", "scores[0]", "Enter a whole number."),
        ("data.items[1].qty", "0", "items[1].qty", "Must be at least 1."),
        ("data.items[1].name", "", "items[1].name", "Must not be empty."),
        ("data.home.city", "", "home.city", "Must not be empty."),
        ("data.meta", '{"views": "many"}', "meta", "Enter a whole number."),
        (
            "data.meta",
            "{views: 3",
            "meta",
            "Not valid JSON: Expecting property name enclosed in double quotes",
        ),
        ("data.either", "[1]", "either", "Enter a whole number."),
        ("data.body", "x" * 5_001, "body", "Must be at most 5000 characters long (it has 5001)."),
    ],
)
def test_invalid_input_is_reported_at_its_field(name: str, value: str, path: str, message: str) -> None:
    _, errors = parse(SCHEMA, replaced(browser_post(SCHEMA, FULL), name, value))
    assert list(errors) == [path]
    assert errors[path].startswith(message)


def test_an_item_added_half_filled_is_reported_at_the_missing_field() -> None:
    pairs = replaced(browser_post(SCHEMA, FULL), "data.items[2].qty", "4")
    _, errors = parse(SCHEMA, pairs)
    assert errors == {"items[2].name": "Must not be empty."}


def test_a_required_field_left_off_the_form_is_required() -> None:
    pairs = [(n, v) for n, v in browser_post(SCHEMA, FULL) if not n.startswith("data.home")]
    assert parse(SCHEMA, pairs)[1] == {"home": "This field is required."}
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert parse(flag, [])[1] == {"ok": "This field is required."}
    assert parse(flag, [("data.ok", "off")]) == ({"ok": False}, {})
    assert parse(flag, [("data.ok", "off"), ("data.ok", "on")]) == ({"ok": True}, {})


def test_errors_show_next_to_their_fields_with_what_the_reviewer_typed() -> None:
    pairs = replaced(browser_post(SCHEMA, FULL), "data.count", "twelve")
    pairs = replaced(pairs, "data.items[0].qty", "0")
    data, errors = parse(SCHEMA, pairs)
    page = Tags(render(fields(SCHEMA, data), errors))
    assert page.errors == {"count": "Enter a whole number.", "items[0].qty": "Must be at least 1."}
    inputs = {a["name"]: a for t, a in page.tags if t == "input" and a.get("type") == "text"}
    assert inputs["data.count"]["value"] == "twelve"
    assert inputs["data.count"]["aria-invalid"] == "true"
    assert inputs["data.items[0].qty"]["value"] == "0"
    # fixed, it posts cleanly
    fixed = replaced(
        replaced(Post(render(fields(SCHEMA, data), errors)).pairs, "data.count", "7"),
        "data.items[0].qty",
        "2",
    )
    assert parse(SCHEMA, fixed)[1] == {}


def test_submitted_values_from_the_page_context_are_shown() -> None:
    submitted = {"data.count": "nine?", "data.publish": "off", "data.priority": "low"}
    page = Tags(render(fields(SCHEMA, FULL), {"count": "Enter a whole number."}, submitted=submitted))
    inputs = {(a["name"], a.get("type")): a for t, a in page.tags if t == "input"}
    assert inputs[("data.count", "text")]["value"] == "nine?"
    assert "checked" not in inputs[("data.publish", "checkbox")]
    assert Post(render(fields(SCHEMA, FULL), submitted=submitted)).pairs.count(("data.priority", "low")) == 1


def test_hostile_values_are_escaped_and_the_form_has_no_script() -> None:
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(1)>'
    value = Release(title=hostile, body=hostile + "</textarea><script>alert(2)</script>", tags=[hostile],
                    home=Address(city=hostile))  # fmt: skip
    html = render(fields(SCHEMA, value), {"title": hostile})
    page = Tags(html)
    allowed = {"div", "fieldset", "legend", "label", "input", "select", "option", "textarea", "p", "span"}
    assert {t for t, _ in page.tags} <= allowed
    for _, attrs in page.tags:
        assert not any(k.startswith("on") or k in ("style", "src") for k in attrs)
    assert page.errors["title"] == hostile
    data, errors = parse(SCHEMA, Post(html).pairs)
    assert errors == {} and data["title"] == hostile and data["home"]["city"] == hostile
    assert data["body"] == value.body and data["tags"] == [hostile]


def test_no_control_carries_a_browser_side_constraint() -> None:
    controls = Post(render(fields(SCHEMA, FULL))).controls
    for _, attrs in controls:
        assert not {"required", "min", "max", "pattern", "maxlength", "minlength"} & set(attrs)
        assert attrs.get("type") in (None, "text", "hidden", "checkbox")
    ids = [a["id"] for _, a in controls if a.get("id")]
    assert len(ids) == len(set(ids))


def test_parse_takes_starlette_form_data_and_mappings() -> None:
    pairs = browser_post(SCHEMA, FULL)
    expected = parse(SCHEMA, pairs)
    assert parse(SCHEMA, FormData(pairs)) == expected
    as_lists: dict[str, list[str]] = {}
    for n, v in pairs:
        as_lists.setdefault(n, []).append(v)
    assert parse(SCHEMA, {**as_lists, "csrf": ["t"], "comment": ["ok"]}) == expected
    assert parse(SCHEMA, [*pairs, ("data.unknown", "x"), ("data.items[0].evil", "1")]) == expected


class Node(BaseModel):
    label: str
    children: list[Node] = []


def test_what_cannot_be_fields_is_a_json_textarea() -> None:
    tree = Node.model_json_schema()
    kinds = {f.path: f.kind for f in fields(tree)}
    assert kinds == {"label": "string", "children": "json"}
    value = Node(label="root", children=[Node(label="leaf")])
    data, errors = parse(tree, browser_post(tree, value))
    assert errors == {} and Node.model_validate(data) == value
    odd = {
        "type": "object",
        "properties": {
            "box": {"type": "object", "properties": {"x.y": {"type": "string"}}},
            "flags": {"type": "array", "items": {"type": "boolean"}},
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
            "anything": {},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        },
    }
    assert {f.path: f.kind for f in fields(odd)} == {"box": "json", "flags": "json", "pair": "json",
                                                     "anything": "json", "grid": "json"}  # fmt: skip
    value2 = {
        "box": {"x.y": "z"},
        "flags": [True, False],
        "pair": ["x", 1],
        "anything": None,
        "grid": [[1, 2], []],
    }
    assert fields({"type": "object", "properties": {"a.b": {"type": "string"}}})[0].kind == "json"
    assert parse(odd, browser_post(odd, value2)) == (value2, {})


def test_a_schema_that_is_not_an_object_is_one_field_named_data() -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "title": "Scores", "minItems": 1}
    (only,) = fields(schema, [1, 2])
    assert (only.path, only.name, only.kind, only.label) == ("", "data", "list", "Scores")
    assert parse(schema, browser_post(schema, [1, 2])) == ([1, 2], {})
    assert parse(schema, [("data", "")])[1] == {"": "Needs at least 1 item."}


@tool
async def deploy(
    ctx: ToolContext,
    version: str,
    env: Literal["prod", "staging"] = "staging",
    force: bool = False,
    replicas: int = 2,
    regions: list[str] | None = None,
    notify: Address | None = None,
) -> str:
    """Deploy a version.

    Args:
        version: the version to deploy, as 1.2.3.
    """
    return version


def test_a_tool_call_s_arguments_round_trip_and_validate_as_the_tool_does() -> None:
    schema = deploy.spec()["parameters"]
    arguments = {"version": "1.2.3", "env": "prod", "force": True, "replicas": 3, "regions": ["eu", "us"],
                 "notify": {"city": "Oslo", "zip": None}}  # fmt: skip
    by_path = {f.path: f for f in fields(schema, arguments)}
    assert "ctx" not in by_path and by_path["version"].description == "the version to deploy, as 1.2.3."
    data, errors = parse(schema, browser_post(schema, arguments))
    assert errors == {} and data == arguments
    assert deploy.validate(data).model_dump() == arguments
    sparse = {"version": "2.0"}
    data, errors = parse(schema, browser_post(schema, sparse))
    assert errors == {} and deploy.validate(data).model_dump() == deploy.validate(sparse).model_dump()
    bad = replaced(browser_post(schema, arguments), "data.replicas", "many")
    assert parse(schema, bad)[1] == {"replicas": "Enter a whole number."}
    with pytest.raises(InvalidInputError) as err:
        deploy.validate({**arguments, "replicas": "many", "notify": {"zip": "1"}})
    assert errors_from_pydantic(err.value, schema) == {
        "replicas": "Input should be a valid integer, unable to parse string as an integer.",
        "notify.city": "This field is required.",
    }


def test_pydantic_errors_map_to_the_form_s_paths() -> None:
    bad = {**FULL.model_dump(mode="json"), "items": [{"name": "", "qty": 0}], "either": [1], "home": {}}
    with pytest.raises(pydantic.ValidationError) as err:
        Release.model_validate(bad)
    errors = errors_from_pydantic(err.value, SCHEMA)
    assert errors == {
        "items[0].name": "String should have at least 1 character.",
        "items[0].qty": "Input should be greater than or equal to 1.",
        "home.city": "This field is required.",
        "either": "Input should be a valid integer.",  # the union member's name is not a field
    }
    without_schema = set(errors_from_pydantic(err.value))
    assert without_schema == {"items[0].name", "items[0].qty", "home.city", "either.int", "either.str"}
    assert errors_from_pydantic(InvalidInputError("not JSON-able")) == {"": "not JSON-able"}


def release_flow(seen: list[Any]) -> Workflow:
    def ask(ctx: Any) -> Wait:
        return Wait(HumanApproval(approvers=["ed"], prompt="Publish?", form=Release), "Done")

    def done(ctx: Any) -> Next:
        seen.append(ctx.decision.data)
        return Next(END, output=ctx.decision.data.title)

    return Workflow("Releases").flow({START: ask, "Done": done})


async def test_a_gate_s_form_from_its_stored_schema_to_the_next_step() -> None:
    seen: list[Any] = []
    async with WorkflowRunner(release_flow(seen), store=MemoryStore()) as runner:
        handle = await runner.run()
        info = await wait_status(handle, RunStatus.WAITING)
        approval = info.pending
        assert approval is not None and approval.form is not None
        pairs = browser_post(approval.form, FULL)
        # the schema checks what it can; the model checks the rest (a validator, say)
        data, errors = parse(approval.form, replaced(pairs, "data.home.city", ""))
        assert errors == {"home.city": "Must not be empty."}
        with pytest.raises(InvalidInputError) as err:
            await runner.approve(handle.run_id, by="ed", approval=approval.id, data=data)
        assert errors_from_pydantic(err.value, approval.form) == {
            "home.city": "String should have at least 1 character."
        }
        data, errors = parse(approval.form, replaced(pairs, "data.title", "Shipped"))
        assert errors == {}
        result = await (
            await runner.approve(handle.run_id, by="ed", approval=approval.id, data=data)
        ).result()
    assert result.output == "Shipped"
    assert seen[0] == FULL.model_copy(update={"title": "Shipped", "body": FULL.body.replace("\r\n", "\n")})


@pytest.mark.parametrize("value", [FULL, SPARSE, {"title": "only"}], ids=["full", "sparse", "partial"])
def test_unchanged_is_what_the_form_posts_when_nothing_is_edited(value: Any) -> None:
    assert forms.unchanged(SCHEMA, value) == parse(SCHEMA, browser_post(SCHEMA, value))[0]

    def lf(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(n, v.replace("\r\n", "\n")) for n, v in pairs]

    assert lf(forms.posted(fields(SCHEMA, value))) == lf(browser_post(SCHEMA, value))


def test_unchanged_tells_an_edit_of_a_tool_call_from_none() -> None:
    schema = deploy.spec()["parameters"]
    as_made = {"version": "2.0"}  # the model left the defaults out
    shown = browser_post(schema, as_made)
    assert parse(schema, shown)[0] != as_made
    assert parse(schema, shown)[0] == forms.unchanged(schema, as_made)
    assert parse(schema, replaced(shown, "data.version", "2.1"))[0] != forms.unchanged(schema, as_made)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]


@pytest.mark.browser
async def test_chromium_posts_what_the_simulated_browser_posts() -> None:
    """The round trip above reads the form as a browser would; here Chromium submits it."""
    html = (
        '<!doctype html><meta charset="utf-8"><form method="post" action="/submit">'
        + render(fields(SCHEMA, FULL))
        + '<button id="go" type="submit">go</button></form>'
    )
    posts: list[list[tuple[str, str]]] = []

    async def serve(route: Route) -> None:
        if route.request.method == "POST":
            posts.append(parse_qsl(route.request.post_data or "", keep_blank_values=True))
            await route.fulfill(status=200, content_type="text/html", body="<p>posted</p>")
        else:
            await route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.route("http://forms.test/**", serve)
            for edit in (False, True):
                await page.goto("http://forms.test/form")
                if edit:
                    await page.fill("[name='data.count']", "abc")
                    await page.uncheck("input[type=checkbox][name='data.publish']")
                    await page.select_option("[name='data.priority']", "low")
                    await page.fill("[name='data.tags[3]']", "new tag")
                    await page.fill("[name='data.items[2].name']", "three")
                    await page.check("input[name=remove][value='items[0]']")
                await page.click("#go")
                await page.wait_for_selector("text=posted")
        finally:
            await browser.close()
    as_shown, changed = posts
    assert as_shown == Post(html).pairs
    assert parse(SCHEMA, as_shown)[0] == parse(SCHEMA, browser_post(SCHEMA, FULL))[0]
    data, errors = parse(SCHEMA, changed)
    assert errors == {"count": "Enter a whole number."}
    assert data["count"] == "abc" and data["publish"] is False and data["priority"] == "low"
    assert data["tags"][-1] == "new tag"
    assert [item["name"] for item in data["items"]] == ["two", "three"]
    assert data["items"][-1] == {"name": "three", "urgent": False}


def test_a_long_list_parses_in_time_linear_in_the_form() -> None:
    class Line(BaseModel):
        name: str
        qty: int = 1

    class Order(BaseModel):
        lines: list[Line]

    schema = Order.model_json_schema()
    order = Order(lines=[Line(name=f"n{i}", qty=i) for i in range(3_000)])
    pairs = forms.posted(fields(schema, order))
    started = time.perf_counter()
    data, errors = parse(schema, pairs)
    assert time.perf_counter() - started < 3.0  # about 0.3 s; reading it item by item was quadratic (10 s)
    assert errors == {} and Order.model_validate(data) == order
