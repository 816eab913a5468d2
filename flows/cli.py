"""The ``prefixflow`` command line.

Without ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` everything runs embedded under the state folder
(``$PREFIXFLOW_HOME``, default ``./state``): an ephemeral Prefect API and a local MLflow store. With
them set (``eval "$(prefixflow stack env)"``) the same commands use the servers.
"""

from __future__ import annotations

import logging
import signal
import uuid
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from prefixflow import settings
from prefixflow.flows.embedded import stop_on_termination, use_embedded_prefect, watch_for_sigkill
from prefixflow.infra import stack

app = typer.Typer(help="prefixflow: train, evaluate, register and serve prefixes on frozen LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(stack.app, name="stack", help="the local server stack: Prefect, MLflow and S3 (SeaweedFS)")
console = Console()
errors = Console(stderr=True, soft_wrap=True)


@app.callback()
def _setup() -> None:
    settings.apply_process_defaults()
    stop_on_termination()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _embedded_prefect(state: Path | None = None, summary: bool = False) -> None:
    """Without a Prefect server, keep the ephemeral API's files next to the rest of the state (and say so
    on a first run, which waits for Prefect to create its database). ``summary``: print doctor's line first."""
    note = use_embedded_prefect(state)
    watch_for_sigkill()
    if summary:
        from prefixflow.flows.doctor import run_checks, summary_line

        console.print(f"[dim]{escape(summary_line(run_checks()))}[/]")
    if note:
        console.print(f"[dim]{escape(note)}[/]")


def _fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}")
    logging.getLogger("prefect").setLevel(logging.WARNING)  # the message stays the last line ("Stopping
    raise typer.Exit(code)                                  # temporary server" is logged at exit)


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs failed runs with their traceback; for bad input, a server that did not answer or a full disk
    the message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefixflow.services.errors import is_user_error, outage

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (is_user_error(exc) or outage(exc)):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())


def _run_guarded(fn, *args, resume: str | None = None, **kwargs):
    """Run a pipeline call; input errors end in one message (exit 2); a server that cannot be reached or a full
    disk in one saying which and what to do (exit 1); others in a one-line summary (exit 1). ``resume``: the
    command that finishes the run, added to the messages of failures that a rerun can get past."""
    from prefixflow.services.errors import denied, is_user_error, outage

    _quiet_user_errors()
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if is_user_error(exc):
            _fail(denied(exc) or str(exc))
        then = f"; then `{resume}` finishes this run (finished work is reused)" if resume else ""
        cause = outage(exc)
        if cause:
            _fail(f"{cause}{then}", code=1)
        _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(the Prefect logs above have the details){then}", code=1)


def _run_key(given: str | None) -> str:
    """The run key: ``given`` (checked: it names folders and tags) or a new one."""
    import re

    if given is None:
        return uuid.uuid4().hex[:12]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", given):
        _fail(f"--run-key {given!r} is not a run key: use letters, digits, '.', '_' and '-' (at most 64), as "
              "printed by an earlier run")
    return given


@contextmanager
def _progress_bar():
    """A rich progress bar fed by the events of every training started within the block."""
    from prefixflow.launch.training import watching

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                        TextColumn("{task.fields[validation]}"), TextColumn("{task.fields[eta]}"), console=console,
                        transient=False)
    bars: dict[str, int] = {}

    def on_event(spec, event: dict) -> None:
        name = f"{spec.client}/{spec.task}"
        kind = event.get("event")
        if kind == "end" and event.get("stopped_early") and name in bars:
            progress.update(bars[name], total=event["steps"], completed=event["steps"], eta="",
                            info=f"stopped early at step {event['steps']}: validation loss plateaued")
        if kind == "eval" and name in bars:  # validation on its own: its loss, size and time
            progress.update(bars[name], validation=f"val {event['eval_loss']:.3f} ({event.get('examples', '?')} ex, "
                                                   f"{event.get('seconds', 0):.0f} s)")
        if kind != "step":
            return
        if name not in bars:
            bars[name] = progress.add_task(f"training {name}", total=event["max_steps"], info="", validation="",
                                           eta="")
        info = f"loss {event['loss']:.3f}  {event['tokens_per_s']:.0f} tok/s (training)"
        eta = event.get("eta_s") or 0
        progress.update(bars[name], completed=event["step"], info=info,
                        eta=f"ETA {int(eta // 60)}:{int(eta % 60):02d}" if event["step"] < event["max_steps"] else "")

    with progress, watching(on_event):
        yield progress


