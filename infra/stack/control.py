"""Bring the stack up and down, and read it: ``stack_up``, ``stack_down``, ``stack_status``, ``stack_env`` and
``running_stack`` (up for the length of a ``with`` block).

Start order is PostgreSQL (with ``database: postgres``) → S3 → MLflow → Prefect, each waited on with a health
check; shutdown is the reverse.
``up`` and ``down`` hold the state folder's lock, so only one runs at a time per folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prefix_core.files import file_lock

from .clients import ensure_client
from .config import SERVICES, StackConfig, StackError, config_file, lock_file, log_file, pid_file
from .credentials import load_credentials
from .health import healthy, port_free, preflight, wait_healthy
from .service_processes import running_pid, start_service, stop_service
from .services import client_env

log = logging.getLogger(__name__)


def _locked(state_dir: Path):
    """One ``up``/``down`` at a time per state folder."""
    return file_lock(lock_file(state_dir))


def _remove_weed_sockets(config: StackConfig) -> None:
    """Drop the unix sockets ``weed`` leaves in the temp folder for this stack's ports."""
    ports = set(config.ports()["s3"])
    for tmp in {tempfile.gettempdir(), "/tmp"}:
        for sock in Path(tmp).glob("seaweedfs-*.sock"):
            tail = sock.stem.rsplit("-", 1)[-1]
            with contextlib.suppress(OSError):
                if tail.isdigit() and int(tail) in ports and sock.lstat().st_uid == os.getuid():
                    sock.unlink()


def bring_up(config: StackConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Start what is not running; returns (client env, {service: "started" | "running"})."""
    state = config.state_dir
    with _locked(state):
        running = {n: pid for n in SERVICES if (pid := running_pid(state, n, reap=True)) is not None}
        if running and config_file(state).exists():
            stored = StackConfig.load(state)
            differs = [f.name for f in dataclasses.fields(config)
                       if f.name not in ("state_dir", "start_timeout")
                       and getattr(stored, f.name) != getattr(config, f.name)]
            if differs:
                raise StackError(f"a stack is already running in {state} with other settings ({', '.join(differs)} "
                                 "differ): run `prefixflow stack down` first, or use another state folder")
        for sub in ("logs", "run"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        creds = load_credentials(state, create=True)
        actions: dict[str, str] = {}
        for name, pid in list(running.items()):
            if healthy(config, name):
                actions[name] = "running"
            else:  # alive but not answering: restart it
                log.warning("%s (pid %d) is running but not healthy; restarting it", name, pid)
                stop_service(pid, name, grace=10.0)
                pid_file(state, name).unlink(missing_ok=True)
                del running[name]
        to_start = [n for n in config.services() if n not in actions]
        preflight(config, to_start)
        config_file(state).write_text(config.to_json() + "\n")
        started: list[tuple[str, int]] = []
        try:
            for name in to_start:
                pid = start_service(config, name, creds)
                started.append((name, pid))
                wait_healthy(config, name, pid, creds)
                actions[name] = "started"
        except BaseException:
            for name, pid in reversed(started):
                stop_service(pid, name, grace=10.0)
                pid_file(state, name).unlink(missing_ok=True)
            if any(n == "s3" for n, _ in started):
                _remove_weed_sockets(config)
            raise
        return client_env(config, creds), {n: actions[n] for n in config.services()}


def stack_up(config: StackConfig) -> dict[str, str]:
    """Start the stack (S3 → MLflow → Prefect) and return the client env; a no-op if it is already up.

    Raises StackError (after stopping what this call started) when a port is taken, ``weed`` is missing
    or a service does not become healthy within ``config.start_timeout``.
    """
    env, actions = bring_up(config)
    if all(a == "running" for a in actions.values()):
        log.info("stack in %s is already running; nothing to do", config.state_dir)
    return env


def stack_down(state_dir: Path, grace: float = 15.0) -> None:
    """Stop Prefect → MLflow → S3 (SIGTERM to each process group, SIGKILL after ``grace`` s); idempotent."""
    state = Path(state_dir).expanduser().resolve()
    if not state.exists():
        return
    with _locked(state):
        try:
            config: StackConfig | None = StackConfig.load(state)
        except StackError:
            config = None
        for name in reversed(SERVICES):
            pid = running_pid(state, name, reap=True)
            if pid is not None:
                log.info("stopping %s (pid %d)", name, pid)
                stop_service(pid, name, grace)
            pid_file(state, name).unlink(missing_ok=True)
        if config is not None:
            _remove_weed_sockets(config)
            busy = [p for ps in config.ports().values() for p in ps]
            deadline = time.monotonic() + 5.0
            while busy and time.monotonic() < deadline:
                busy = [p for p in busy if not port_free(config.host, p)]
                if busy:
                    time.sleep(0.2)
            if busy:
                log.warning("ports %s are still in use after stopping the stack", busy)


def stack_status(state_dir: Path) -> dict[str, dict]:
    """Per service: ``running``, ``healthy``, ``pid``, ``api`` (client URL), ``ui`` (web UI address) and ``log``."""
    state = Path(state_dir).expanduser().resolve()
    try:
        config = StackConfig.load(state)
    except StackError:
        config = StackConfig(state_dir=state)
    urls, ui_urls = config.urls(), config.ui_urls()
    status: dict[str, dict] = {}
    for name in config.services():
        pid = running_pid(state, name)
        ok = pid is not None and healthy(config, name)
        status[name] = {"running": pid is not None, "healthy": ok, "pid": pid, "api": urls[name],
                        "ui": ui_urls[name], "log": str(log_file(state, name))}
    return status


def stack_env(state_dir: Path, client: str | None = None) -> dict[str, str]:
    """The client env of the stack in ``state_dir`` (from its stored config and credentials): the admin's, or
    with ``client`` (a stack with ``auth``, running) that client's, made on first use (``clients``)."""
    state = Path(state_dir).expanduser().resolve()
    config = StackConfig.load(state)
    if client is None:
        return client_env(config, load_credentials(state, create=False))
    with _locked(state):  # one client change at a time, and not during up/down
        down = [n for n in ("s3", "mlflow") if running_pid(state, n) is None or not healthy(config, n)]
        if config.auth and down:
            raise StackError(f"{' and '.join(down)} of the stack in {state} not running: making client {client!r} "
                             "needs them; run `prefixflow stack up` first")
        try:
            ensure_client(config, client)
        except StackError:
            raise
        except Exception as err:  # a server's refusal or failure: the client is left to be made by a rerun
            raise StackError(f"could not make client {client!r}: {type(err).__name__}: {err}. Rerun the command "
                             f"(it picks up where it stopped); the servers' logs are in {state / 'logs'}") from err
    return client_env(config, load_credentials(state, create=False), client)


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[dict[str, str]]:
    """Bring the stack up, yield its client env, and always tear it down afterwards."""
    try:
        yield stack_up(config)
    finally:
        stack_down(config.state_dir)
