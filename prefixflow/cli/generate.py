"""``prefixflow generate``: completions of prompts with a prefix, or with the bare base for comparison
(:func:`prefixflow.services.generation.generate_texts`).

Deferred on purpose: the precision decision and the generation service load torch and transformers; the command
imports them when it runs, so that ``prefixflow --help`` stays fast.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from prefix_core.errors import PrefixError
from prefixflow.cli.guard import fail
from prefixflow.cli.render import console, stderr


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
    from prefix_core.precision import decide
    from prefixflow.services.generation import generate_texts

    try:
        chosen = decide(precision, "cpu")
    except ValueError as err:
        fail(f"--precision: {err}")
    if chosen.warning:
        stderr.print(f"[yellow]warning:[/] {escape(chosen.warning)}")
    try:
        texts = generate_texts(prompt, prefix=prefix, model=model, dtype=chosen.dtype, max_new_tokens=max_new_tokens,
                               template=template)
    except PrefixError as err:
        fail(str(err))
    for p, t in zip(prompt, texts, strict=True):
        console.print(f"[dim]{escape(p)}[/]\n{escape(t.strip())}\n")