def _load_spec(path: Path, here: bool = False):
    """The parsed spec, or exit 2 with the reason. ``here``: the run happens on this machine, so the base model
    folder and local data files it names must exist (checked without loading them)."""
    from prefix_core.errors import PrefixError
    from prefixflow.services.spec import SpecError, load_spec

    try:
        parsed = load_spec(path)
        if here:
            from prefixflow.services.preparation import preflight

            preflight(parsed)
        return parsed
    except (SpecError, PrefixError) as err:
        _fail(f"{path}: {err}" if isinstance(err, PrefixError) else str(err))


def _metrics_table(report) -> Table:
    table = Table(title="test metrics")
    metrics = list(next(iter(report.metrics.values())))
    table.add_column("system")
    for m in metrics:
        table.add_column(m, justify="right")
    for system, values in report.metrics.items():
        label = f"champion (v{report.champion_version})" if system == "champion" else system
        table.add_row(label, *(f"{values[m]:.2f}" for m in metrics))
    return table


def _print_result(result) -> None:
    if getattr(result, "outcome", "registered") == "unchanged":
        console.print(f"[bold]unchanged[/]: {escape(result.unchanged.reason)}; @champion stays "
                      f"v{result.unchanged.version} (prepared data in {result.timings['prepare']:.1f} s)")
        return
    reg, report = result.registration, result.report
    console.print(_metrics_table(report))
    verdict = "[green]passed[/]" if report.gate.passed else "[yellow]refused[/]"
    console.print(f"gate {verdict}: {escape(report.gate.reason)}")
    console.print(f"registered [bold]{reg.name}[/] v{reg.version} (@candidate); @champion = v{reg.champion or '-'}, "
                  f"@previous = v{reg.previous or '-'}")
    if getattr(reg, "note", None):
        console.print(f"[yellow]note:[/] {escape(reg.note)}")
    t = getattr(result, "timings", None)
    if t is None:  # a sweep: its own table said where the time went
        console.print(f"time: total {result.seconds:.0f} s; MLflow run: {escape(result.mlflow_link)}")
        return
    if t["orchestration"] < 0:  # results reused from the earlier run of this run key carry that run's durations
        console.print(f"time: total {t['total']:.0f} s, reusing the finished run (it trained for {t['train']:.1f} s "
                      f"and evaluated for {t['evaluate']:.1f} s); MLflow run: {escape(result.mlflow_link)}")
        return
    console.print(f"time: total {t['total']:.0f} s = prepare {t['prepare']:.1f} + train {t['train']:.1f} + "
                  f"evaluate {t['evaluate']:.1f} + orchestration {t['orchestration']:.1f} "
                  f"({t['orchestration'] / t['total']:.1%}); MLflow run: {escape(result.mlflow_link)}")


