"""The error model: third-party exceptions mapped by type at the boundary (real MLflow, boto3 and httpx clients
against servers on 127.0.0.1 that refuse, fail or are closed), the two roots, and classification without I/O."""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prefixflow import settings
from prefixflow.services import boundary, health
from prefixflow.services.errors import (
    AccessDenied,
    ArtifactStoreFailed,
    DataError,
    RegistryError,
    ServiceFailed,
    ServiceUnreachable,
    Unavailable,
    is_user_error,
    outage,
)
from prefixflow.services.spec import SpecError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_HOME", str(tmp_path / "state"))
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL",
                 "MLFLOW_TRACKING_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # one request per call: the tests stay fast
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture
def answering():
    """Start an HTTP server on 127.0.0.1 that answers every request with ``(status, json body)``; yields its URL."""
    servers = []

    def start(status: int, body: dict | None = None) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_two_roots():
    for err in (SpecError("bad spec"), DataError("bad data"), RegistryError("no model"), AccessDenied("no")):
        assert is_user_error(err) and outage(err) is None
    assert not is_user_error(ServiceUnreachable("down")) and isinstance(ServiceUnreachable("x"), Unavailable)
    assert not is_user_error(RuntimeError("bug")) and outage(RuntimeError("bug")) is None
    assert outage(OSError(errno.EACCES, "denied")) is None


def test_mlflow_not_answering_is_service_unreachable(monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ServiceUnreachable) as caught:
        boundary.guarded_client(uri).get_registered_model("acme-e2e")
    assert str(caught.value).startswith(f"the MLflow server at {uri} did not answer")
    try:
        raise RuntimeError("task failed") from caught.value
    except RuntimeError as outer:  # a task failure that wraps it: the cause chain is followed
        assert outage(outer) == str(caught.value)


@pytest.mark.parametrize(("status", "body", "words"), [
    (403, {"error_code": "PERMISSION_DENIED", "message": "Permission denied: READ on acme-e2e"},
     "refused user 'globex' on get_registered_model: READ on acme-e2e"),
    (401, {"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."},
     "did not accept user 'globex' with this password"),
])
def test_mlflow_refusing_the_user_is_access_denied(answering, monkeypatch, status, body, words):
    uri = answering(status, body)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "globex")
    with pytest.raises(AccessDenied) as caught:
        boundary.guarded_client(uri).get_registered_model("acme-e2e")
    assert words in str(caught.value) and is_user_error(caught.value)


def test_mlflow_missing_resource_passes_through(answering, monkeypatch):
    from mlflow.exceptions import MlflowException

    uri = answering(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such model"})
    with pytest.raises(MlflowException) as caught:
        boundary.guarded_client(uri).get_registered_model("acme-e2e")
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"  # the caller decides what a missing thing means


def test_an_artifact_500_is_explained_by_an_explicit_health_check(answering, monkeypatch):
    import mlflow.artifacts

    uri = answering(500, {"error": "the store failed"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ArtifactStoreFailed) as caught, boundary.mlflow_calls("log_table"):  # known by its URL
        mlflow.artifacts.download_artifacts(artifact_uri="mlflow-artifacts:/1/run/artifacts/prefix",
                                            tracking_uri=uri)
    err = caught.value
    with pytest.raises(Unavailable) as other:  # a 5xx of another endpoint: the server itself (its database)
        boundary.guarded_client(uri).get_registered_model("acme-e2e")
    assert not isinstance(other.value, ArtifactStoreFailed) and "failed (HTTP 5" in str(other.value)
    assert str(err).startswith(f"the MLflow server at {uri} could not store or read artifacts (HTTP 5")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    assert health.artifact_store_cause(err).startswith("the S3 server http://127.0.0.1:")
    with socket.socket() as listening:  # S3 answers: then the MLflow server's store is named, not S3
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert health.artifact_store_cause(err) == str(err)


def test_classifying_an_error_opens_no_connection(monkeypatch):
    def no_io(*args, **kwargs):
        raise AssertionError("classifying an error must not probe a server")

    monkeypatch.setattr(socket, "create_connection", no_io)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    err = ArtifactStoreFailed("the MLflow server at http://127.0.0.1:5000 could not store or read artifacts")
    assert outage(err) == str(err) and not is_user_error(err)


def test_s3_not_answering_names_the_endpoint(monkeypatch):
    import boto3
    from botocore.config import Config

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                        config=Config(retries={"max_attempts": 1}, connect_timeout=2))
    with pytest.raises(ServiceUnreachable) as caught, boundary.s3_calls("s3://b/k"):
        s3.head_object(Bucket="b", Key="k")
    assert str(caught.value).startswith(f"the S3 server {endpoint}") and "did not answer for s3://b/k" in str(
        caught.value)


def test_s3_refusing_or_missing_is_an_input_error(monkeypatch):
    from botocore.exceptions import ClientError

    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "globex-key")
    with pytest.raises(AccessDenied, match="for access key globex-key"), boundary.s3_calls("s3://b/acme/x"):
        raise client_error("AccessDenied")
    with pytest.raises(DataError, match="does not exist"), boundary.s3_calls("s3://b/x"):
        raise client_error("NoSuchKey")


