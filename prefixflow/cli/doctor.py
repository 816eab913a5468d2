"""``prefixflow doctor``: the report of :mod:`prefixflow.cli.doctor_checks` as a table; exit 1 when a check
failed."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from prefixflow.cli.doctor_checks import FAIL, WARN, run_checks
from prefixflow.cli.render import console


def doctor() -> None:
    """What a run here will use and why: Python, torch, CPU and bf16, GPUs, Prefect, MLflow, S3, the model,
    disk. Exit code 1 when something must be fixed first."""
    checks = run_checks()
    table = Table(title="prefixflow doctor", show_lines=False)
    for col in ("check", "", "what a run will use", "fix"):
        table.add_column(col, overflow="fold")
    marks = {FAIL: "[red]✗[/]", WARN: "[yellow]![/]"}
    for c in checks:
        table.add_row(c.name, marks.get(c.status, "[green]✓[/]"), escape(c.value), escape(c.fix))
    console.print(table)
    if any(c.status == FAIL for c in checks):
        raise typer.Exit(1)
