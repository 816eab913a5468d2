"""The ``prefixflow`` command as a user runs it: a subprocess of the installed entry point, with a wide terminal so
messages stay whole, and none of the settings that would point it at another stack or state folder unless given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXE = str(Path(sys.executable).with_name("prefixflow"))
USER_ENV_DROP = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFIXFLOW_HOME", "PREFECT_HOME", "AWS_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL", "PREFIXFLOW_API_KEYS", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "PREFIXFLOW_CLIENT", "PREFIXFLOW_RUN_STORAGE")


def prefixflow(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``prefixflow ARGS`` with ``env`` over this process's environment minus :data:`USER_ENV_DROP`."""
    base = {k: v for k, v in os.environ.items() if k not in USER_ENV_DROP}
    return subprocess.run([EXE, *args], env={**base, "COLUMNS": "200", **env}, capture_output=True, text=True,
                          timeout=timeout)
