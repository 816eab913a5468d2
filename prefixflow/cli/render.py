"""What the commands print: the two consoles, the tables of results, and the training progress bar.

Results are rendered by their kind, each by its own function (the command that got the result calls the one
for it): :func:`print_run_result` for a pipeline run, :func:`print_sweep_result` for a sweep (a ``SweepResult``
is a ``RunResult`` with trials); the part they share (metrics, gate, registration) is :func:`_print_evaluation`.

Deferred on purpose: the training events (``prefixflow.launch.training`` loads torch and transformers) are
imported by :func:`progress_bar`, when a command trains, so that ``prefixflow --help`` stays fast.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

if TYPE_CHECKING:  # for annotations only: these modules load Prefect, torch and transformers
    from prefixflow.flows.demo import DemoResult
    from prefixflow.flows.fleet import FleetEntry
    from prefixflow.services.evaluation import EvalReport
    from prefixflow.services.registration import Registration
    from prefixflow.services.run import RunResult, SweepResult

console = Console()
stderr = Console(stderr=True, soft_wrap=True)


@contextmanager
def progress_bar(on_stderr: bool = False):
    """A rich progress bar fed by the events of every training started within the block (``on_stderr``: drawn on
    stderr, when stdout carries a machine-readable result)."""
    from prefixflow.launch.training import watching

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                        TextColumn("{task.fields[validation]}"), TextColumn("{task.fields[eta]}"),
                        console=stderr if on_stderr else console, transient=False)
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


def metrics_table(report: EvalReport) -> Table:
    table = Table(title="test metrics")
    metrics = list(next(iter(report.metrics.values())))
    table.add_column("system")
    for m in metrics:
        table.add_column(m, justify="right")
    for system, values in report.metrics.items():
        label = f"champion (v{report.champion_version})" if system == "champion" else system
        table.add_row(label, *(f"{values[m]:.2f}" for m in metrics))
    return table


def _print_evaluation(report: EvalReport, reg: Registration) -> None:
    """The metrics, the gate's verdict and the registration: the tail of a pipeline run and of a sweep."""
    console.print(metrics_table(report))
    verdict = "[green]passed[/]" if report.gate.passed else "[yellow]refused[/]"
    console.print(f"gate {verdict}: {escape(report.gate.reason)}")
    console.print(f"registered [bold]{reg.name}[/] v{reg.version} (@candidate); @champion = v{reg.champion or '-'}, "
                  f"@previous = v{reg.previous or '-'}")
    if reg.note:
        console.print(f"[yellow]note:[/] {escape(reg.note)}")


def print_run_result(result: RunResult) -> None:
    """A pipeline run: unchanged (nothing trained), or its evaluation, registration and where the time went."""
    t = result.timings
    if result.outcome == "unchanged":
        console.print(f"[bold]unchanged[/]: {escape(result.unchanged.reason)}; @champion stays "
                      f"v{result.unchanged.version} (prepared data in {t['prepare']:.1f} s)")
        return
    _print_evaluation(result.report, result.registration)
    if t["orchestration"] < 0:  # results reused from the earlier run of this run key carry that run's durations
        console.print(f"time: total {t['total']:.0f} s, reusing the finished run (it trained for {t['train']:.1f} s "
                      f"and evaluated for {t['evaluate']:.1f} s); MLflow run: {escape(result.mlflow_link)}")
        return
    console.print(f"time: total {t['total']:.0f} s = prepare {t['prepare']:.1f} + train {t['train']:.1f} + "
                  f"evaluate {t['evaluate']:.1f} + orchestration {t['orchestration']:.1f} "
                  f"({t['orchestration'] / t['total']:.1%}); MLflow run: {escape(result.mlflow_link)}")


def print_sweep_result(result: SweepResult, space: list[str]) -> None:
    """A sweep: its trials (``space``: the swept parameters, one column each), then the best trial's evaluation
    and registration, and the total time."""
    if result.recovered:
        console.print(f"continued the sweep: trials {result.recovered} had been left running and were queued again")
    table = Table(title=f"sweep {result.client}/{result.task}: {len(result.trials)} trials")
    for col in ("trial", "state", "validation loss", "steps", *space):
        table.add_column(col)
    for t in result.trials:
        table.add_row(f"{t.number}{' (best)' if t.number == result.best.number else ''}", t.state,
                      "-" if t.value is None else f"{t.value:.4f}", str(t.steps or "-"),
                      *(escape(str(t.params.get(k, "-"))) for k in space))
    console.print(table)
    _print_evaluation(result.report, result.registration)
    console.print(f"time: total {result.timings['total']:.0f} s; MLflow run: {escape(result.mlflow_link)}")


def print_demo_result(result: DemoResult) -> None:
    """The demo's pipeline run, then the held-out records generated without and with the pulled prefix."""
    print_run_result(result.pipeline)
    table = Table(title=f"held-out records: greedy generations (prefix pulled from @{result.pulled_alias})",
                  show_lines=True)
    for col in ("record", "no prefix", "with prefix", "reference"):
        table.add_column(col, overflow="fold")
    for row in result.rows[:6]:
        table.add_row(*(escape(cell) for cell in row))  # records contain [brackets]: not markup
    console.print(table)
    console.print(f"exact match on {len(result.rows)} held-out records: no prefix {result.exact_before:.0%}, with "
                  f"the pulled prefix [bold green]{result.exact_after:.0%}[/]; prefix pulled to {result.pulled}")


def fleet_summary(entries: list[FleetEntry], seconds: float) -> str:
    """One line: how many clients, how each ended, the wall time and the time per client."""
    counts = {"registered": 0, "unchanged": 0, "failed": 0}
    for e in entries:
        counts[e.outcome if e.ok and e.outcome in counts else "failed"] += 1
    per = seconds / max(len(entries), 1)
    return (f"fleet: {len(entries)} clients: {counts['registered']} registered, {counts['unchanged']} unchanged, "
            f"{counts['failed']} failed in {seconds:.0f} s ({per:.1f} s per client)")


def print_fleet(entries: list[FleetEntry], seconds: float, fmt: str = "table") -> None:
    """One row per spec of a fleet run (its outcome, version, champion, gate and metrics or error), then the summary
    line; ``fmt="json"``: one JSON object with the rows and the summary instead (nothing else on stdout)."""
    if fmt == "json":
        payload = {"summary": fleet_summary(entries, seconds), "seconds": round(seconds, 3),
                   "entries": [e.model_dump(mode="json") for e in entries]}
        print(json.dumps(payload, indent=2))
        return
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
    console.print(escape(fleet_summary(entries, seconds)))
