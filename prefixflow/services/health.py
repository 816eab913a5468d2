"""Health checks a caller runs explicitly, after a failure, to say which service or resource is at fault: the S3
endpoint behind the MLflow server's artifact proxy, and the free space of the state folder. Classifying an
error (:mod:`prefixflow.services.errors`) never probes anything; these do, and only when called."""

from __future__ import annotations

import os
import shutil
import socket
from urllib.parse import urlparse

from prefixflow import settings
from prefixflow.services.errors import ArtifactStoreFailed

FULL_BELOW = 16 * 2**20  # bytes: a state folder with less free space than this cannot take a checkpoint or a log


def accepts_connections(url: str, timeout_s: float = 2.0) -> bool:
    """True when the host and port of ``url`` accept a TCP connection within ``timeout_s``."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout_s).close()
    except OSError:
        return False
    return True


def artifact_store_cause(err: ArtifactStoreFailed) -> str:
    """The MLflow server failed an artifact call (it proxies them to its store): name S3 when this environment's S3
    endpoint does not accept a connection, else the server's store, as ``err`` does."""
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not accepts_connections(endpoint):
        return (f"the S3 server {endpoint} did not answer (the MLflow server keeps the artifacts there): start it "
                "(`prefixflow stack up`) or check AWS_ENDPOINT_URL and `prefixflow stack status`")
    return str(err)


def state_disk_full() -> str | None:
    """The full-disk sentence when the state folder's device has (almost) no space left, else None. A failure seen
    through the embedded Prefect API (HTTP 500 from its SQLite database) carries no ENOSPC of its own."""
    home = settings.state_folder()
    folder = home
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free >= FULL_BELOW:
        return None
    return f"no space left on the device of the state folder {home} ({free // 1024} KiB free): free space there"
