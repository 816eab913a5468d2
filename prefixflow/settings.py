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


def apply_process_defaults() -> None:
    """Set :data:`PROCESS_DEFAULTS` where the user has not (call at the start of a command)."""
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
