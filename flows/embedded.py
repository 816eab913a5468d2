"""Embedded services: without ``PREFECT_API_URL`` the pipeline runs on Prefect's ephemeral API, whose
home (``prefect.db``) lives under the state folder with everything else.

Prefect reads its settings once, when it is imported: call :func:`use_embedded_prefect` before
anything imports ``prefect``. On a brand-new Prefect home the ephemeral API migrates a new SQLite
database before it answers; that takes over Prefect's default 20 s allowance on a slow 2-core CPU, so
the allowance is raised (a value the user set wins).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from prefixflow import settings

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
    from prefixflow import processes

    return processes.stop_children(EPHEMERAL_API, grace_s)


def stop_on_termination() -> None:
    """Make SIGTERM and SIGHUP end this process the way Ctrl-C does: Prefect marks the run crashed (it raises in
    the flow, and training launches stop their process groups), then re-sends the signal to this handler, which
    exits normally with 128 + the signal number. A normal exit drains Prefect's log and event queues and then
    stops the ephemeral API (Prefect's atexit); the default handler would kill the process before, leaving the
    API server running as an orphan. The atexit fallback stops any ephemeral API still running."""
    import atexit
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def terminated(signum, frame) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminated)
    atexit.register(stop_embedded_prefect)  # runs after Prefect's own atexit stop (LIFO): normally a no-op


def watch_for_sigkill() -> None:
    """Start a watcher process: when this process ends without running its exit handlers (SIGKILL, the OOM
    killer), the watcher stops the ephemeral Prefect API servers this process had started, which would otherwise
    run on as orphans. An exit that runs its exit handlers (normal, Ctrl-C, SIGTERM) ends the watcher first."""
    import atexit
    import subprocess

    if settings.prefect_api_url():
        return
    watcher = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())], start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(lambda: (watcher.kill(), watcher.wait()))  # an exit that runs its handlers needs no watcher


def _watch(parent: int, poll_s: float = 1.0, grace_s: float = 5.0) -> None:
    """Note ``parent``'s ephemeral API servers while it lives; once it is gone, stop those still running."""
    from prefixflow import processes

    servers: set[int] = set()
    while processes.alive(parent):
        servers.update(p for p in processes.children(parent) if EPHEMERAL_API in processes.cmdline(p))
        time.sleep(poll_s)
    processes.stop_pids([p for p in servers if EPHEMERAL_API in processes.cmdline(p)], grace_s)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
