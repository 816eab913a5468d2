"""The test harness: wait for an observable condition instead of sleeping, one rule for tests that need an
external tool, one snapshot of the MLflow registry, and one ``World`` for what a test module works against."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import pytest

from support import test_packages

if TYPE_CHECKING:
    from prefixflow.infra.stack import StackConfig

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.25,
               message: str | Callable[[], str] = "the condition was not met") -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return that. After
    ``timeout`` s raise AssertionError with ``message`` (a callable is called then, e.g. to read a log) and the
    predicate's last value. Exceptions of the predicate (an assert that a process still runs) propagate."""
    __tracebackhide__ = True  # pytest shows the caller's line
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout:g} s: {text} (last value: {value!r})")
        time.sleep(interval)


# --- external tools ---------------------------------------------------------------------------------------------
def require(tool: str) -> str | None:
    """Skip the test where ``tool`` is missing, saying how to get it; fail instead when ``CI`` is set (CI installs
    every tool: a missing one is a broken setup, not a reason to skip). ``tool``: a group of
    tests/support/test_packages.py (``slurm``), ``chromium``, ``root`` (the tests run as root) or any program.
    Returns the program's path for a program."""
    group = "browser" if tool == "chromium" else tool
    if tool == "root":
        problem = None if os.geteuid() == 0 else "this test needs root: run the tests as root (CI does)"
    elif group in test_packages.GROUPS:
        missing = test_packages.missing(group)
        problem = (f"{', '.join(missing)} not installed: as root run "
                   f"`python tests/support/test_packages.py install {group}`") if missing else None
    else:
        problem = None if test_packages.binary(tool) else f"{tool} is not installed (not on PATH)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI is set: a missing tool is a failure there)", pytrace=False)
        pytest.skip(problem)
    return None if tool == "root" or tool in test_packages.GROUPS else test_packages.binary(tool)


# --- the registry -----------------------------------------------------------------------------------------------
class Version(NamedTuple):
    version: str
    status: str
    source: str
    run_id: str
    tags: dict[str, str]


class Model(NamedTuple):
    aliases: dict[str, str]
    tags: dict[str, str]
    versions: list[Version]  # by version number


class Run(NamedTuple):
    lifecycle_stage: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]


def registry_snapshot(client, names: Iterable[str] | None = None, runs: bool = True) -> dict[str, dict]:
    """What a test compares before and after, through ``client`` (an ``MlflowClient``): ``{"models": {name:
    Model}}`` for every registered model (or those of ``names`` that exist) and, with ``runs``, ``{"runs":
    {run_id: Run}}`` for the active runs of every experiment the client may search."""
    found = client.search_registered_models() if names is None else [
        m for n in names for m in client.search_registered_models(f"name = '{n}'")]
    models = {}
    for m in found:
        versions = [Version(str(v.version), v.status, v.source, v.run_id, dict(v.tags))
                    for v in client.search_model_versions(f"name = '{m.name}'")]
        models[m.name] = Model({a: str(v) for a, v in m.aliases.items()}, dict(m.tags),
                               sorted(versions, key=lambda v: int(v.version)))
    out: dict[str, dict] = {"models": models}
    if runs:
        out["runs"] = {r.info.run_id: Run(r.info.lifecycle_stage, r.info.status, dict(r.data.params),
                                          dict(r.data.tags))
                       for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    return out


# --- what a test module works against ---------------------------------------------------------------------------
@dataclass
class World:
    """A test module's world, made once by its fixture: a scratch ``root``, the ``env`` its commands run with
    (its own state folder as ``PREFIXFLOW_HOME``), the live stack's ``config`` where there is one, and what the
    fixture made. Fields a module does not use stay unset."""

    root: Path
    env: dict[str, str]
    config: StackConfig | None = None
    model: Path | None = None  # a tiny base model folder
    data: Path | None = None  # task data (JSON lines)
    other_model: Path | None = None  # a base of another shape
    prefix: Path | None = None  # a registered prefix, downloaded
    spec: Path | None = None  # the spec the fixture ran
    run_id: str | None = None  # that run's MLflow run
    keys: dict[str, str] = field(default_factory=dict)  # API keys by client; "file": the keys file
    clients: dict[str, dict[str, str]] = field(default_factory=dict)  # each client's env (a stack with --auth)

    @property
    def home(self) -> Path:
        """The state folder (``PREFIXFLOW_HOME``)."""
        return Path(self.env["PREFIXFLOW_HOME"])
