"""The ``prefixflow`` command line."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(help="prefixflow: train, evaluate, register and serve prefixes on frozen LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
errors = Console(stderr=True, soft_wrap=True)


@app.callback()
def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command()
def demo(
    steps: int = typer.Option(150, min=1, help="training steps"),
    state: Path = typer.Option(Path("state/demo"), help="folder for checkpoints and the prefix"),
    model: str = typer.Option("smollm2-135m", help="base model: embedded name, local folder or HF id"),
) -> None:
    """Train a prefix for a generated task on the embedded model; show generations before/after."""
    from prefix_core import PrefixError

    from .demo import run_demo

    console.print(f"[bold]prefixflow demo[/]: base model [cyan]{model}[/], {steps} steps, state in {state}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task("training", total=steps, info="")

        def on_event(event: dict) -> None:
            if event["event"] == "step":
                info = f"loss {event['loss']:.3f}  {event['tokens_per_s']:.0f} tok/s"
                progress.update(task, completed=event["step"], info=info)
                if not console.is_terminal:  # logs and CI: a plain line instead of a live bar
                    progress.console.print(f"step {event['step']}/{steps}: {info}, eta {event['eta_s']:.0f} s")
            elif event["event"] == "eval":
                progress.console.print(f"step {event['step']}: eval loss {event['eval_loss']:.3f}")
            elif event["event"] == "resume":
                progress.console.print(f"resumed from {event['path']}")

        try:
            result = run_demo(state, steps=steps, model_name=model, on_event=on_event)
        except PrefixError as err:
            _fail(str(err))
    table = Table(title="held-out records: greedy generations", show_lines=True)
    for col in ("record", "no prefix", "with prefix", "reference"):
        table.add_column(col, overflow="fold")
    for row in result.rows[:6]:
        table.add_row(*(escape(cell) for cell in row))  # records contain [brackets]: not markup
    console.print(table)
    console.print(
        f"exact match on {len(result.rows)} held-out records: no prefix {result.exact_before:.0%}, "
        f"with prefix [bold green]{result.exact_after:.0%}[/]; training {result.train_seconds:.0f} s; "
        f"trained {result.trainable_share:.2%} of the base's size (embedding + MLP), folded prefix "
        f"{result.folded_share:.3%} of it; prefix saved to {result.artifact_dir}"
    )


@app.command()
def generate(
    prompt: list[str] = typer.Argument(..., help="one or more prompts"),
    prefix: Path | None = typer.Option(None, help="prefix artifact folder; omit to use the bare base model"),
    model: str | None = typer.Option(None, help="base model (default: the one recorded in the prefix)"),
    template: bool = typer.Option(True, help="render prompts through the prefix's prompt template"),
    max_new_tokens: int = typer.Option(48, min=1),
) -> None:
    """Generate with a prefix (or none, for comparison)."""
    from prefix_core import MultiPrefixGenerator, PrefixArtifact, PrefixError, load_base_model

    try:
        art = PrefixArtifact.load(prefix) if prefix else None
        name = model or (art.manifest["base_model"]["name"] if art else "smollm2-135m")
        base, tok = load_base_model(name)
        gen = MultiPrefixGenerator(base, tok, {"p": art} if art else {})
        texts = gen.generate([("p" if art else None, p) for p in prompt], max_new_tokens=max_new_tokens,
                             apply_template=template and art is not None, do_sample=False)
    except PrefixError as err:
        _fail(str(err))
    for p, t in zip(prompt, texts, strict=True):
        console.print(f"[dim]{p}[/]\n{t.strip()}\n")


if __name__ == "__main__":
    app()
