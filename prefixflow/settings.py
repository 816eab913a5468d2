"""Settings read from the environment, in one place: every ``PREFIXFLOW_*`` variable (prefix_core, a library
that may not import this, reads only its model cache, ``PREFIXFLOW_MODEL_CACHE``), the Prefect and MLflow
targets, and the environment defaults of a prefixflow process. Each value is read when its function is called
(a command may set a variable first); nothing here runs at import time."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "PREFIXFLOW_HOME"
CLIENT_ENV = "PREFIXFLOW_CLIENT"
RUN_STORAGE_ENV = "PREFIXFLOW_RUN_STORAGE"
SWEEP_STORAGE_ENV = "PREFIXFLOW_SWEEP_STORAGE"
API_KEYS_ENV = "PREFIXFLOW_API_KEYS"
BASE_MODEL_ENV = "PREFIXFLOW_BASE_MODEL"
STEP_HOOK_ENV = "PREFIXFLOW_STEP_HOOK"
STACK_DIR_ENV = "PREFIXFLOW_STACK_DIR"
WEED_ENV = "PREFIXFLOW_WEED"
USAGE_DIR_ENV = "PREFIXFLOW_USAGE_DIR"
WATCH_INTERVAL_ENV = "PREFIXFLOW_WATCH_INTERVAL_S"
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
# Only with a Prefect server (``$PREFECT_API_URL``): it answers 500, not 503, while PostgreSQL refuses connections
# (a database restart), and its client retries 429/502/503 only, so one refused call failed the whole fleet. 500 is
# retried too (5 times, with backoff); what is lost is a quick failure on a real server bug, which still ends in one
# message. Not for the embedded API: its 500s come from this machine's SQLite file (a full disk), which no retry
# mends, and retrying every call made a full-disk run take ten minutes to report.
SERVER_DEFAULTS = {"PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}


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
    return os.environ.get(CLIENT_ENV) or None


def run_storage() -> str | None:
    """Where training checkpoints are mirrored (``$PREFIXFLOW_RUN_STORAGE``, an ``s3://BUCKET/PREFIX``), or None."""
    return os.environ.get(RUN_STORAGE_ENV, "").rstrip("/") or None


def sweep_storage() -> str | None:
    """The Optuna storage URL of sweeps (``$PREFIXFLOW_SWEEP_STORAGE``), or None: SQLite in the state folder."""
    return os.environ.get(SWEEP_STORAGE_ENV) or None


def api_keys() -> str:
    """The serving API keys given in the environment (``$PREFIXFLOW_API_KEYS``: ``CLIENT=KEY,...``), or ""."""
    return os.environ.get(API_KEYS_ENV, "")


def base_model_override() -> str | None:
    """The base model that MLflow's pyfunc loader uses instead of the one a prefix names
    (``$PREFIXFLOW_BASE_MODEL``), or None."""
    return os.environ.get(BASE_MODEL_ENV) or None


def step_hook() -> str | None:
    """``module:factory`` of the training step hook (``$PREFIXFLOW_STEP_HOOK``: the tests' one seam), or None."""
    return os.environ.get(STEP_HOOK_ENV) or None


def watch_interval_s() -> float:
    """How often ``prefixflow deploy`` polls the data sources of ``trigger: on_new_data`` specs
    (``$PREFIXFLOW_WATCH_INTERVAL_S``, default 15 s; at least 1)."""
    raw = os.environ.get(WATCH_INTERVAL_ENV) or "15"
    try:
        return max(1.0, float(raw))
    except ValueError:
        raise ValueError(f"{WATCH_INTERVAL_ENV}={raw!r} is not a number of seconds; unset it or set e.g. 15") from None


def stack_dir() -> Path:
    """The local server stack's folder (``$PREFIXFLOW_STACK_DIR``, default ``state/stack``); not created."""
    return Path(os.environ.get(STACK_DIR_ENV) or "state/stack")


def weed_binary() -> str | None:
    """The SeaweedFS ``weed`` binary the user chose (``$PREFIXFLOW_WEED``), or None: found next to Python or on
    PATH."""
    return os.environ.get(WEED_ENV) or None


def usage_dir() -> Path:
    """Where servers append their usage log (``$PREFIXFLOW_USAGE_DIR``, default ``$PREFIXFLOW_HOME/usage``: a shared
    volume when several replicas serve); not created."""
    folder = os.environ.get(USAGE_DIR_ENV)
    return Path(folder).expanduser().resolve() if folder else state_folder() / "usage"


def apply_process_defaults() -> None:
    """Set :data:`PROCESS_DEFAULTS`, and :data:`SERVER_DEFAULTS` when a Prefect server is configured, where the
    user has not (call at the start of a command)."""
    for key, value in {**PROCESS_DEFAULTS, **(SERVER_DEFAULTS if prefect_api_url() else {})}.items():
        os.environ.setdefault(key, value)
