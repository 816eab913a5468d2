"""``outage()``: the one sentence the CLI prints when a run fails because a server did not answer or the disk is
full (the end-to-end faults are in test_stack_faults.py and test_disk_full.py; these are the cases, fast)."""

from __future__ import annotations

import errno
import socket

import pytest

from prefixflow.services.errors import ServiceUnreachable, outage


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _state(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_HOME", str(tmp_path / "state"))
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)


def test_an_error_of_another_kind_is_not_an_outage():
    assert outage(ValueError("bad")) is None
    assert outage(OSError(errno.EACCES, "denied")) is None


def test_a_full_disk_is_named_with_the_file_and_the_state_folder(tmp_path):
    found = outage(OSError(errno.ENOSPC, "No space left on device", "/state/runs/x/ckpt"))
    assert found.startswith("no space left on the device writing /state/runs/x/ckpt")
    assert str(tmp_path / "state") in found


def test_the_cause_chain_is_followed():
    try:
        try:
            raise ServiceUnreachable("the S3 server http://127.0.0.1:1 did not answer")
        except ServiceUnreachable as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert outage(outer) == "the S3 server http://127.0.0.1:1 did not answer"


def test_s3_not_answering_through_boto3_names_the_endpoint():
    from botocore.exceptions import EndpointConnectionError

    found = outage(EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/key"))
    assert found.startswith("the S3 server http://127.0.0.1:9/bucket/key did not answer")
    assert "prefixflow stack up" in found


def test_an_artifact_500_names_s3_when_the_s3_endpoint_is_down(monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    err = MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/x failed with "
                          "exception HTTPConnectionPool: Max retries exceeded (too many 500 error responses)")
    assert outage(err).startswith("the S3 server http://127.0.0.1:")
    with socket.socket() as listening:  # S3 answers: then the MLflow server's store is named, not S3
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert outage(err).startswith("the MLflow server at http://127.0.0.1:5000 could not store or read artifacts")


def test_mlflow_not_answering_names_the_tracking_server(monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    err = MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed: Max retries "
                          "exceeded with url (Caused by NewConnectionError: Connection refused)")
    assert outage(err).startswith("the MLflow server at http://127.0.0.1:5000 did not answer")
