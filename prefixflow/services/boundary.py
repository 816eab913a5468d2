"""The one adapter from third-party exceptions to the error model (:mod:`prefixflow.services.errors`), applied where
they are raised: MLflow calls (:func:`mlflow_calls`, and every method of :func:`guarded_client`), S3 calls through
boto3 (:func:`s3_calls`) and Prefect API calls through httpx (:func:`prefect_calls`). Matching is by exception type
and by the structured fields those types carry (MLflow's ``error_code``, an HTTP status, boto3's error code, an
errno), never by message text. Exceptions of other kinds pass through unchanged.

Heavy imports (mlflow, requests, botocore, httpx) are deferred to the calls: the CLI imports this module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from prefixflow import settings
from prefixflow.services.errors import (
    AccessDenied,
    ArtifactStoreFailed,
    DataError,
    ServiceFailed,
    ServiceUnreachable,
    Unavailable,
    chain,
)

AUTH_HINT = ("Use the credentials of the client that owns it (eval \"$(prefixflow stack env --client CLIENT)\") or "
             "the admin's (eval \"$(prefixflow stack env)\")")
_S3_MISSING = ("404", "NoSuchKey", "NoSuchBucket", "NotFound")
_S3_DENIED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


# --- MLflow ----------------------------------------------------------------------------------------------------
def _mlflow_denied(code: str, detail: str, doing: str) -> AccessDenied:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    server = settings.mlflow_tracking_uri()
    if code == "UNAUTHENTICATED":
        who = f"user {user!r} with this password" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
        return AccessDenied(f"the MLflow server at {server} did not accept {who}: it runs with authentication; set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, e.g. "
                            "eval \"$(prefixflow stack env --client CLIENT)\"")
    reason = f": {detail}" if detail else (" (it sees only its own client's experiment, runs and prefixes; a "
                                           "registered model that does not exist reads the same)")
    return AccessDenied(f"the MLflow server at {server} refused user {user!r} on {doing}{reason}. {AUTH_HINT}")


def from_mlflow(exc: BaseException, doing: str, artifacts: bool = False) -> Exception | None:
    """The error-model exception for an exception raised by an MLflow call (``doing``: what was called), or None
    when it is of no kind the model names (a missing resource, a bad argument: the caller decides)."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    server = settings.mlflow_tracking_uri()
    for e in chain(exc):
        if isinstance(e, MlflowException) and e.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            detail = str(e.json.get("message", "")) if isinstance(e, RestException) else ""
            return _mlflow_denied(e.error_code, detail.removeprefix("Permission denied: "), doing)
        if isinstance(e, requests.HTTPError) and e.response is not None:
            status = e.response.status_code
            if status in (401, 403):
                return _mlflow_denied("UNAUTHENTICATED" if status == 401 else "PERMISSION_DENIED", "", doing)
            if status >= 500:
                return _server_failure(status, artifacts or _artifact_request(e.response.url))
        if isinstance(e, requests.exceptions.RetryError):  # too many 5xx answers (urllib3's MaxRetryError inside)
            return _server_failure(500, artifacts or _artifact_request(getattr(e.args[0], "url", "") if e.args
                                                                         else ""))
        if isinstance(e, requests.ConnectionError | requests.Timeout):
            return ServiceUnreachable(f"the MLflow server at {server} did not answer ({type(e).__name__}): start it "
                                      "(`prefixflow stack up`) or check MLFLOW_TRACKING_URI and `prefixflow stack "
                                      "status`")
    return None


def _artifact_request(url: str | None) -> bool:
    """The request went to MLflow's artifact proxy (``/api/2.0/mlflow-artifacts/...``)."""
    return "/mlflow-artifacts/" in urlparse(url or "").path


def _server_failure(status: int, artifacts: bool) -> Unavailable:
    server = settings.mlflow_tracking_uri()
    if artifacts:
        return ArtifactStoreFailed(f"the MLflow server at {server} could not store or read artifacts (HTTP "
                                   f"{status}): its log has the cause; check its artifact store and `prefixflow stack "
                                   "status`")
    return Unavailable(f"the MLflow server at {server} failed (HTTP {status}): its log has the cause (its database "
                       "or store); check `prefixflow stack status`")


