"""The ``usage`` command: what each client costs, from MLflow (its runs' training figures, its registered versions)
and the servers' usage log (services.usage).

Deferred on purpose: ``prefixflow.services.usage`` loads MLflow; the command imports it when it runs, so that
``prefixflow --help`` stays fast.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from prefixflow import settings
from prefixflow.cli.guard import fail, run_guarded
from prefixflow.cli.render import console
from prefixflow.services.spec import NAME_PATTERN

FORMATS = ("table", "csv", "json")


def usage(
    since: str | None = typer.Option(None, help="only what started in this window: 7d, 12h, 30m, 2w, or a date "
                                                "(2026-12-01); default: everything"),
    client: str | None = typer.Option(None, help="one client only"),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (one object per client)"),
    usage_dir: Path | None = typer.Option(None, help="the servers' usage log folder (default: "
                                                     "$PREFIXFLOW_USAGE_DIR, else the state folder's usage/)"),
) -> None:
    """What each client costs: pipeline runs, registered versions, training hours by device and tokens trained
    (MLflow), and serving requests and tokens (the servers' usage log)."""
    if fmt not in FORMATS:
        fail(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if client is not None and not re.match(NAME_PATTERN, client):
        fail(f"--client {client!r} is not a client name (lowercase letters, digits and inner hyphens; 1-40)")
    from prefixflow.services import usage as service

    try:
        start = service.parse_since(since)
    except ValueError as err:
        fail(str(err))
    rows = run_guarded(service.report, start, client, usage_dir or settings.usage_dir())
    devices = sorted({d for r in rows for d in r.train_hours})
    if fmt == "json":
        print(json.dumps([r.model_dump() for r in rows], indent=2))
        return
    header = ["client", "runs", "trainings", "versions", *(f"train_hours_{d}" for d in devices), "wall_hours",
              "tokens_trained", "requests", "prompt_tokens", "completion_tokens"]
    values = [[r.client, r.runs, r.trainings, r.versions, *(round(r.train_hours.get(d, 0.0), 6) for d in devices),
               round(r.wall_hours, 6), r.tokens_trained, r.requests, r.prompt_tokens, r.completion_tokens]
              for r in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(values)
        print(out.getvalue(), end="")
        return
    table = Table(title=f"usage per client{f' since {escape(since)}' if since else ''}")
    for col in header:
        table.add_column(col.replace("train_hours_", "train h ").replace("_", " "),
                         justify="left" if col == "client" else "right")
    for row in values:
        table.add_row(*(escape(str(v)) if isinstance(v, str) else f"{v:,}" if isinstance(v, int)
                        else f"{v:.4f}" for v in row))
    console.print(table if rows else "no usage recorded" + (f" since {since}" if since else ""))
