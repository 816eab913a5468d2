"""Settings read from the environment, in one place: the state folder, the Prefect and MLflow targets, and the
environment defaults of a prefixflow process. Nothing here runs at import time."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "PREFIXFLOW_HOME"
PROCESS_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' thread pool and forked ranks do not mix
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # MLflow's own HTTP retries (default 7, backoff factor 2: about 4 minutes per call) multiplied by the tasks'
    # Prefect retries made a server that is down take a quarter of an hour to report; 3 retries with factor 1 give
    # up on one call in about 7 s and the tasks' retries, with their backoff, ride out a restart.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def state_folder() -> Path:
    """``$PREFIXFLOW_HOME`` (default ``./state``) as an absolute path; not created."""
    return Path(os.environ.get(STATE_ENV, "state")).expanduser().resolve()


def prefect_api_url() -> str | None:
    """The Prefect server's API (``$PREFECT_API_URL``), or None: the embedded, ephemeral API."""
    return os.environ.get("PREFECT_API_URL") or None


def mlflow_tracking_uri() -> str | None:
    """The MLflow server (``$MLFLOW_TRACKING_URI``), or None: the embedded store under the state folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def client() -> str | None:
    """The client whose credentials are in the environment (``$PREFIXFLOW_CLIENT``, set by
    ``prefixflow stack env --client``), or None: the admin's, or a stack without auth."""
    return os.environ.get("PREFIXFLOW_CLIENT") or None


def apply_process_defaults() -> None:
    """Set :data:`PROCESS_DEFAULTS` where the user has not (call at the start of a command)."""
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
