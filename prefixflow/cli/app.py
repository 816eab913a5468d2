"""The ``prefixflow`` command line: the typer app, its setup, and every command registered in the order
``--help`` lists them. The commands live in their modules: :mod:`~prefixflow.cli.pipeline` (demo, run, sweep,
fleet, deploy), :mod:`~prefixflow.cli.doctor`, :mod:`~prefixflow.cli.registry` (pull, promote, rollback),
:mod:`~prefixflow.cli.generate`, :mod:`~prefixflow.cli.serving` (serve, keys), :mod:`~prefixflow.cli.usage`,
:mod:`~prefixflow.cli.canary` (canary status), and
``stack`` in
:mod:`prefixflow.infra.stack`; how they end (exit codes) is :mod:`~prefixflow.cli.guard`, what they print
:mod:`~prefixflow.cli.render`.

Without ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` everything runs embedded under the state folder
(``$PREFIXFLOW_HOME``, default ``./state``): an ephemeral Prefect API and a local MLflow store. With
them set (``eval "$(prefixflow stack env)"``) the same commands use the servers.

Deferred on purpose: transformers (its logging is quietened in :func:`_setup`), imported only when a command
runs, so that ``prefixflow --help`` stays fast.
"""

from __future__ import annotations

import typer

from prefixflow import processes, settings
from prefixflow.cli import canary, doctor, generate, pipeline, registry, serving, usage
from prefixflow.flows.embedded import stop_on_termination, stopping
from prefixflow.infra import stack


class _App(typer.Typer):
    """The typer app; as a console script, a command exits as soon as its exit handlers have run (see
    :func:`prefixflow.processes.exit_now`), without the interpreter's slow teardown; after a stop signal without
    waiting for its threads, and stopping any child left. (typer's test runner calls the click command, not this.)"""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                processes.exit_now(exc.code or 0, wait_for_threads=not stopping(), stop_children=stopping())
            raise


app = _App(help="prefixflow: train, evaluate, register and serve prefixes on frozen LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(stack.app, name="stack", help="the local server stack: Prefect, MLflow, S3 (SeaweedFS) and PostgreSQL")


@app.callback()
def _setup() -> None:
    settings.apply_process_defaults()
    stop_on_termination()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


COMMANDS = (pipeline.demo, doctor.doctor, pipeline.run, pipeline.sweep, pipeline.fleet, pipeline.deploy,
            registry.pull, generate.generate, serving.serve, registry.promote, registry.rollback,
            usage.usage)  # --help's order
for _command in COMMANDS:
    app.command()(_command)
app.add_typer(serving.keys_app, name="keys")
app.add_typer(canary.canary_app, name="canary")
