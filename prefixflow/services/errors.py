"""Errors raised by the pipeline's tasks. Like prefix_core's, each message says what is wrong and how
to fix it; the CLI prints it without a traceback and the flow does not retry it."""

from prefix_core.errors import PrefixError


class DataError(PrefixError):
    """The task's data cannot be used: missing, unreadable, wrong columns or types, empty."""


class RegistryError(PrefixError):
    """A registry reference (models:/NAME@ALIAS, CLIENT/TASK@ALIAS, a version) does not resolve."""


class TrainingError(PrefixError):
    """The training launch failed because of its input (not worth retrying)."""


class AccessDenied(PrefixError):
    """The credentials in use may not do this (S3 AccessDenied, MLflow 401/403): retrying cannot help."""


class ServiceUnreachable(ConnectionError):
    """A server the pipeline needs (S3, MLflow, Prefect) did not answer. Not the input's fault: tasks retry it
    with backoff, and the CLI says which server and what to do."""


def _chain(exc: BaseException):
    """``exc`` and its causes (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_user_error(exc: BaseException) -> bool:
    """True for errors caused by the input (retrying cannot help)."""
    from prefixflow.services.spec import SpecError

    return isinstance(exc, PrefixError | SpecError) or denied(exc) is not None


def denied(exc: BaseException) -> str | None:
    """One sentence saying which server refused which user, and what to do, when ``exc`` or one of its causes is
    an MLflow 401/403 or an AccessDenied; None otherwise."""
    import os
    import re

    from prefixflow import settings

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    for e in _chain(exc):
        if isinstance(e, AccessDenied):
            return str(e)
        code, text = str(getattr(e, "error_code", "")), str(e)
        if type(e).__name__ in ("MlflowException", "RestException", "HTTPError") and (
                code == "PERMISSION_DENIED" or "403" in text.split("Response")[0]):
            reason = text.split("Permission denied: ", 1)[1].rstrip("'") if "Permission denied: " in text else ""
            endpoint = re.search(r"endpoint (\S+)|for url: (\S+?)[?.\s]", text)
            on = f" on {endpoint[1] or endpoint[2]}" if endpoint else ""
            return (f"the MLflow server at {settings.mlflow_tracking_uri()} refused user {user!r}{on}"
                    + (f": {reason}" if reason else " (it sees only its own client's experiment, runs and prefixes;"
                       " a registered model that does not exist reads the same)")
                    + ". Use the credentials of the client that owns it (eval \"$(prefixflow stack env --client "
                      "CLIENT)\") or the admin's (eval \"$(prefixflow stack env)\")")
        if type(e).__name__ in ("MlflowException", "RestException") and code == "UNAUTHENTICATED":
            who = f"user {user!r} with this password" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
            return (f"the MLflow server at {settings.mlflow_tracking_uri()} did not accept {who}: it runs with "
                    "authentication; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, e.g. "
                    "eval \"$(prefixflow stack env --client CLIENT)\"")
    return None


def outage(exc: BaseException) -> str | None:
    """One sentence naming the server that could not be reached, or the full disk, when ``exc`` or one of its
    causes is such a failure; None otherwise."""
    import errno

    from prefixflow import settings
    from prefixflow.services.storage import home

    for e in _chain(exc):
        name, text = type(e).__name__, str(e)
        if isinstance(e, ServiceUnreachable):
            return text
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "database or disk is full" in text:
            where = f" writing {e.filename}" if e.filename else ""
            return (f"no space left on the device{where}: free space there (the state folder is "
                    f"{home()})")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            endpoint = getattr(e, "kwargs", {}).get("endpoint_url", "")
            return (f"the S3 server {endpoint} did not answer ({name}): start it (`prefixflow stack up`) or check "
                    "AWS_ENDPOINT_URL and `prefixflow stack status`")
        if name == "MlflowException" and "mlflow-artifacts" in text and "500" in text:
            return _artifact_store_down()
        if name == "MlflowException" and ("Max retries exceeded" in text or "Connection refused" in text):
            return (f"the MLflow server at {settings.mlflow_tracking_uri()} did not answer: start it "
                    "(`prefixflow stack up`) or check MLFLOW_TRACKING_URI and `prefixflow stack status`")
        if name in ("ConnectError", "ConnectTimeout") and settings.prefect_api_url():
            return (f"the Prefect server at {settings.prefect_api_url()} did not answer: start it "
                    "(`prefixflow stack up`) or check PREFECT_API_URL and `prefixflow stack status`")
    return state_disk_full()


def _artifact_store_down() -> str:
    """The MLflow server answered 500 to an artifact upload or download (it proxies them to its artifact store):
    name S3 when the S3 endpoint of this environment does not accept a connection, else the server's store."""
    import os
    import socket
    from urllib.parse import urlparse

    from prefixflow import settings

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 2).close()
        except OSError:
            return (f"the S3 server {endpoint} did not answer (the MLflow server keeps the artifacts there): start "
                    "it (`prefixflow stack up`) or check AWS_ENDPOINT_URL and `prefixflow stack status`")
    return (f"the MLflow server at {settings.mlflow_tracking_uri()} could not store or read artifacts (HTTP 500): "
            "its log has the cause; check its artifact store and `prefixflow stack status`")


FULL_BELOW = 16 * 2**20  # bytes: a state folder with less free space than this cannot take a checkpoint or a log


def state_disk_full() -> str | None:
    """The full-disk sentence when the state folder's device has (almost) no space left, else None. A failure
    seen through the embedded Prefect API (HTTP 500 from its SQLite database) carries no ENOSPC of its own."""
    import shutil

    from prefixflow.services.storage import home

    folder = home()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if shutil.disk_usage(folder).free >= FULL_BELOW:
        return None
    return (f"no space left on the device of the state folder {home()} "
            f"({shutil.disk_usage(folder).free // 1024} KiB free): free space there")
