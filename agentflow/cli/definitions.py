"""What the module defines, and whether the stored runs fit it: ``describe`` and ``check``."""

from __future__ import annotations

import argparse
import time

from ..checks import check_runs
from ..steward import Steward
from .lookup import check_stores, runners
from .output import Output, dumps

__all__ = ["check", "describe"]


async def describe(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``describe MODULE [--workflow W] [--json]``: each workflow's steps, schemas and Mermaid chart.

    ``--json`` prints one JSON array of ``Steward.describe`` documents.
    """
    names = [r.spec.name for r in runners(steward, args.workflow)] if args.workflow else None
    described = [steward.describe(w.name) for w in steward.workflows() if names is None or w.name in names]
    if out.json:
        out.document(described)
        return 0
    for i, d in enumerate(described):
        if i:
            out.line("")
        version = steward.get(d["name"]).compile().version
        out.fields(
            [
                ("workflow", f"{d['name']} (version {version}, {d['mode']})"),
                ("description", d["description"] or "-"),
                ("steps", " -> ".join(d["steps"])),
            ]
        )
        for key in ("input_schema", "state_schema", "output_schema"):
            schema = d[key]
            if schema:
                props = schema.get("properties", {})
                required = set(schema.get("required", []))
                fields = [
                    f"{k}: {v.get('type', v.get('$ref', 'any'))}{'' if k in required else ' (optional)'}"
                    for k, v in props.items()
                ]
                out.block(key.replace("_schema", ""), "\n".join(fields) or dumps(schema))
        out.block("mermaid", d["mermaid"])
    return 0


async def check(steward: Steward, args: argparse.Namespace, out: Output) -> int:
    """``check MODULE [--json]``: the runs not final that the current code could not load.

    Meant for CI before a deploy: exits 1 when there is any (each listed with its
    version, step, field and reason), 0 when every live run would load. Reads only.
    """
    check_stores(steward)
    began = time.perf_counter()
    found = await check_runs(runners(steward, args.workflow))
    took = time.perf_counter() - began
    if out.json:
        for bad in found:
            out.json_line(
                {
                    "run_id": bad.run_id,
                    "workflow": bad.workflow,
                    "status": bad.status.value,
                    "version": bad.version,
                    "step": bad.step,
                    "field": bad.field,
                    "message": bad.message,
                }
            )
        return 1 if found else 0
    if found:
        rows = [
            [b.run_id, b.workflow, b.status.value, b.version, b.step or "", b.field or "", b.message]
            for b in found
        ]
        out.table(["RUN", "WORKFLOW", "STATUS", "VERSION", "STEP", "FIELD", "WHY"], rows)
        head = f"{len(found)} run(s) would not load with this code"
        tail = f" (checked in {took:.2f} s): add a .migrate() for their version, or finish them first"
        out.line(head + tail, f"[bold red]{head}[/bold red]{tail}")
        return 1
    out.line(f"every run that is not final loads with this code (checked in {took:.2f} s)")
    return 0
