"""Faults injected into the real stack (``prefixflow stack up``: SeaweedFS S3, the MLflow server and the Prefect
server on 127.0.0.1) while a pipeline runs: a service stopped in the middle of registration and brought back, or
left down until the user reruns the run key. Each test checks what the user sees, that the work is retried, and
that the registry ends with exactly one version of the run, complete, with its aliases."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from prefixflow.infra.stack import StackConfig, stack_up
from prefixflow.infra.stack.config import pid_file
from prefixflow.infra.stack.service_processes import running_pid, stop_service
from prefixflow.services.spec import parse_spec
from support.faults import pause_fault
from support.harness import World, registry_snapshot, wait_until
from support.pipeline import patched_environ, save_tiny_model, spec_dict, write_task

pytestmark = pytest.mark.slow
RETRIED = b"Encountered retryable exception during request"  # prefect.client's debug line for a retried call


@pytest.fixture(scope="module")
def stack(live_stack_config, live_stack, tmp_path_factory):
    """The live stack's client env with a state folder of this module's own, a tiny base and a task."""
    root = tmp_path_factory.mktemp("faults")
    yield World(root, {**live_stack, "PREFIXFLOW_HOME": str(root / "state")}, config=live_stack_config,
                model=save_tiny_model(root / "tiny-llama"), data=write_task(root / "rev.jsonl", n=120))
    stack_up(live_stack_config)  # whatever a test left stopped comes back for the tests after it


def stop(config: StackConfig, name: str) -> None:
    """Stop one service of the stack (SIGTERM to its process group), as a crash or an operator would."""
    pid = running_pid(config.state_dir, name)
    assert pid is not None, f"{name} is not running"
    stop_service(pid, name, grace=10.0)
    pid_file(config.state_dir, name).unlink(missing_ok=True)


@contextmanager
def pointed_at(stack: World):
    """os.environ and Prefect's settings pointed at the stack, for a pipeline run in this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with patched_environ(stack.env), temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        yield


def registry_state(name: str) -> dict:
    """The registered model's versions (number, status, run key) and aliases (none while it has no version)."""
    from prefixflow.services import tracking

    model = registry_snapshot(tracking.client(), [name], runs=False)["models"].get(name)
    if model is None or not model.versions:
        return {"versions": [], "aliases": {}}
    return {"versions": [(v.version, v.status, v.tags.get(tracking.RUN_KEY_TAG)) for v in model.versions],
            "aliases": model.aliases}


def assert_loads(ref: str, tmp: Path) -> None:
    """The aliased version is complete: it downloads and its checksums verify."""
    from prefix_core import PrefixArtifact
    from prefixflow.services import registry

    PrefixArtifact.load(registry.download(ref, tmp / "pulled"))


@pytest.mark.parametrize("service", ["mlflow", "s3", "postgres"])
def test_a_service_restarted_during_registration_is_retried_and_registers_one_version(stack, service, monkeypatch,
                                                                                      tmp_path):
    """The MLflow server (or S3, or PostgreSQL, the servers' database) goes down just as the prefix is uploaded
    and registered, and comes back once the upload has failed on it (the outage ends when the product has met it,
    not after a fixed time): the registration is retried with backoff and ends with one complete version."""
    from prefixflow.flows.pipeline import prefix_pipeline
    from prefixflow.services import registration

    real_publish, calls, failed = registration.publish, [], []

    def publish_during_an_outage(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) > 1:
            return real_publish(*args, **kwargs)
        stop(stack.config, service)
        try:
            return real_publish(*args, **kwargs)
        except Exception as err:
            failed.append(err)
            raise
        finally:  # back while the task waits for its retry
            threading.Thread(target=stack_up, args=[stack.config]).start()

    monkeypatch.setattr(registration, "publish", publish_during_an_outage)
    spec = parse_spec(spec_dict(stack.model, stack.data, client="faults", task=f"restart-{service}"))
    with pointed_at(stack):
        result = prefix_pipeline(spec, run_key=f"restart-{service}")
        state = registry_state(spec.registered_model)
        assert state == {"versions": [("1", "READY", f"restart-{service}")],
                         "aliases": {"candidate": "1", "champion": "1"}}
        assert result.registration.version == "1" and result.registration.champion == "1"
        assert_loads(f"faults/restart-{service}@champion", tmp_path)
    assert len(failed) == 1 and len(calls) >= 2  # the outage was met, and the retry registered


def cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``prefixflow ARGS`` as a subprocess with the stack's env (and a wide terminal for whole messages)."""
    exe = Path(sys.executable).with_name("prefixflow")
    return subprocess.run([str(exe), *args], env={**os.environ, "COLUMNS": "200", **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_s3_down_during_a_run_fails_in_one_message_and_the_rerun_registers_once(stack, tmp_path):
    """S3 is down for the whole run: the run fails after its retries with one message naming the S3 server
    and the command that finishes the run; nothing is registered. Once S3 is back, that command registers
    exactly one version, reusing the finished training."""
    spec = spec_dict(stack.model, stack.data, client="faults", task="s3-down")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    stop(stack.config, "s3")
    try:
        failed = cli(["run", str(path), "--run-key", "s3-down"], stack.env)
    finally:
        stack_up(stack.config)
    out = " ".join((failed.stdout + failed.stderr).split())
    assert failed.returncode == 1, out
    assert "error: the S3 server" in out and "did not answer" in out, out
    assert f"prefixflow run {path} --run-key s3-down` finishes this run" in out, out
    print("what the user saw:", out[out.rfind("error: "):])  # shown by pytest -rP (docs/reliability.md)
    with pointed_at(stack):
        assert registry_state("faults-s3-down")["versions"] == []
    rerun = cli(["run", str(path), "--run-key", "s3-down"], stack.env)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out
    assert "registered faults-s3-down v1" in " ".join(out.split()), out
    with pointed_at(stack):
        assert registry_state("faults-s3-down") == {"versions": [("1", "READY", "s3-down")],
                                                    "aliases": {"candidate": "1", "champion": "1"}}
        assert_loads("faults/s3-down@champion", tmp_path)


def test_prefect_server_restarted_mid_flow_the_run_finishes_and_registers_once(stack, tmp_path):
    """The Prefect server goes down while the flow trains and comes back (its database kept): the flow's calls to
    it are retried, the run finishes, registers one version, and the server shows the flow run Completed. The
    outage lasts until the run's output shows a call to the stopped server being retried."""
    spec = spec_dict(stack.model, stack.data, client="faults", task="prefect-restart")
    path, marker, log = tmp_path / "spec.yaml", tmp_path / "paused", tmp_path / "run.log"
    path.write_text(yaml.safe_dump(spec))
    exe = Path(sys.executable).with_name("prefixflow")
    env = {**os.environ, "COLUMNS": "200", **stack.env, **pause_fault(0, 3, marker),
           "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG"}  # each retried API call shows in the output
    with open(log, "w") as out:
        run = subprocess.Popen([str(exe), "run", str(path), "--run-key", "prefect-restart"], env=env, stdout=out,
                               stderr=subprocess.STDOUT)

    def running(condition):
        def check():
            assert run.poll() is None, f"the run exited with {run.returncode}:\n{log.read_text()[-3000:]}"
            return condition()
        return check

    try:  # training pauses at step 3, its flow and task runs open on the server
        wait_until(running(marker.exists), 300, 0.5, message="the training did not reach step 3")
        stop(stack.config, "prefect")
        since = log.stat().st_size
        marker.unlink()  # training goes on: its progress updates and log lines meet a closed port
        wait_until(running(lambda: RETRIED in log.read_bytes()[since:]), 120, 0.5,
                   message="the run made no call to the stopped server")
        stack_up(stack.config)
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
        marker.unlink(missing_ok=True)
    out = log.read_text(errors="replace")
    flat = " ".join(out.split())
    assert run.returncode == 0, flat[-3000:]
    assert "registered faults-prefect-restart v1" in flat, flat[-3000:]
    with pointed_at(stack):
        assert registry_state("faults-prefect-restart") == {"versions": [("1", "READY", "prefect-restart")],
                                                            "aliases": {"candidate": "1", "champion": "1"}}
        assert _flow_run_states("faults-prefect-restart") == ["COMPLETED"]


def _flow_run_states(name: str) -> list[str]:
    """The state types of the flow runs called ``name`` on the Prefect server of the environment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return [r.state.type.value for r in runs]