@app.command()
def demo(
    steps: int = typer.Option(150, min=1, help="training steps"),
    state: Path = typer.Option(Path("state/demo"), help="state folder: data, runs, Prefect and MLflow stores"),
    model: str = typer.Option("smollm2-135m", help="base model: embedded name, local folder or HF id"),
    fresh: bool = typer.Option(False, help="train a new version even if this demo already ran"),
    strategy: str = typer.Option("single", help="single | ddp | deepspeed-zero2 | deepspeed-zero3"),
    processes: int = typer.Option(1, min=1, help="training processes (2+ for ddp/deepspeed; gloo on CPU)"),
) -> None:
    """The whole pipeline on a generated task and the embedded model, then generations with and without."""
    from prefixflow.flows.demo import run_demo

    _embedded_prefect(state, summary=True)
    console.print(f"[bold]prefixflow demo[/]: pipeline on base model [cyan]{model}[/], {steps} steps ({strategy}, "
                  f"{processes} process(es)), state in {state} (Prefect and MLflow embedded unless "
                  "PREFECT_API_URL/MLFLOW_TRACKING_URI)")
    with _progress_bar():
        result = _run_guarded(run_demo, state, steps=steps, model=model, fresh=fresh, strategy=strategy,
                              processes=processes)
    _print_result(result.pipeline)
    table = Table(title=f"held-out records: greedy generations (prefix pulled from @{result.pulled_alias})",
                  show_lines=True)
    for col in ("record", "no prefix", "with prefix", "reference"):
        table.add_column(col, overflow="fold")
    for row in result.rows[:6]:
        table.add_row(*(escape(cell) for cell in row))  # records contain [brackets]: not markup
    console.print(table)
    console.print(f"exact match on {len(result.rows)} held-out records: no prefix {result.exact_before:.0%}, with "
                  f"the pulled prefix [bold green]{result.exact_after:.0%}[/]; prefix pulled to {result.pulled}")


@app.command()
def doctor() -> None:
    """What a run here will use and why: Python, torch, CPU and bf16, GPUs, Prefect, MLflow, S3, the model,
    disk. Exit code 1 when something must be fixed first."""
    from prefixflow.flows.doctor import FAIL, WARN, run_checks

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


@app.command()
def run(
    spec: Path = typer.Argument(..., help="pipeline spec (YAML)"),
    run_key: str | None = typer.Option(None, help="resume or re-run this pipeline run (default: a new run)"),
    retrain: str = typer.Option("always", help="always | on_change: skip training when data, base model and "
                                               "training settings equal the champion's (the spec's retrain wins)"),
) -> None:
    """Run the pipeline for one spec: prepare data, train, evaluate, gate, register."""
    if retrain not in ("always", "on_change"):
        _fail(f"--retrain must be always or on_change, got {retrain!r}")
    parsed = _load_spec(spec, here=True)  # bad input is refused before anything starts or is written
    key = _run_key(run_key)
    _embedded_prefect()
    from prefixflow.flows.pipeline import prefix_pipeline

    resume = f"prefixflow run {spec} --run-key {key}"
    console.print(f"run key [bold]{key}[/]: if this run stops, `{escape(resume)}` finishes it (finished work is "
                  "reused, training resumes from its newest checkpoint)")
    with _progress_bar(), _explain_termination(resume):
        result = _run_guarded(prefix_pipeline, parsed, run_key=key, retrain=retrain, resume=resume)
    _print_result(result)


