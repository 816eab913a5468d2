"""The registry commands: ``pull``, ``promote`` and ``rollback`` (registered prefixes, their aliases and canaries).

Deferred on purpose: ``prefixflow.services.registry`` loads MLflow, torch and transformers; each command imports
it when it runs, so that ``prefixflow --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from prefixflow.cli.guard import fail, run_guarded
from prefixflow.cli.render import console


def pull(
    ref: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, CLIENT/TASK@ALIAS"),
    out: Path = typer.Option(..., help="folder to write the prefix to (replaced atomically)"),
) -> None:
    """Download a registered prefix and check it loads."""
    from prefixflow.services import registry

    mv = run_guarded(registry.resolve, ref)
    path = run_guarded(registry.download_version, mv, out)
    console.print(f"pulled {mv.name} v{mv.version} ({escape(ref)}) to {path}")


def promote(
    ref: str = typer.Argument(..., help="the version to serve: models:/NAME/VERSION or CLIENT/TASK/VERSION "
                                        "(or an alias, e.g. acme/e2e@candidate); with --finish: CLIENT/TASK"),
    canary: float | None = typer.Option(None, "--canary", help="first serve it to this percentage of the requests "
                                        "that name @champion (@canary); --finish ends it, rollback aborts it"),
    finish: bool = typer.Option(False, "--finish", help="make the active canary the @champion"),
) -> None:
    """Make a version the @champion (the old champion becomes @previous), or start or finish a canary of it."""
    from prefixflow.services import canary as canaries
    from prefixflow.services import registry

    if finish:
        if canary is not None:
            fail("--finish ends the active canary and --canary starts one: give one of them")
        full = ref.replace("/", "-")
        old, new = run_guarded(canaries.finish, full)
        console.print(f"{full}: canary v{new} finished: @champion v{old or '-'} -> v{new}"
                      + (f"; @previous = v{old}" if old else ""))
        return
    mv = run_guarded(registry.resolve, ref)
    if canary is not None:
        started = run_guarded(canaries.start, mv.name, mv.version, canary)
        console.print(f"{mv.name}: @canary v{started.version} serves {started.share:g}% of the requests naming "
                      f"@champion (v{started.champion}); `prefixflow promote {mv.name} --finish` "
                      "makes it the champion, `prefixflow rollback` ends it")
        return
    active = run_guarded(canaries.current, mv.name)
    if active is not None and active.version == str(mv.version):  # promoting the canary finishes it
        old, new = run_guarded(canaries.finish, mv.name)
    else:
        old, new = registry.promote(mv.name, mv.version)
    console.print(f"{mv.name}: @champion v{old or '-'} -> v{new}" + (f"; @previous = v{old}" if old else ""))


def rollback(
    name: str = typer.Argument(..., help="registered model (CLIENT-TASK) or CLIENT/TASK"),
) -> None:
    """Swap @champion and @previous (run again to undo); during a canary, end the canary and change nothing else."""
    from prefixflow.services import canary as canaries

    full = name.replace("/", "-")
    ended, swapped = run_guarded(canaries.rollback, full)
    if ended is not None:
        console.print(f"{full}: canary v{ended.version} ended; @champion stays v{ended.champion}")
        return
    old, new = swapped
    console.print(f"{full}: @champion v{old} -> v{new}; @previous = v{old}")
