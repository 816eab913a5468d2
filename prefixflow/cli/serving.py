"""The serving commands: ``serve`` (the OpenAI-compatible server) and ``keys add`` / ``keys list`` (its API keys).

Deferred on purpose: the server (``prefixflow.serving.app`` and ``.server``: torch, transformers, FastAPI) is
imported by ``serve`` once its keys file was read, so that ``--help``, ``keys`` and a refused ``serve`` stay fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from prefixflow import settings
from prefixflow.cli.guard import fail
from prefixflow.cli.render import console, stderr
from prefixflow.services import tracking
from prefixflow.serving.keys import KeysError, KeyStore, add_key, read_file

keys_app = typer.Typer(help="API keys of `prefixflow serve` (stored hashed; a key is shown once)",
                       no_args_is_help=True)


def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 to accept other machines)"),
    port: int = typer.Option(8000, min=1, max=65535),
    keys: Path | None = typer.Option(None, help="API keys file (`prefixflow keys add`); also read: "
                                                "$PREFIXFLOW_API_KEYS. No keys: open to every caller"),
    base: str = typer.Option("smollm2-135m", help="the frozen base model: embedded name, local folder or HF id"),
    max_batch: int = typer.Option(16, min=1, help="rows decoding together"),
    max_queued: int = typer.Option(256, min=1, help="rows waiting for a batch row before requests get 429"),
    client_max_running: int | None = typer.Option(None, min=1, help="most batch rows one client holds at once "
                                                                    "(default: no limit beyond its fair share)"),
    client_max_queued: int | None = typer.Option(None, min=1, help="rows of one client waiting before its "
                                                                   "requests get 429 (default: --max-queued)"),
    max_tokens: int = typer.Option(512, min=1, help="most tokens one request may generate"),
    rate_limit: float = typer.Option(0.0, min=0, help="requests per second per key (0: no limit)"),
    bank_mb: float = typer.Option(1024, min=1, help="device memory for loaded prefixes (least recently used leave "
                                                    "first, to host memory or out)"),
    host_bank_mb: float | None = typer.Option(None, min=0, help="host memory for prefixes pushed out of the device "
                                              "(default: 4 x --bank-mb on a GPU, 0 on a CPU)"),
    preload: list[str] = typer.Option([], help="a model to load at start-up (CLIENT/TASK@ALIAS, ...; repeatable)"),
    preload_top: int = typer.Option(32, min=0, help="then load the N models most requested in the usage log's last 7 "
                                                    "days, as far as --bank-mb holds them (0: none)"),
    refresh: float = typer.Option(5.0, min=0, help="seconds between registry checks of the aliases in use"),
    precision: str = typer.Option("auto", help="dtype of the base: auto (bf16 only where native), fp32, bf16"),
    device: str = typer.Option("auto", help="auto (the first GPU if any, else the CPU), cpu, cuda, cuda:N"),
    max_prefill_rows: int | None = typer.Option(None, min=1, help="new rows prefilled together per step "
                                                                  "(default: all free rows)"),
    prefill_chunk: int | None = typer.Option(None, min=1, help="prompt tokens prefilled per step: a longer prompt "
                                             "takes several steps while running rows go on (default: 2 x --max-batch "
                                             "on a CPU, 512 on a GPU)"),
    kv_cache_mb: float = typer.Option(2048, min=1, help="KV memory for the rows' tokens, split between --max-batch "
                                                        "rows: bounds prompt + max_tokens of a request (else 400)"),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: torch's choice)"),
    usage_dir: Path | None = typer.Option(None, help="folder of the usage log, requests and tokens per client and "
                                                     "hour (default: $PREFIXFLOW_USAGE_DIR, else the state "
                                                     "folder's usage/; `prefixflow usage` reads it)"),
    usage_flush: float = typer.Option(30.0, min=1, help="seconds between appends to the usage log"),
    canary_error_margin: float = typer.Option(5.0, min=0, help="end a canary whose error rate (5xx) exceeds its "
                                              "champion's by more than this many points (0: never)"),
    canary_min_requests: int = typer.Option(50, min=1, help="canary requests answered before that rule applies"),
) -> None:
    """Serve registered prefixes over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), one
    base model for every client, with /health and /metrics."""
    try:
        store = KeyStore.load(keys)
    except KeysError as err:
        fail(str(err))
    if store.is_open and host not in ("127.0.0.1", "localhost", "::1"):
        stderr.print(f"[yellow]warning:[/] no API keys configured and listening on {escape(host)}: anyone who can "
                     "reach this port may use every prefix (add keys with `prefixflow keys add`)")
    from prefixflow.serving import app as serving
    from prefixflow.serving.server import ServeConfig

    config = ServeConfig(base=base, keys_file=keys, max_batch=max_batch, max_queued=max_queued,
                         client_max_running=client_max_running, client_max_queued=client_max_queued,
                         max_tokens=max_tokens, rate_limit=rate_limit, bank_mb=bank_mb, refresh_s=refresh,
                         host_bank_mb=host_bank_mb, preload=tuple(preload), preload_top=preload_top,
                         precision=precision, device=device, max_prefill_rows=max_prefill_rows, threads=threads,
                         prefill_chunk=prefill_chunk, kv_cache_mb=kv_cache_mb,
                         usage_dir=usage_dir or settings.usage_dir(), usage_flush_s=usage_flush,
                         canary_error_margin=canary_error_margin or None, canary_min_requests=canary_min_requests)
    try:
        config.torch_device  # noqa: B018 -- refuses a device this machine does not have, before anything starts
    except ValueError as err:
        fail(str(err))
    console.print(f"prefixflow serve: base [cyan]{escape(base)}[/] on http://{host}:{port}/v1 "
                  f"({'open: no keys' if store.is_open else f'{len(store.clients)} client(s) with keys'}); "
                  f"registry {escape(tracking.tracking_uri())}")
    server = serving.run(config, host=host, port=port)
    if server.load_error:
        fail(server.load_error)


@keys_app.command("add")
def keys_add(
    client: str = typer.Option(..., help="the client the key belongs to (its specs' `client`), or * for admin"),
    file: Path = typer.Option(Path("serve-keys.yaml"), help="keys file (created if missing)"),
) -> None:
    """Create an API key for a client and print it (once; only its hash is stored)."""
    try:
        key, key_id = add_key(file, client)
    except KeysError as err:
        fail(str(err))
    stderr.print(f"key {key_id} for {'admin' if client == '*' else 'client ' + client} added to {file}; "
                 "it is shown only now:")
    print(key)


@keys_app.command("list")
def keys_list(file: Path = typer.Option(Path("serve-keys.yaml"), help="keys file")) -> None:
    """The clients and key ids in a keys file (never the keys)."""
    try:
        entries = read_file(file)
    except KeysError as err:
        fail(str(err))
    table = Table(title=str(file))
    for col in ("client", "key id", "created"):
        table.add_column(col)
    for e in entries:
        table.add_row(escape(str(e["client"])), e["sha256"][:12], str(e.get("created", "")))
    console.print(table)