@contextmanager
def _explain_termination(resume: str):
    """One line when the command is stopped by a signal (SIGTERM, SIGHUP: SystemExit 128+N; Ctrl-C)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) else 130
        if isinstance(code, int) and code > 128:
            name = "Ctrl-C" if code == 130 else signal.Signals(code - 128).name
            errors.print(f"[bold red]stopped[/] by {name}: training and the embedded services were stopped and the "
                         f"run was marked crashed; `{escape(resume)}` finishes it")
            raise typer.Exit(code) from None
        raise


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="pipeline spec (YAML) with a `sweep:` section"),
    run_key: str | None = typer.Option(None, help="continue this sweep (finished trials are not run again)"),
) -> None:
    """Search the spec's `sweep:` space (Optuna, pruned on validation loss), then evaluate, gate and register the
    best setting like `prefixflow run`."""
    parsed = _load_spec(spec, here=True)
    if parsed.sweep is None:
        _fail(f"{spec} has no `sweep:` section: add one (docs/pipeline.md, 'Sweeps') or use `prefixflow run`")
    key = _run_key(run_key)
    _embedded_prefect()
    from prefixflow.flows.sweep import prefix_sweep

    resume = f"prefixflow sweep {spec} --run-key {key}"
    console.print(f"sweep run key [bold]{key}[/]: if it stops, `{escape(resume)}` continues it (finished trials "
                  "are kept)")
    with _progress_bar(), _explain_termination(resume):
        result = _run_guarded(prefix_sweep, parsed, run_key=key, resume=resume)
    if result.recovered:
        console.print(f"continued the sweep: trials {result.recovered} had been left running and were queued again")
    keys = list(parsed.sweep.space)
    table = Table(title=f"sweep {parsed.client}/{parsed.task}: {len(result.trials)} trials")
    for col in ("trial", "state", "validation loss", "steps", *keys):
        table.add_column(col)
    for t in result.trials:
        table.add_row(f"{t.number}{' (best)' if t.number == result.best.number else ''}", t.state,
                      "-" if t.value is None else f"{t.value:.4f}", str(t.steps or "-"),
                      *(escape(str(t.params.get(k, "-"))) for k in keys))
    console.print(table)
    _print_result(result)


@app.command()
def fleet(
    folder: Path = typer.Argument(..., help="folder of pipeline specs (*.yaml, *.yml)"),
    max_concurrent: int = typer.Option(1, min=1, help="trainings allowed to run at once"),
) -> None:
    """Run the pipeline for every spec in a folder, at most N trainings at a time."""
    specs = _folder_specs(folder, here=True)
    _embedded_prefect()
    from prefixflow.flows.fleet import retrain_fleet

    with _progress_bar():
        entries = _run_guarded(retrain_fleet, specs, max_concurrent_trainings=max_concurrent)
    table = Table(title="fleet")
    for col in ("client/task", "status", "version", "champion", "gate", "detail"):
        table.add_column(col)
    for e in entries:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in (e.metrics or {}).items()) if e.ok else e.error or ""
        if e.outcome == "unchanged":
            detail = "unchanged: data and training settings equal the champion's; nothing trained"
        status = {"unchanged": "[dim]unchanged[/]"}.get(e.outcome or "", "[green]ok[/]" if e.ok else "[red]failed[/]")
        table.add_row(f"{e.client}/{e.task}", status, e.version or "-",
                      e.champion or "-", {True: "passed", False: "refused"}.get(e.gate_passed, "-"), escape(detail))
    console.print(table)
    if not all(e.ok for e in entries):
        raise typer.Exit(1)


def _folder_specs(folder: Path, here: bool = False) -> list:
    """Every spec of a folder (:func:`_load_spec`), each (client, task) at most once, or exit 2 saying why."""
    from prefixflow.services.spec import SpecError, check_fleet

    specs = [_load_spec(p, here) for p in _spec_files(folder)]
    try:
        check_fleet(specs)
    except SpecError as err:
        _fail(str(err))
    return specs


def _spec_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        _fail(f"{folder} is not a folder of specs")
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        _fail(f"no *.yaml specs in {folder}")
    return files


@app.command()
def deploy(
    folder: Path = typer.Argument(..., help="folder of pipeline specs (*.yaml); each becomes a deployment"),
) -> None:
    """Serve one deployment per spec, on its cron schedule, with the spec editable in the Prefect UI."""
    specs = _folder_specs(folder)
    if settings.prefect_api_url() is None:
        _fail('deploy needs a Prefect server: run `prefixflow stack up` and `eval "$(prefixflow stack env)"` '
              "(or set PREFECT_API_URL)")
    from prefixflow.flows.deploy import deployment_name, serve_specs

    for s in specs:
        console.print(f"deployment prefix-pipeline/{deployment_name(s)}: schedule {s.schedule or 'none (manual)'}")
    serve_specs(specs)


@app.command()
def pull(
    ref: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, CLIENT/TASK@ALIAS"),
    out: Path = typer.Option(..., help="folder to write the prefix to (replaced atomically)"),
) -> None:
    """Download a registered prefix and check it loads."""
    from prefixflow.services import registry

    mv = _run_guarded(registry.resolve, ref)
    path = _run_guarded(registry.download_version, mv, out)
    console.print(f"pulled {mv.name} v{mv.version} ({escape(ref)}) to {path}")


@app.command()
def generate(
    prompt: list[str] = typer.Argument(..., help="one or more prompts"),
    prefix: str | None = typer.Option(None, help="prefix folder, s3:// folder or registry reference "
                                                 "(CLIENT/TASK@ALIAS, models:/...); omit for the bare base model"),
    model: str | None = typer.Option(None, help="base model (default: the one recorded in the prefix)"),
    template: bool = typer.Option(True, help="render prompts through the prefix's prompt template"),
    max_new_tokens: int = typer.Option(48, min=1),
    precision: str = typer.Option("auto", help="dtype of the base: auto (bf16 only where native), fp32, bf16"),
) -> None:
    """Generate with a prefix (or none, for comparison)."""
    from prefix_core import MultiPrefixGenerator, PrefixArtifact, PrefixError, load_base_model
    from prefix_core.precision import decide
    from prefixflow.services import registry
    from prefixflow.services.storage import fetch_dir

    try:
        chosen = decide(precision, "cpu")
    except ValueError as err:
        _fail(f"--precision: {err}")
    if chosen.warning:
        errors.print(f"[yellow]warning:[/] {escape(chosen.warning)}")
    try:
        art = None
        if prefix:
            path = registry.download(prefix) if registry.is_ref(prefix) else fetch_dir(prefix)
            art = PrefixArtifact.load(path)
        name = model or (art.manifest["base_model"]["name"] if art else "smollm2-135m")
        base, tok = load_base_model(name, dtype=chosen.dtype)
        gen = MultiPrefixGenerator(base, tok, {"p": art} if art else {})
        texts = gen.generate([("p" if art else None, p) for p in prompt], max_new_tokens=max_new_tokens,
                             apply_template=template and art is not None, do_sample=False)
    except PrefixError as err:
        _fail(str(err))
    for p, t in zip(prompt, texts, strict=True):
        console.print(f"[dim]{escape(p)}[/]\n{escape(t.strip())}\n")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 to accept other machines)"),
    port: int = typer.Option(8000, min=1, max=65535),
    keys: Path | None = typer.Option(None, help="API keys file (`prefixflow keys add`); also read: "
                                                "$PREFIXFLOW_API_KEYS. No keys: open to every caller"),
    base: str = typer.Option("smollm2-135m", help="the frozen base model: embedded name, local folder or HF id"),
    max_batch: int = typer.Option(16, min=1, help="rows decoding together"),
    max_queued: int = typer.Option(256, min=1, help="rows waiting for a batch row before requests get 429"),
    max_tokens: int = typer.Option(512, min=1, help="most tokens one request may generate"),
    rate_limit: float = typer.Option(0.0, min=0, help="requests per second per key (0: no limit)"),
    bank_mb: float = typer.Option(1024, min=1, help="memory for loaded prefixes (least recently used leave first)"),
    refresh: float = typer.Option(5.0, min=0, help="seconds between registry checks of the aliases in use"),
    precision: str = typer.Option("auto", help="dtype of the base: auto (bf16 only where native), fp32, bf16"),
    device: str = typer.Option("auto", help="auto (the first GPU if any, else the CPU), cpu, cuda, cuda:N"),
    max_prefill_rows: int | None = typer.Option(None, min=1, help="new rows prefilled together per step "
                                                                  "(default: all free rows)"),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: torch's choice)"),
) -> None:
    """Serve registered prefixes over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), one
    base model for every client, with /health and /metrics."""
    from prefixflow.serving import app as serving
    from prefixflow.serving.keys import KeysError, KeyStore
    from prefixflow.serving.server import ServeConfig

    try:
        store = KeyStore.load(keys)
    except KeysError as err:
        _fail(str(err))
    if store.is_open and host not in ("127.0.0.1", "localhost", "::1"):
        errors.print(f"[yellow]warning:[/] no API keys configured and listening on {escape(host)}: anyone who can "
                     "reach this port may use every prefix (add keys with `prefixflow keys add`)")
    config = ServeConfig(base=base, keys_file=keys, max_batch=max_batch, max_queued=max_queued,
                         max_tokens=max_tokens, rate_limit=rate_limit, bank_mb=bank_mb, refresh_s=refresh,
                         precision=precision, device=device, max_prefill_rows=max_prefill_rows, threads=threads)
    try:
        config.torch_device  # noqa: B018 -- refuses a device this machine does not have, before anything starts
    except ValueError as err:
        _fail(str(err))
    console.print(f"prefixflow serve: base [cyan]{escape(base)}[/] on http://{host}:{port}/v1 "
                  f"({'open: no keys' if store.is_open else f'{len(store.clients)} client(s) with keys'}); "
                  f"registry {escape(_registry_target())}")
    server = serving.run(config, host=host, port=port)
    if server.load_error:
        _fail(server.load_error)


def _registry_target() -> str:
    from prefixflow.services import tracking

    return tracking.tracking_uri()


keys_app = typer.Typer(help="API keys of `prefixflow serve` (stored hashed; a key is shown once)",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    client: str = typer.Option(..., help="the client the key belongs to (its specs' `client`), or * for admin"),
    file: Path = typer.Option(Path("serve-keys.yaml"), help="keys file (created if missing)"),
) -> None:
    """Create an API key for a client and print it (once; only its hash is stored)."""
    from prefixflow.serving.keys import KeysError, add_key

    try:
        key, key_id = add_key(file, client)
    except KeysError as err:
        _fail(str(err))
    errors.print(f"key {key_id} for {'admin' if client == '*' else 'client ' + client} added to {file}; "
                 "it is shown only now:")
    print(key)


@keys_app.command("list")
def keys_list(file: Path = typer.Option(Path("serve-keys.yaml"), help="keys file")) -> None:
    """The clients and key ids in a keys file (never the keys)."""
    from prefixflow.serving.keys import KeysError, read_file

    try:
        entries = read_file(file)
    except KeysError as err:
        _fail(str(err))
    table = Table(title=str(file))
    for col in ("client", "key id", "created"):
        table.add_column(col)
    for e in entries:
        table.add_row(escape(str(e["client"])), e["sha256"][:12], str(e.get("created", "")))
    console.print(table)


@app.command()
def promote(
    ref: str = typer.Argument(..., help="the version to serve: models:/NAME/VERSION or CLIENT/TASK/VERSION "
                                        "(or an alias, e.g. acme/e2e@candidate)"),
) -> None:
    """Make a version the @champion; the old champion becomes @previous."""
    from prefixflow.services import registry

    mv = _run_guarded(registry.resolve, ref)
    old, new = registry.promote(mv.name, mv.version)
    console.print(f"{mv.name}: @champion v{old or '-'} -> v{new}" + (f"; @previous = v{old}" if old else ""))


@app.command()
def rollback(
    name: str = typer.Argument(..., help="registered model (CLIENT-TASK) or CLIENT/TASK"),
) -> None:
    """Swap @champion and @previous (run again to undo)."""
    from prefixflow.services import registry

    full = name.replace("/", "-")
    old, new = _run_guarded(registry.rollback, full)
    console.print(f"{full}: @champion v{old} -> v{new}; @previous = v{old}")


if __name__ == "__main__":
    app()
