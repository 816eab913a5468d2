"""The pipeline commands: ``demo``, ``run``, ``sweep``, ``fleet`` and ``deploy``.

Without ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` everything runs embedded under the state folder
(``$PREFIXFLOW_HOME``, default ``./state``): an ephemeral Prefect API and a local MLflow store. With
them set (``eval "$(prefixflow stack env)"``) the same commands use the servers.

Deferred on purpose: the flows (``prefixflow.flows.*``) import Prefect, which reads its settings once, when it is
imported; each command imports its flow after :func:`_embedded_prefect` has set them (and after its input was
checked, so a refused command stays fast).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import typer
from rich.markup import escape

from prefixflow import settings
from prefixflow.cli.doctor_checks import run_checks, summary_line
from prefixflow.cli.guard import checked_run_key, explain_termination, fail, folder_specs, load_spec, run_guarded
from prefixflow.cli.render import (
    console,
    print_demo_result,
    print_fleet,
    print_run_result,
    print_sweep_result,
    progress_bar,
    stderr,
)
from prefixflow.flows.embedded import use_embedded_prefect, watch_for_sigkill
from prefixflow.launch.packing import PACK_SIZE


def _embedded_prefect(state: Path | None = None, summary: bool = False, on_stderr: bool = False) -> None:
    """Without a Prefect server, keep the ephemeral API's files next to the rest of the state (and say so
    on a first run, which waits for Prefect to create its database). ``summary``: print doctor's line first."""
    note = use_embedded_prefect(state)
    watch_for_sigkill()
    if summary:
        console.print(f"[dim]{escape(summary_line(run_checks()))}[/]")
    if note:
        (stderr if on_stderr else console).print(f"[dim]{escape(note)}[/]")


def _keyed_run(label: str, resume: str, stops: str, then: str, fn, *args, on_stderr: bool = False, **kwargs):
    """Say the run key and the command that finishes the run if it ``stops`` (``then``: what that command does),
    then run ``fn`` guarded, with the progress bar, saying so if a signal stops it. ``on_stderr``: all of this on
    stderr, and so is whatever a library writes to stdout meanwhile (MLflow's "View run" lines with a tracking
    server): stdout carries only the machine-readable result printed afterwards."""
    key = resume.rsplit(" ", 1)[-1]
    (stderr if on_stderr else console).print(f"{label} [bold]{key}[/]: if {stops}, `{escape(resume)}` {then}")
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if on_stderr else contextlib.nullcontext()
    with progress_bar(on_stderr), explain_termination(resume), quiet_stdout:
        return run_guarded(fn, *args, resume=resume, **kwargs)


def demo(
    steps: int = typer.Option(150, min=1, help="training steps"),
    state: Path = typer.Option(Path("state/demo"), help="state folder: data, runs, Prefect and MLflow stores"),
    model: str = typer.Option("smollm2-135m", help="base model: embedded name, local folder or HF id"),
    fresh: bool = typer.Option(False, help="train a new version even if this demo already ran"),
    strategy: str = typer.Option("single", help="single | ddp | deepspeed-zero2 | deepspeed-zero3"),
    processes: int = typer.Option(1, min=1, help="training processes (2+ for ddp/deepspeed; gloo on CPU)"),
) -> None:
    """The whole pipeline on a generated task and the embedded model, then generations with and without."""
    _embedded_prefect(state, summary=True)
    from prefixflow.flows.demo import run_demo

    console.print(f"[bold]prefixflow demo[/]: pipeline on base model [cyan]{model}[/], {steps} steps ({strategy}, "
                  f"{processes} process(es)), state in {state} (Prefect and MLflow embedded unless "
                  "PREFECT_API_URL/MLFLOW_TRACKING_URI)")
    with progress_bar():
        result = run_guarded(run_demo, state, steps=steps, model=model, fresh=fresh, strategy=strategy,
                             processes=processes)
    print_demo_result(result)