@contextmanager
def mlflow_calls(doing: str, artifacts: bool = False) -> Iterator[None]:
    """Run MLflow calls, raising what :func:`from_mlflow` maps their exceptions to (chained to the original)."""
    try:
        yield
    except Exception as exc:
        mapped = from_mlflow(exc, doing, artifacts)
        if mapped is None:
            raise
        raise mapped from exc


_ARTIFACT_METHODS = frozenset({"log_artifact", "log_artifacts", "download_artifacts", "list_artifacts",
                               "create_model_version", "get_model_version_download_uri"})


class _GuardedClient:
    """An ``MlflowClient`` whose every method raises the error model's exceptions (see :func:`from_mlflow`)."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with mlflow_calls(name, artifacts=name in _ARTIFACT_METHODS):
                return attr(*args, **kwargs)

        return call


def guarded_client(tracking_uri: str):
    """An MlflowClient for ``tracking_uri`` (tracking and registry) behind the adapter."""
    from mlflow import MlflowClient

    return _GuardedClient(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))


# --- S3 (boto3) ------------------------------------------------------------------------------------------------
@contextmanager
def s3_calls(uri: str) -> Iterator[None]:
    """Run boto3 calls on ``uri``: a missing object is a DataError, a refused key AccessDenied, an endpoint that
    does not answer ServiceUnreachable, another botocore failure (no endpoint, bad credentials format) DataError."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
    )

    try:
        yield
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in _S3_MISSING:
            raise DataError(f"{uri} does not exist (S3 said {code}); check the bucket and key") from None
        if code in _S3_DENIED:
            key = os.environ.get("AWS_ACCESS_KEY_ID", "(none)")
            raise AccessDenied(f"the S3 server refused access to {uri} for access key {key} ({code}): a client's "
                               "key reaches only s3://BUCKET/clients/CLIENT/; use the key of the client that owns "
                               "it (eval \"$(prefixflow stack env --client CLIENT)\") or check AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY") from None
        raise
    except (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError) as err:
        endpoint = getattr(err, "kwargs", {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL", "")
        raise ServiceUnreachable(f"the S3 server {endpoint} did not answer for {uri} ({type(err).__name__}): start "
                                 "it (`prefixflow stack up`) or check AWS_ENDPOINT_URL and `prefixflow stack "
                                 "status`") from err
    except BotoCoreError as err:
        raise DataError(f"cannot reach the S3 server for {uri}: {err}. Is AWS_ENDPOINT_URL set and the server up "
                        "(`prefixflow stack status`)?") from None


# --- Prefect (httpx) -------------------------------------------------------------------------------------------
@contextmanager
def prefect_calls() -> Iterator[None]:
    """Run code that talks to a Prefect server: a server that does not accept connections is ServiceUnreachable,
    one that still answers 5xx after the client's retries (its database down) is ServiceFailed. Without a server
    (the embedded API) nothing is mapped: that API lives and dies with this process."""
    import httpx

    try:
        yield
    except Exception as exc:
        url = settings.prefect_api_url()
        if url is None:
            raise
        if any(isinstance(e, httpx.ConnectError | httpx.ConnectTimeout) for e in chain(exc)):
            raise ServiceUnreachable(f"the Prefect server at {url} did not answer: start it (`prefixflow stack up`) "
                                     "or check PREFECT_API_URL and `prefixflow stack status`") from exc
        failed = next((e for e in chain(exc) if isinstance(e, httpx.HTTPStatusError)
                       and e.response.status_code >= 500), None)
        if failed is None:
            raise
        raise ServiceFailed(f"the Prefect server at {url} answered {failed.response.status_code} to "
                            f"{failed.request.method} {failed.request.url.path}: it is up but cannot serve (is its "
                            "database up? `prefixflow stack status`, and its log in the stack's logs folder)") from exc
