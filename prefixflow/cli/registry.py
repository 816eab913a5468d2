"""The registry commands: ``pull``, ``promote`` and ``rollback`` (registered prefixes and their aliases).

Deferred on purpose: ``prefixflow.services.registry`` loads MLflow, torch and transformers; each command imports
it when it runs, so that ``prefixflow --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from prefixflow.cli.guard import run_guarded
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
                                        "(or an alias, e.g. acme/e2e@candidate)"),
) -> None:
    """Make a version the @champion; the old champion becomes @previous."""
    from prefixflow.services import registry

    mv = run_guarded(registry.resolve, ref)
    old, new = registry.promote(mv.name, mv.version)
    console.print(f"{mv.name}: @champion v{old or '-'} -> v{new}" + (f"; @previous = v{old}" if old else ""))


def rollback(
    name: str = typer.Argument(..., help="registered model (CLIENT-TASK) or CLIENT/TASK"),
) -> None:
    """Swap @champion and @previous (run again to undo)."""
    from prefixflow.services import registry

    full = name.replace("/", "-")
    old, new = run_guarded(registry.rollback, full)
    console.print(f"{full}: @champion v{old} -> v{new}; @previous = v{old}")
