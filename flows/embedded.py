"""Embedded services: without ``PREFECT_API_URL`` the pipeline runs on Prefect's ephemeral API, whose
home (``prefect.db``) lives under the state folder with everything else.

Prefect reads its settings once, when it is imported: call :func:`use_embedded_prefect` before
anything imports ``prefect``. On a brand-new Prefect home the ephemeral API migrates a new SQLite
database before it answers; that takes over Prefect's default 20 s allowance on a slow 2-core CPU, so
the allowance is raised (a value the user set wins).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefixflow import processes, settings

STARTUP_TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 600  # covers a first migration on the slowest machine seen (~40 s) many times over
# The ephemeral API's own loggers (prefect.server, uvicorn, fastapi: used only in its process) write to the user's
# terminal; their failures reach the pipeline as failed API calls, which the CLI explains in one message.
DEFAULTS = {STARTUP_TIMEOUT_VAR: str(STARTUP_TIMEOUT_S), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL"}


def prefect_defaults() -> None:
    """Prefect settings every embedded run needs, unless the user set them (before importing prefect)."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def use_embedded_prefect(state: Path | None = None) -> str | None:
    """Point the pipeline at ``state`` (default ``$PREFIXFLOW_HOME``) and, without a Prefect server,
    keep the ephemeral API's home under it. Returns a note for the user when this is the first run
    with that Prefect home (the API will first create its database), else None."""
    if state is not None:
        os.environ[settings.STATE_ENV] = str(Path(state).expanduser().resolve())
    prefect_defaults()
    settings.apply_process_defaults()
    if settings.prefect_api_url():
        return None
    home = Path(os.environ.setdefault("PREFECT_HOME", str(settings.state_folder() / "prefect")))
    home.mkdir(parents=True, exist_ok=True)  # Prefect does not create parents
    if (home / "prefect.db").exists():
        return None
    return (f"first run with Prefect home {home}: the embedded Prefect API creates its database before it starts "
            "(up to a minute on a slow machine; later runs start in seconds)")


EPHEMERAL_API = "prefect.server.api.server:create_app"  # in the command line of Prefect's ephemeral API server


def stop_embedded_prefect(grace_s: float = 5.0) -> list[int]:
    """Stop the ephemeral Prefect API servers this process started. Prefect stops them at a normal exit, but a
    process ended by SIGTERM or SIGHUP would leave them running as orphans."""

    return processes.stop_children(EPHEMERAL_API, grace_s)


STOP_DEADLINE_S = 20.0  # after a stop signal: the command is gone this long after it, whatever it was doing


def stop_on_termination() -> None:
    """Make SIGTERM and SIGHUP end this process the way Ctrl-C does: Prefect marks the run crashed (it raises in
    the flow, and training launches stop their process groups), then re-sends the signal to this handler, which
    exits normally with 128 + the signal number. A normal exit drains Prefect's log and event queues and then
    stops the ephemeral API (Prefect's atexit); the default handler would kill the process before, leaving the
    API server running as an orphan. The atexit fallback stops any ephemeral API still running.

    Every stop signal (SIGINT included) also arms :func:`_deadline`: whatever the process is waiting on after it
    (a training group slow to die, a server that does not answer, the interpreter's own teardown), it stops what
    it started and exits within ``STOP_DEADLINE_S``."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminated(signum, frame) -> None:
        _deadline(signum)
        raise SystemExit(128 + signum)

    def interrupted(signum, frame) -> None:
        _deadline(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, xdist)
        signal.signal(signal.SIGINT, interrupted)
    atexit.register(stop_embedded_prefect)  # runs after Prefect's own atexit stop (LIFO): normally a no-op


_armed = threading.Event()


def stopping() -> bool:
    """True once this process got a stop signal (SIGTERM, SIGHUP, or SIGINT where it is not ignored)."""
    return _armed.is_set()


def _deadline(signum: int, after_s: float = STOP_DEADLINE_S) -> None:
    """Once per process: a daemon thread that, ``after_s`` after a stop signal, stops every child (training groups,
    the ephemeral API, the SIGKILL watcher) and ends the process with 128 + ``signum``."""
    processes.request_stop()
    if _armed.is_set():
        return
    _armed.set()

    def expire() -> None:
        time.sleep(after_s)

        print(f"prefixflow: still running {after_s:g} s after {signal.Signals(signum).name}: stopping what it "
              "started and exiting", file=sys.stderr, flush=True)
        processes.stop_descendants()
        os._exit(128 + signum)

    threading.Thread(target=expire, name="prefixflow-stop-deadline", daemon=True).start()


def stopped_by(exc: BaseException) -> None:
    """A stop signal reached a flow that waits on its task threads (a fleet, a sweep): Prefect raises it there
    (``TerminationSignal``, ``KeyboardInterrupt``) and holds this module's handler back until the flow ends, which
    waits for those threads. Tell them to stop (:func:`prefixflow.processes.request_stop`) and arm the deadline, as
    the handler would. Other exceptions are left alone."""
    signum = getattr(exc, "signal", None) if isinstance(exc, BaseException) and not isinstance(exc, Exception) \
        else None  # Prefect's TerminationSignal carries the signal
    if signum is None and isinstance(exc, KeyboardInterrupt):
        signum = signal.SIGINT
    if isinstance(signum, int):
        _deadline(signum)


def watch_for_sigkill() -> None:
    """Start a watcher process: when this process ends without running its exit handlers (SIGKILL, the OOM
    killer), the watcher stops the ephemeral Prefect API servers this process had started, which would otherwise
    run on as orphans. An exit that runs its exit handlers (normal, Ctrl-C, SIGTERM) ends the watcher first."""
    if settings.prefect_api_url():
        return
    watcher = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())], start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(lambda: (watcher.kill(), watcher.wait()))  # an exit that runs its handlers needs no watcher


def _watch(parent: int, poll_s: float = 1.0, grace_s: float = 5.0) -> None:
    """Note ``parent``'s ephemeral API servers while it lives; once it is gone, stop those still running."""

    servers: set[int] = set()
    while processes.alive(parent):
        servers.update(p for p in processes.children(parent) if EPHEMERAL_API in processes.cmdline(p))
        time.sleep(poll_s)
    processes.stop_pids([p for p in servers if EPHEMERAL_API in processes.cmdline(p)], grace_s)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