def test_a_prefect_server_not_answering_is_named_only_when_one_is_configured(monkeypatch):
    import httpx

    port = _closed_port()
    with pytest.raises(httpx.ConnectError), boundary.prefect_calls():  # embedded API: nothing to name
        httpx.get(f"http://127.0.0.1:{port}/api/health")
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    with pytest.raises(ServiceUnreachable, match=f"the Prefect server at http://127.0.0.1:{port}/api"), \
            boundary.prefect_calls():
        httpx.get(f"http://127.0.0.1:{port}/api/health")


def test_a_prefect_server_answering_5xx_is_a_failed_service_and_4xx_stays_as_it_was(monkeypatch):
    """A 5xx that outlived the client's retries (the server's database down) names the server, the call and what
    to check; a 4xx is the caller's and is not mapped."""
    import httpx

    def answered(code: int):
        request = httpx.Request("POST", "http://127.0.0.1:4200/api/flow_runs/abc/set_state")
        response = httpx.Response(code, request=request)
        return httpx.HTTPStatusError(f"{code}", request=request, response=response)

    with pytest.raises(httpx.HTTPStatusError), boundary.prefect_calls():  # embedded API: nothing to name
        raise answered(500)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    with pytest.raises(ServiceFailed, match=r"the Prefect server at http://127.0.0.1:4200/api answered 500 to POST "
                                            r"/api/flow_runs/abc/set_state: .*database") as raised, \
            boundary.prefect_calls():
        raise RuntimeError("the task failed") from answered(500)
    assert outage(raised.value) == str(raised.value) and not is_user_error(raised.value)
    with pytest.raises(httpx.HTTPStatusError), boundary.prefect_calls():
        raise answered(404)


def test_a_prefect_client_rides_out_500s_with_the_process_defaults(tmp_path):
    """The Prefect server answers 500 while its PostgreSQL refuses connections (a database restart). A command's
    Prefect client (a new process with prefixflow's process defaults, as every command has) retries a 500 as it
    retries 502 and 503, so two of them in a row do not fail the call."""
    hits: list[str] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            failing = self.path.endswith("/hello") and hits.count(self.path) <= 2
            self.send_response(500 if failing else 200)
            self.send_header("Retry-After", "0")  # the client's backoff, without the wait
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"exception_message": "Internal Server Error"}' if failing else b'"hello"')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = ("from prefixflow import settings\nsettings.apply_process_defaults()\n"
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as client:\n    print(client.hello().status_code)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_CLIENT_")}
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{server.server_port}/api", PREFECT_HOME=str(tmp_path / "home"))
    try:
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert run.returncode == 0 and run.stdout.strip() == "200", run.stderr[-2000:]
    assert [h for h in hits if h.endswith("/hello")] == ["/api/hello"] * 3


def test_500s_are_retried_only_with_a_prefect_server(monkeypatch):
    """The embedded API's 500s come from this machine's SQLite file (a full disk): retrying each call only made a
    full-disk run take ten minutes to say so. A Prefect server's 500s (its database restarting) are retried."""
    monkeypatch.setattr(settings, "PROCESS_DEFAULTS", {})  # only the setting under test touches this process
    for url, retried in ((None, False), ("http://127.0.0.1:4200/api", True)):
        monkeypatch.delenv("PREFECT_CLIENT_RETRY_EXTRA_CODES", raising=False)
        if url:
            monkeypatch.setenv("PREFECT_API_URL", url)
        else:
            monkeypatch.delenv("PREFECT_API_URL", raising=False)
        settings.apply_process_defaults()
        assert (os.environ.get("PREFECT_CLIENT_RETRY_EXTRA_CODES") == "500") is retried
    monkeypatch.setenv("PREFECT_CLIENT_RETRY_EXTRA_CODES", "418")  # the user's own setting is kept
    settings.apply_process_defaults()
    assert os.environ["PREFECT_CLIENT_RETRY_EXTRA_CODES"] == "418"


def test_a_full_disk_is_named_with_the_file_and_the_state_folder(tmp_path):
    found = outage(OSError(errno.ENOSPC, "No space left on device", "/state/runs/x/ckpt"))
    assert found.startswith("no space left on the device writing /state/runs/x/ckpt")
    assert str(tmp_path / "state") in found
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert outage(full).startswith("no space left on the device")
    assert health.state_disk_full() is None  # this test machine's disk has room
