"""How a command ends: the exit-code policy, and the checks of its input that run before anything starts.

Exit 2: the input is wrong (a spec, an argument, a reference); one message says what and how to fix it.
Exit 1: a service did not answer, the disk is full, or the run failed otherwise; one message says which and, for
a pipeline run, the command that finishes it. Exit 128+N (130 for Ctrl-C): stopped by signal N. No traceback for
any of these: Prefect's logs of user errors lose theirs (:class:`_UserErrorsWithoutTraceback`).

Deferred on purpose: the data checks of :func:`load_spec` (``prefixflow.services.preparation`` loads torch and
transformers), so that ``prefixflow --help`` and the commands that refuse their input stay fast.
"""

from __future__ import annotations

import logging
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

import typer
from rich.markup import escape

from prefix_core.errors import PrefixError
from prefixflow.cli.render import stderr
from prefixflow.services import boundary, errors, health
from prefixflow.services.fleet_file import is_fleet_file, load_fleet_file
from prefixflow.services.spec import PipelineSpec, SpecError, check_fleet
from prefixflow.services.spec import load_spec as parse_spec_file

T = TypeVar("T")
RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    stderr.print(f"[bold red]error:[/] {escape(message)}")
    logging.getLogger("prefect").setLevel(logging.WARNING)  # the message stays the last line ("Stopping
    raise typer.Exit(code)                                  # temporary server" is logged at exit)


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs failed runs with their traceback; for bad input, a server that did not answer or a full disk
    the message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (errors.is_user_error(exc) or errors.outage(exc)):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())


def run_guarded(fn: Callable[..., T], *args, resume: str | None = None, **kwargs) -> T:
    """Run a pipeline call; input errors end in one message (exit 2); a server that cannot be reached or a full
    disk in one saying which and what to do (exit 1); others in a one-line summary (exit 1). ``resume``: the
    command that finishes the run, added to the messages of failures that a rerun can get past."""
    _quiet_user_errors()
    try:
        with boundary.prefect_calls():
            return fn(*args, **kwargs)
    except Exception as exc:
        if errors.is_user_error(exc):
            fail(str(exc))
        then = f"; then `{resume}` finishes this run (finished work is reused)" if resume else ""
        cause = _which_service(exc)
        if cause:
            fail(f"{cause}{then}", code=1)
        fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
             f"(the Prefect logs above have the details){then}", code=1)


def _which_service(exc: Exception) -> str | None:
    """The service (or the disk) that failed, as the error model says; where it cannot tell (an artifact store
    behind MLflow, a failure seen through the embedded Prefect API's database) the health checks run now."""
    found = errors.unavailable(exc)
    if isinstance(found, errors.ArtifactStoreFailed):
        return health.artifact_store_cause(found)
    return errors.outage(exc) or health.state_disk_full()


@contextmanager
def explain_termination(resume: str) -> Iterator[None]:
    """One line when the command is stopped by a signal (SIGTERM, SIGHUP: SystemExit 128+N; Ctrl-C)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) else 130
        if isinstance(code, int) and code > 128:
            name = "Ctrl-C" if code == 130 else signal.Signals(code - 128).name
            stderr.print(f"[bold red]stopped[/] by {name}: training and the embedded services were stopped and the "
                         f"run was marked crashed; `{escape(resume)}` finishes it")
            raise typer.Exit(code) from None
        raise


def checked_run_key(given: str | None) -> str:
    """The run key: ``given`` (checked: it names folders and tags) or a new one."""
    if given is None:
        return uuid.uuid4().hex[:12]
    if not RUN_KEY.fullmatch(given):
        fail(f"--run-key {given!r} is not a run key: use letters, digits, '.', '_' and '-' (at most 64), as "
             "printed by an earlier run")
    return given


def load_spec(path: Path, here: bool = False) -> PipelineSpec:
    """The parsed spec, or exit 2 with the reason. ``here``: the run happens on this machine, so the base model
    folder and local data files it names must exist (checked without loading them)."""
    try:
        parsed = parse_spec_file(path)
    except SpecError as err:  # names the file itself
        fail(str(err))
    if here:
        _preflight(parsed, str(path))
    return parsed


def folder_specs(folder: Path, here: bool = False) -> list[PipelineSpec]:
    """Every spec of a folder (:func:`load_spec`) or of a fleet file (services.fleet_file), each (client, task) at
    most once, or exit 2 saying why."""
    if is_fleet_file(folder):
        try:
            specs = load_fleet_file(folder)
            if here:
                for i, spec in enumerate(specs):
                    _preflight(spec, f"{folder}: clients[{i}] ({spec.client}/{spec.task})")
        except SpecError as err:
            fail(str(err))
        return specs
    specs = [load_spec(p, here) for p in _spec_files(folder)]
    try:
        check_fleet(specs)
    except SpecError as err:
        fail(str(err))
    return specs


def _preflight(spec: PipelineSpec, where: str) -> None:
    from prefixflow.services.preparation import preflight

    try:
        preflight(spec)
    except PrefixError as err:
        fail(f"{where}: {err}")


def _spec_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        fail(f"{folder} is not a folder of specs nor a fleet file")
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        fail(f"no *.yaml specs in {folder}")
    return files
