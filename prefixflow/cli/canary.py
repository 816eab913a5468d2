"""``prefixflow canary status``: a canary and its champion side by side, from the registry and the servers'
``/metrics`` (``serving.canary_watch``). Starting, finishing and ending a canary are ``promote --canary``,
``promote --finish`` and ``rollback`` (:mod:`~prefixflow.cli.registry`).

Deferred on purpose: httpx, the registry (MLflow) and the metrics parser load when the command runs, so that
``prefixflow --help`` stays fast."""

from __future__ import annotations

import typer
from rich.table import Table

from prefixflow.cli.guard import fail, run_guarded
from prefixflow.cli.render import console

canary_app = typer.Typer(help="canary rollouts (start one with `prefixflow promote REF --canary 10`)",
                         no_args_is_help=True)


@canary_app.command("status")
def status(
    name: str = typer.Argument(..., help="registered model (CLIENT-TASK) or CLIENT/TASK"),
    server: list[str] = typer.Option([], help="a server's base URL (http://HOST:PORT), once per replica; its "
                                              "/metrics has the per-version counts"),
) -> None:
    """The active canary of a model and, per server given, requests, errors and latency of canary and champion."""
    import httpx

    from prefixflow.services import canary, registry
    from prefixflow.serving.canary_watch import version_stats

    full = name.replace("/", "-")
    run_guarded(registry.owner, full)  # one message naming the model when it is not registered
    active = run_guarded(canary.current, full)
    if active is None:
        fail(f"{full!r} has no active canary (start one with `prefixflow promote {name}/VERSION --canary 10`)", 1)
    console.print(f"{full}: @canary v{active.version} takes {active.share:g}% of the requests naming @champion "
                  f"(v{active.champion})")
    if not server:
        console.print("[dim]give --server URL (once per replica) to compare what they served[/]")
        return
    texts = []
    for url in server:
        try:
            response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10)
            response.raise_for_status()
        except httpx.HTTPError as err:
            fail(f"cannot read {url}/metrics: {err}; is `prefixflow serve` running there?")
        texts.append(response.text)
    table = Table("version", "role", "requests", "5xx", "error rate", "mean s", "p95 s (≤)")
    for s in version_stats(texts, full):
        table.add_row(f"v{s.version}", s.role, str(s.requests), str(s.errors), f"{s.error_rate:.1f}%",
                      "-" if s.mean_s is None else f"{s.mean_s:.3f}",
                      "-" if s.quantile_s(0.95) is None else f"{s.quantile_s(0.95):g}")
    console.print(table)
