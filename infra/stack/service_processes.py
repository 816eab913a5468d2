"""The stack's service processes: start one as the leader of its own process group (``start_service``), find
the live one behind a pid file (``running_pid``) and stop a whole group (``stop_service``).

Process groups themselves are ``prefixflow.processes``; this module adds the stack's parts: the pid files,
the environ-marker check that guards against a recycled pid, and the ``Popen`` of each service this process
started (so it is reaped and its exit code is known).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from prefixflow import processes

from .config import StackConfig, StackError, log_file, pid_file
from .services import marker_entry, service_command

log = logging.getLogger(__name__)

_CHILDREN: dict[int, subprocess.Popen] = {}  # services started by this process, so they can be reaped


def service_alive(pid: int) -> bool:
    """``pid`` is running (not a zombie; a service this process started is polled, keeping its exit code)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    return processes.alive(pid)


def exit_code(pid: int) -> int | None:
    """The exit code of service ``pid`` if this process started it and it has been seen to exit."""
    child = _CHILDREN.get(pid)
    return None if child is None else child.returncode


def group_alive(pgid: int) -> bool:
    """Any live process left in the process group of service leader ``pgid``."""
    return processes.group_alive(pgid, proc=_CHILDREN.get(pgid))


def _is_ours(pid: int, state_dir: Path, name: str) -> bool:
    """The process carries this stack's marker (guards against a recycled pid)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (not Linux): trust the pid
    except OSError:
        return True
    return marker_entry(state_dir, name).encode() in environ


def running_pid(state_dir: Path, name: str, reap: bool = False) -> int | None:
    """The pid of a live service ``name``; a stale pid file (dead process) is removed.

    With ``reap``, what is left of a service whose leader died (e.g. MLflow's uvicorn child) is stopped too:
    Linux does not reuse a pid while a process group of that id exists, so those processes are ours.
    """
    path = pid_file(state_dir, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and service_alive(pid) and _is_ours(pid, state_dir, name):
        return pid
    if path.exists():
        if reap and pid is not None and not service_alive(pid) and group_alive(pid):
            log.warning("%s (pid %d) died but left processes behind; stopping them", name, pid)
            stop_service(pid, name, grace=5.0)
        log.info("removing stale pid file %s", path)
        path.unlink(missing_ok=True)
    return None


def stop_service(pgid: int, name: str, grace: float) -> None:
    """SIGTERM (PostgreSQL: SIGINT) the process group of service ``name``, wait ``grace`` seconds, then SIGKILL it
    (warning first).
    A group of another user is a StackError."""

    def warn() -> None:
        log.warning("%s (pid %d) did not stop within %.0f s; sending SIGKILL", name, pgid, grace)

    # PostgreSQL: SIGINT is its fast shutdown (SIGTERM would wait for every client to disconnect)
    first = signal.SIGINT if name == "postgres" else signal.SIGTERM
    try:
        processes.stop_group(pgid, grace, proc=_CHILDREN.get(pgid), on_escalate=warn, first=first)
    except PermissionError as err:
        raise StackError(f"not allowed to stop {name} (pid {pgid}): {err}; stop it as its owner") from None
    child = _CHILDREN.pop(pgid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def start_service(config: StackConfig, name: str, creds: dict[str, str]) -> int:
    """Launch service ``name`` in its own session, logging to ``logs/NAME.log`` and writing ``run/NAME.pid``;
    returns its pid (= its process group id)."""
    cmd, env, workdir = service_command(config, name, creds)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = log_file(config.state_dir, name)
    with open(log_path, "a") as logf:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        logf.write(f"\n=== {stamp} prefixflow stack: {shlex.join(cmd)}\n")
        logf.flush()
        proc = processes.start(cmd, cwd=workdir, env=env, stdout=logf, stderr=subprocess.STDOUT)
    _CHILDREN[proc.pid] = proc
    pid_file(config.state_dir, name).write_text(f"{proc.pid}\n")
    log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
    return proc.pid
