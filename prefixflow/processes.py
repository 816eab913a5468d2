"""Process groups: start a command as the leader of a new session (its own process group), signal the
whole group, wait for it with a deadline, and list the processes left over.

One helper for everything that runs a tree of processes: the training launcher (``launch.gang``), the
local server stack (``infra.stack``), the Slurm test cluster and the tests. Liveness comes from /proc
(zombies count as gone); where there is no /proc, from ``killpg(pgid, 0)``. A group leader that this
process started is reaped while waiting (through its ``Popen`` when one is given, so its exit code is
kept), so a dead child never reads as alive.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TERM_GRACE_S = 10.0  # SIGTERM -> SIGKILL
KILL_WAIT_S = 10.0  # after SIGKILL: how long to wait for the group to disappear
POLL_S = 0.05


def start(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv, start_new_session=True, ...)``: the child leads a new session and process
    group whose id is its pid (stdin is /dev/null unless given)."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(argv, start_new_session=True, **popen_kwargs)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after "pid (comm)": state, ppid, pgrp, ...; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(one-letter state, process group id) of ``pid`` from /proc, or None if it is gone."""
    rest = _stat_fields(pid)
    return None if rest is None else (rest[0], int(rest[2]))


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    stat = proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (arguments joined by spaces), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _reap(pgid: int, proc: subprocess.Popen | None) -> None:
    """Collect the leader's exit status if it is our child (else a zombie leader keeps the group 'alive')."""
    if proc is not None:
        proc.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)


def group_pids(pgid: int) -> list[int] | None:
    """Live (non-zombie) processes of group ``pgid``; None where there is no /proc to tell."""
    if not Path("/proc/self/stat").exists():
        return None
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def group_alive(pgid: int, proc: subprocess.Popen | None = None) -> bool:
    """Any live process left in group ``pgid`` (``proc``: its leader, if this process started it)."""
    _reap(pgid, proc)
    pids = group_pids(pgid)
    if pids is not None:
        return bool(pids)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to every process of group ``pgid``; False if the group is gone. PermissionError
    (a group of another user) propagates."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pgid: int, timeout_s: float, proc: subprocess.Popen | None = None) -> bool:
    """Wait up to ``timeout_s`` for group ``pgid`` to be gone; True if it is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pgid, proc):
            return True
        time.sleep(POLL_S)
    return not group_alive(pgid, proc)


def stop_group(pgid: int, grace_s: float = TERM_GRACE_S, proc: subprocess.Popen | None = None,
               on_escalate=None, first: int = signal.SIGTERM) -> bool:
    """Send ``first`` (SIGTERM) to the whole group, SIGKILL whatever is left after ``grace_s``, wait up to
    ``KILL_WAIT_S`` more. Returns True once the group is gone. ``on_escalate()`` is called before the SIGKILL."""
    if not signal_group(pgid, first) or wait_gone(pgid, grace_s, proc):
        _reap(pgid, proc)
        return True
    if on_escalate is not None:
        on_escalate()
    signal_group(pgid, signal.SIGKILL)
    gone = wait_gone(pgid, KILL_WAIT_S, proc)
    _reap(pgid, proc)
    return gone


def children(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        rest = _stat_fields(int(entry)) if entry.isdigit() else None
        if rest is not None and int(rest[1]) == pid and rest[0] != "Z":
            out.append(int(entry))
    return out


def stop_children(marker: str, grace_s: float = TERM_GRACE_S) -> list[int]:
    """SIGTERM this process's direct children whose command line contains ``marker``, SIGKILL those left after
    ``grace_s``; returns their pids."""
    pids = [p for p in children(os.getpid()) if marker in cmdline(p)]
    stop_pids(pids, grace_s)
    return pids


def stop_pids(pids: list[int], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM ``pids``, SIGKILL those left after ``grace_s`` (children among them are reaped)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def survivors(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (e.g. a job file's path)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and marker in cmdline(int(entry)) and alive(int(entry)):
            out.append(int(entry))
    return out


_stop = threading.Event()


class Stopped(BaseException):
    """Raised in a worker thread once this process is stopping (a stop signal reached its main thread): the work
    there ends at once and, being no failure of its own, is not retried (Prefect marks its runs crashed)."""


def request_stop() -> None:
    """Tell the work in every thread of this process to stop (trainings stop their process groups, waiting
    trainings give up): see :class:`Stopped`."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def exit_now(code: int, wait_for_threads: bool = False, stop_children: bool = False) -> None:
    """End this process with ``code`` at once, after its exit handlers (``atexit``: Prefect drains its queues and
    stops its ephemeral API, our own stops) and a flush of stdout/stderr, but without the interpreter's
    finalization: with torch, transformers, MLflow and Prefect loaded, its garbage collection alone took seconds on
    a loaded 2-core machine, for a process whose work is over. ``wait_for_threads``: first wait for the
    non-daemon threads, as a normal exit does (not after a stop signal, where one may be stuck); ``stop_children``:
    after the exit handlers, stop every child still running (a training a worker thread was stopping)."""

    if wait_for_threads:
        # The interpreter's own first step of a normal exit: tell thread pools to finish (their exit hooks), then
        # join every non-daemon thread. Joining by hand would wait forever on an idle pool's workers.
        threading._shutdown()
    atexit._run_exitfuncs()
    if stop_children:
        stop_descendants()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def stop_descendants(grace_s: float = 2.0) -> None:
    """SIGTERM the process group of each direct child that leads its own group (a training launch), and every
    other direct child; SIGKILL what is left after ``grace_s``."""
    me = os.getpid()
    kids = children(me)
    leaders = [p for p in kids if (stat := proc_stat(p)) is not None and stat[1] == p and p != me]
    for pgid in leaders:
        signal_group(pgid, signal.SIGTERM)
    stop_pids([p for p in kids if p not in leaders], grace_s)
    for pgid in leaders:
        if not wait_gone(pgid, grace_s):
            signal_group(pgid, signal.SIGKILL)
