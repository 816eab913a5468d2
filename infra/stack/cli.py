"""``prefixflow stack up|down|status|env``: the typer app (``app``) over the functions of ``control``.

Errors a user can fix (StackError) print one line on stderr and exit 2; ``status`` exits 1 unless every
service is healthy.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import SERVICES, StackConfig, StackError, config_file, default_state_dir
from .control import bring_up, stack_down, stack_env, stack_status

app = typer.Typer(help="The local server stack: PostgreSQL, SeaweedFS (S3), MLflow and Prefect on 127.0.0.1.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

StateDir = typer.Option(None, "--state-dir", envvar="PREFIXFLOW_STACK_DIR", show_default="state/stack",
                        help="state folder of the stack")


def _state(state_dir: Path | None) -> Path:
    return (state_dir or default_state_dir()).expanduser().resolve()


def _fail(err: Exception) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}")
    raise typer.Exit(2)


@app.command()
def up(
    state_dir: Path | None = StateDir,
    host: str | None = typer.Option(None, help="address every service binds to (default 127.0.0.1)"),
    s3_port: int | None = typer.Option(None, help="S3 endpoint port (default 18333)"),
    mlflow_port: int | None = typer.Option(None, help="MLflow server port (default 15000)"),
    prefect_port: int | None = typer.Option(None, help="Prefect server port (default 14200)"),
    weed_master_port: int | None = typer.Option(None, help="SeaweedFS master port (default 19333)"),
    weed_volume_port: int | None = typer.Option(None, help="SeaweedFS volume port (default 19340)"),
    weed_filer_port: int | None = typer.Option(None, help="SeaweedFS filer port (default 18888)"),
    weed_admin_port: int | None = typer.Option(None, help="SeaweedFS admin port (default 13646)"),
    bucket: str | None = typer.Option(None, help="S3 bucket for artifacts (default prefixflow)"),
    timeout: float | None = typer.Option(None, min=1, help="seconds each service may take to start (default 120)"),
    ui_host: str | None = typer.Option(None, help="host name browsers use for the UIs, when it is not the bind "
                                                  "address (default: the client host, 127.0.0.1; '' resets)"),
    database: str | None = typer.Option(None, help="where Prefect and MLflow keep their data: postgres (a PostgreSQL "
                                                   "server of the stack, the default for a new stack) or sqlite "
                                                   "(files; a stack made before keeps it)"),
    postgres_port: int | None = typer.Option(None, help="PostgreSQL port on 127.0.0.1 (default 15432)"),
    auth: bool | None = typer.Option(None, "--auth/--no-auth",
                                     help="MLflow basic auth and one S3 identity per client: each client's "
                                          "credentials (`stack env --client NAME`) reach only its own runs, "
                                          "prefixes and s3://BUCKET/clients/NAME/ (default off)"),
) -> None:
    """Start PostgreSQL, S3, MLflow and Prefect (settings not given: those of the last `up` in this folder, else
    defaults)."""

    state = _state(state_dir)
    given = {"host": host, "s3_port": s3_port, "mlflow_port": mlflow_port, "prefect_port": prefect_port,
             "weed_master_port": weed_master_port, "weed_volume_port": weed_volume_port,
             "weed_filer_port": weed_filer_port, "weed_admin_port": weed_admin_port, "bucket": bucket,
             "start_timeout": timeout, "ui_host": ui_host, "auth": auth, "database": database,
             "postgres_port": postgres_port}
    given = {k: v for k, v in given.items() if v is not None}
    console = Console()
    try:
        base = StackConfig.load(state) if config_file(state).exists() else StackConfig(state_dir=state)
        config = dataclasses.replace(base, **given)
        console.print(f"stack in {state}")
        _, actions = bring_up(config)
    except StackError as err:
        _fail(err)
        return
    if all(a == "running" for a in actions.values()):
        console.print("already running and healthy: nothing to do")
    urls, ui_urls = config.urls(), config.ui_urls()
    for name in config.services():
        console.print(f"  {name:8} {actions[name]:8} UI {ui_urls[name]:<{len(ui_urls['prefect'])}}  API {urls[name]}",
                      soft_wrap=True)
    where = "" if state == _state(None) else f" with PREFIXFLOW_STACK_DIR={shlex.quote(str(state))}"
    if config.auth:
        console.print(f'auth on: each client runs with eval "$(prefixflow stack env --client NAME)"{where}; '
                      'the admin with eval "$(prefixflow stack env)"', soft_wrap=True)
    else:
        console.print(f'clients: eval "$(prefixflow stack env)"{where}', soft_wrap=True)


@app.command()
def down(state_dir: Path | None = StateDir,
         grace: float = typer.Option(15.0, min=0, help="seconds to wait after SIGTERM before SIGKILL")) -> None:
    """Stop Prefect, MLflow, S3 and PostgreSQL (data is kept)."""
    state = _state(state_dir)
    before = {n: s["running"] for n, s in stack_status(state).items()} if state.exists() else {}
    try:
        stack_down(state, grace=grace)
    except StackError as err:
        _fail(err)
    stopped = [n for n in reversed(SERVICES) if before.get(n)]
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else f"nothing running in {state}")


@app.command()
def status(state_dir: Path | None = StateDir) -> None:
    """Show each service's process, health, UI and API addresses and log; exit 1 unless all are healthy."""

    state = _state(state_dir)
    table = Table(title=f"prefixflow stack in {state}")
    for col in ("service", "running", "healthy", "pid", "UI (browser)", "API (clients)", "log"):
        table.add_column(col, overflow="fold", no_wrap=col.endswith(")"))  # URLs stay whole; a long log path folds
    result = stack_status(state)
    for name, s in result.items():
        table.add_row(name, "yes" if s["running"] else "no",
                      "[green]yes[/]" if s["healthy"] else "[red]no[/]",
                      str(s["pid"] or "-"), s["ui"], s["api"], s["log"])
    Console(width=200).print(table)
    if not all(s["healthy"] for s in result.values()):
        raise typer.Exit(1)


@app.command()
def env(state_dir: Path | None = StateDir,
        client: str | None = typer.Option(None, help="print this client's credentials (a stack with --auth), "
                                                     "making the client on first use; default: the admin's")) -> None:
    """Print `export K=V` lines for clients: eval "$(prefixflow stack env [--client NAME])"."""
    state = _state(state_dir)
    try:
        values = stack_env(state, client)
    except StackError as err:
        _fail(err)
        return
    if not all(s["healthy"] for s in stack_status(state).values()):
        typer.echo(f"# warning: the stack in {state} is not fully up (prefixflow stack status)", err=True)
    for key, value in values.items():
        typer.echo(f"export {key}={shlex.quote(value)}")