def run(
    spec: Path = typer.Argument(..., help="pipeline spec (YAML)"),
    run_key: str | None = typer.Option(None, help="resume or re-run this pipeline run (default: a new run)"),
    retrain: str = typer.Option("always", help="always | on_change: skip training when data, base model and "
                                               "training settings equal the champion's (the spec's retrain wins)"),
) -> None:
    """Run the pipeline for one spec: prepare data, train, evaluate, gate, register."""
    if retrain not in ("always", "on_change"):
        fail(f"--retrain must be always or on_change, got {retrain!r}")
    parsed = load_spec(spec, here=True)  # bad input is refused before anything starts or is written
    key = checked_run_key(run_key)
    _embedded_prefect()
    from prefixflow.flows.pipeline import prefix_pipeline

    result = _keyed_run("run key", f"prefixflow run {spec} --run-key {key}", "this run stops", "finishes it (finished "
                        "work is reused, training resumes from its newest checkpoint)", prefix_pipeline, parsed,
                        run_key=key, retrain=retrain)
    print_run_result(result)


def sweep(
    spec: Path = typer.Argument(..., help="pipeline spec (YAML) with a `sweep:` section"),
    run_key: str | None = typer.Option(None, help="continue this sweep (finished trials are not run again)"),
) -> None:
    """Search the spec's `sweep:` space (Optuna, pruned on validation loss), then evaluate, gate and register the
    best setting like `prefixflow run`."""
    parsed = load_spec(spec, here=True)
    if parsed.sweep is None:
        fail(f"{spec} has no `sweep:` section: add one (docs/pipeline.md, 'Sweeps') or use `prefixflow run`")
    key = checked_run_key(run_key)
    _embedded_prefect()
    from prefixflow.flows.sweep import prefix_sweep

    result = _keyed_run("sweep run key", f"prefixflow sweep {spec} --run-key {key}", "it stops",
                        "continues it (finished trials are kept)", prefix_sweep, parsed, run_key=key)
    print_sweep_result(result, space=list(parsed.sweep.space))


def fleet(
    folder: Path = typer.Argument(..., help="folder of pipeline specs (*.yaml, *.yml), or a fleet file (`defaults:` "
                                            "and `clients:`, docs/fleet.md)"),
    max_concurrent: int = typer.Option(1, min=1, help="training jobs allowed to run at once (a pack is one)"),
    pack: int = typer.Option(PACK_SIZE, min=1, help="at most this many trainings of one base model in one job"),
    no_pack: bool = typer.Option(False, "--no-pack", help="every training in a job of its own"),
    run_key: str | None = typer.Option(None, help="finish this fleet run (finished work is not done again)"),
    output: str = typer.Option("table", "--format", help="table | json (one JSON object on stdout)"),
) -> None:
    """Run the pipeline for every spec in a folder or fleet file, at most N training jobs at a time; trainings of
    one base model that are due together train in one job (a pack), each with its own prefix, data and
    checkpoints."""
    if output not in ("table", "json"):
        fail(f"--format must be table or json, got {output!r}")
    specs = folder_specs(folder, here=True)
    key = checked_run_key(run_key)
    started = time.time()
    _embedded_prefect(on_stderr=output == "json")
    from prefixflow.flows.fleet import fleet_flow

    members = 1 if no_pack else pack
    entries = _keyed_run("run key", f"prefixflow fleet {folder} --run-key {key}", "this fleet stops", "finishes it "
                         "(finished work is reused, trainings resume from their newest checkpoints)",
                         fleet_flow(len(specs), members, max_concurrent), specs,
                         max_concurrent_trainings=max_concurrent, pack=members, run_key=key,
                         on_stderr=output == "json")
    print_fleet(entries, time.time() - started, output)
    if not all(e.ok for e in entries):
        raise typer.Exit(1)


def deploy(
    folder: Path = typer.Argument(..., help="folder of pipeline specs (*.yaml), or a fleet file; each spec becomes a "
                                            "deployment"),
) -> None:
    """Serve one deployment per spec, on its cron schedule (and on new data with ``trigger: on_new_data``), with
    the spec editable in the Prefect UI."""
    specs = folder_specs(folder)
    if settings.prefect_api_url() is None:
        fail('deploy needs a Prefect server: run `prefixflow stack up` and `eval "$(prefixflow stack env)"` '
             "(or set PREFECT_API_URL)")
    try:
        poll_s = settings.watch_interval_s()
    except ValueError as err:
        fail(str(err))
    from prefixflow.flows.deploy import deployment_name, serve_specs, watched_sources

    for s in specs:
        trigger = (f"; runs when new data settles in {', '.join(watched_sources(s))} (polled every {poll_s:g} s)"
                   if s.trigger == "on_new_data" else "")
        console.print(f"deployment prefix-pipeline/{deployment_name(s)}: schedule {s.schedule or 'none (manual)'}"
                      f"{escape(trigger)}")
    serve_specs(specs)
