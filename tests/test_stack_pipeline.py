"""The pipeline against the real stack (SeaweedFS S3, MLflow server with S3 artifacts, Prefect server),
started by the test itself on 127.0.0.1: data read from S3, prefix objects in S3, registry versions,
tags and aliases, pull + generate, and a served deployment triggered with `prefect deployment run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from prefixflow import processes
from prefixflow.services.spec import parse_spec
from support.faults import kill_fault
from support.harness import wait_until
from support.pipeline import patched_environ, save_tiny_model, spec_dict, write_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack_env(live_stack, tmp_path_factory):
    """os.environ pointed at the live stack (and a state folder of its own) for this module."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("stackpipe")
    env = {**live_stack, "PREFIXFLOW_HOME": str(root / "state")}
    with patched_environ(env), temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield {"env": env, "root": root, "model": save_tiny_model(root / "tiny-llama"),
               "data": write_task(root / "rev.jsonl", n=120)}


def _s3(env: dict):
    import boto3

    session = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                    region_name=env["AWS_DEFAULT_REGION"])
    return session.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])


def _s3_keys(env: dict, prefix: str = "") -> list[str]:
    s3 = _s3(env)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=env["PREFIXFLOW_S3_BUCKET"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_pipeline_on_the_real_stack(stack_env, tmp_path):
    from prefixflow.cli import app
    from prefixflow.flows.pipeline import prefix_pipeline
    from prefixflow.services import tracking

    env = stack_env["env"]
    bucket = env["PREFIXFLOW_S3_BUCKET"]
    _s3(env).upload_file(str(stack_env["data"]), bucket, "datasets/rev.jsonl")
    spec = parse_spec(spec_dict(stack_env["model"], f"s3://{bucket}/datasets/rev.jsonl", client="stack"))
    result = prefix_pipeline(spec)
    assert result.registration.version == "1" and result.registration.champion == "1"
    assert result.mlflow_link.startswith("http://127.0.0.1")
    # the prefix went to S3 through the MLflow server
    keys = _s3_keys(env)
    assert any(k.endswith(f"{result.mlflow_run_id}/artifacts/prefix/prefix.safetensors") for k in keys), keys
    assert any(k.endswith("prefix/manifest.json") for k in keys)
    c = tracking.client()
    mv = c.get_model_version_by_alias(spec.registered_model, "champion")
    assert mv.version == "1" and mv.tags["data_fingerprint"] == result.data.fingerprint
    assert mv.tags[tracking.RUN_KEY_TAG] == result.run_key and mv.tags["gate"] == "passed"
    assert set(c.get_registered_model(spec.registered_model).aliases) >= {"candidate", "champion"}
    # pull @champion through the CLI; it generates what the evaluation generated before registration
    runner = CliRunner()
    out = tmp_path / "pulled"
    pulled = runner.invoke(app, ["pull", f"models:/{spec.registered_model}@champion", "--out", str(out)])
    assert pulled.exit_code == 0, pulled.output
    sample = result.report.samples[0]
    gen = runner.invoke(app, ["generate", "--prefix", str(out), "--max-new-tokens", "12", sample["source"]])
    assert gen.exit_code == 0, gen.output
    assert sample["candidate"] in gen.output.split("\n", 1)[1]
    # the same prefix served from an s3:// folder
    from prefixflow.services.storage import upload_dir

    upload_dir(out, f"s3://{bucket}/served/stack-rev")
    gen_s3 = runner.invoke(app, ["generate", "--prefix", f"s3://{bucket}/served/stack-rev", "--max-new-tokens", "12",
                                 sample["source"]])
    assert gen_s3.exit_code == 0 and gen_s3.output == gen.output, gen_s3.output


def test_served_deployment_runs_when_triggered(stack_env, tmp_path):
    from prefixflow.services import registry

    env = {**os.environ, **stack_env["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    d = spec_dict(stack_env["model"], stack_env["data"], client="served", task="rev")
    d["schedule"] = "0 3 * * 1"
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "rev.yaml").write_text(yaml.safe_dump(d))
    prefixflow = [sys.executable, "-m", "prefixflow.cli"]
    server = processes.start([*prefixflow, "deploy", str(specs)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        prefect = [sys.executable, "-m", "prefect"]
        checks = []

        def registered() -> bool:  # the deployment is registered
            checks.append(subprocess.run([*prefect, "deployment", "inspect", "prefix-pipeline/served-rev"], env=env,
                                         capture_output=True, text=True))
            assert checks[-1].returncode == 0 or server.poll() is None, server.stdout.read()
            return checks[-1].returncode == 0

        wait_until(registered, 120, 2, message=lambda: checks[-1].stdout + checks[-1].stderr)
        assert "0 3 * * 1" in checks[-1].stdout
        run = subprocess.run([*prefect, "deployment", "run", "prefix-pipeline/served-rev", "--watch",
                              "--watch-timeout", "400"], env=env, capture_output=True, text=True, timeout=450)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout + run.stderr
        assert registry.alias_version("served-rev", "champion") == "1"
    finally:
        processes.stop_group(server.pid, 30, server)  # stop serving before the stack goes down


def _deployment_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))


def _automation_for(name: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"prefix-pipeline/{name}")
        except Exception:  # not registered yet
            return False
        return bool(client.read_resource_related_automations(f"prefect.deployment.{deployment.id}"))


def test_new_data_in_s3_starts_one_run_of_its_deployment(stack_env, tmp_path):
    """trigger: on_new_data. A new upload of the data object starts exactly one run of the deployment within
    60 s, which registers a version; three uploads in quick succession start one more; nothing else starts."""
    import random

    from prefect.client.schemas.objects import StateType

    from prefixflow.services import registry

    env = {**os.environ, **stack_env["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFIXFLOW_WATCH_INTERVAL_S": "3"}
    bucket, key = env["PREFIXFLOW_S3_BUCKET"], "datasets/trig/rev.jsonl"
    s3 = _s3(env)

    def upload(seed: int) -> float:
        write_task(tmp_path / "up.jsonl", n=100 + random.Random(seed).randrange(40), seed=seed)
        s3.upload_file(str(tmp_path / "up.jsonl"), bucket, key)
        return time.monotonic()

    upload(0)  # what is there before the deployment is served starts nothing
    d = spec_dict(stack_env["model"], f"s3://{bucket}/{key}", client="trig", task="rev")
    d["trigger"] = "on_new_data"
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "rev.yaml").write_text(yaml.safe_dump(d))
    server = processes.start([sys.executable, "-m", "prefixflow.cli", "deploy", str(tmp_path / "specs")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def settled_run(count: int, since: float) -> object:
        wait_until(lambda: len(_deployment_runs("trig-rev")) >= count or server.poll() is not None, 60, 1,
                   message=lambda: f"{len(_deployment_runs('trig-rev'))} runs {time.monotonic() - since:.0f} s after "
                                   "the upload")
        assert server.poll() is None, server.stdout.read()
        assert time.monotonic() - since < 60
        runs = sorted(_deployment_runs("trig-rev"), key=lambda r: r.created)
        assert len(runs) == count
        wait_until(lambda: _deployment_runs("trig-rev") and all(r.state.is_final() for r in _deployment_runs(
            "trig-rev")), 400, 2, message=lambda: str([r.state_name for r in _deployment_runs("trig-rev")]))
        return sorted(_deployment_runs("trig-rev"), key=lambda r: r.created)[-1]

    try:
        wait_until(lambda: _automation_for("trig-rev") or server.poll() is not None, 120, 2,
                   message="no automation for the deployment's trigger")
        assert server.poll() is None, server.stdout.read()
        time.sleep(8)  # two polls: nothing new, nothing starts
        assert _deployment_runs("trig-rev") == []
        first = settled_run(1, upload(1))
        assert first.state.type == StateType.COMPLETED, first.state
        assert registry.version_exists("trig-rev", "1")
        for seed in (2, 3, 4):  # a burst
            last = upload(seed)
            time.sleep(1)
        second = settled_run(2, last)
        assert second.state.type == StateType.COMPLETED, second.state
        assert registry.version_exists("trig-rev", "2")
        time.sleep(10)  # the burst made one run, not three
        assert len(_deployment_runs("trig-rev")) == 2
    finally:
        processes.stop_group(server.pid, 30, server)


def test_checkpoints_in_s3_let_a_retry_on_another_machine_resume(stack_env, monkeypatch, tmp_path):
    """PREFIXFLOW_RUN_STORAGE=s3://...: checkpoints are mirrored to S3; after the local run folder is
    lost (another machine), the retry downloads the newest complete one and ends exactly as an
    uninterrupted run."""
    import shutil

    from prefix_core import PrefixArtifact
    from prefixflow.launch.training import train
    from prefixflow.services.preparation import prepare
    from prefixflow.services.storage import run_dir

    env = stack_env["env"]
    monkeypatch.setenv("PREFIXFLOW_RUN_STORAGE", f"s3://{env['PREFIXFLOW_S3_BUCKET']}/runs")
    spec = parse_spec(spec_dict(stack_env["model"], stack_env["data"], client="mirror"))
    data = prepare(spec)
    reference = train(spec, data, "reference")
    for key, value in kill_fault(0, 5, tmp_path / "killed").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="rank 0 died"):
        train(spec, data, "crashing")
    keys = _s3_keys(env, "runs/mirror/rev/crashing/checkpoints/")
    assert any(k.endswith("step-00000003/COMPLETE") for k in keys), keys
    assert any(k.endswith("step-00000003/trainable.safetensors") for k in keys)
    shutil.rmtree(run_dir("mirror", "rev", "crashing"))  # the first machine and its disk are gone
    resumed = train(spec, data, "crashing")
    assert resumed.resumed_from == 3 and resumed.steps == 6
    diff = PrefixArtifact.load(resumed.artifact_uri).table() - PrefixArtifact.load(reference.artifact_uri).table()
    assert diff.abs().max().item() <= 1e-6
    steps = {k.split("/")[-2] for k in _s3_keys(env, "runs/mirror/rev/crashing/checkpoints/")}
    assert steps == {"step-00000003", "step-00000006"}  # pruned to the newest two
