"""Faults injected into the real stack (``prefixflow stack up``: SeaweedFS S3, the MLflow server and the Prefect
server on 127.0.0.1) while a pipeline runs: a service stopped in the middle of registration and brought back, or
left down until the user reruns the run key. Each test checks what the user sees, that the work is retried, and
that the registry ends with exactly one version of the run, complete, with its aliases."""

from __future__ import annotations

import json
import os
import re
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
# prefect.client's debug lines for a retried call: no answer (a server down), or a retried status (its database down)
RETRIED = (b"Encountered retryable exception during request", b"Received response with retryable status code")


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


def restarted_while_held(stack: World, service: str, argv: list[str], tmp_path: Path) -> tuple[int, str, str]:
    """Run ``prefixflow ARGV`` (its training held after step 3 of its first member), stop ``service`` while the
    training is held, let the training go on until the command's output shows a call to the stack being retried
    (the outage lasts until the product has met it, not a fixed time), then start the service again and wait for
    the command: its exit code, stdout and stderr."""
    marker, log, out_file = tmp_path / "paused", tmp_path / "run.log", tmp_path / "stdout"
    exe = Path(sys.executable).with_name("prefixflow")
    env = {**os.environ, "COLUMNS": "200", **stack.env, **pause_fault(0, 3, marker),
           "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG"}  # each retried API call shows in the output
    with open(log, "w") as err, open(out_file, "w") as out:
        run = subprocess.Popen([str(exe), *argv], env=env, stdout=out, stderr=err)

    def running(condition):
        def check():
            assert run.poll() is None, f"the command exited with {run.returncode}:\n{log.read_text()[-3000:]}"
            return condition()
        return check

    try:  # training pauses at step 3, its flow and task runs open on the server
        wait_until(running(marker.exists), 300, 0.5, message="the training did not reach step 3")
        stop(stack.config, service)
        since = log.stat().st_size
        marker.unlink()  # training goes on: its progress updates and log lines meet the outage
        wait_until(running(lambda: any(r in log.read_bytes()[since:] for r in RETRIED)), 120, 0.5,
                   message=f"the command made no call that met the {service} outage")
        stack_up(stack.config)

        def ended() -> bool:  # each member of a pack pauses at its step 3: let every later pause go at once
            marker.unlink(missing_ok=True)
            return run.poll() is not None

        wait_until(ended, 600, 0.5, message="the command did not end after the outage")
    finally:
        if run.poll() is None:
            run.kill()
        marker.unlink(missing_ok=True)
    return run.returncode, out_file.read_text(), log.read_text(errors="replace")


def test_prefect_server_restarted_mid_flow_the_run_finishes_and_registers_once(stack, tmp_path):
    """The Prefect server goes down while the flow trains and comes back (its database kept): the flow's calls to
    it are retried, the run finishes, registers one version, and the server shows the flow run Completed."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(stack.model, stack.data, client="faults", task="prefect-restart")))
    code, out, err = restarted_while_held(stack, "prefect", ["run", str(path), "--run-key", "prefect-restart"],
                                          tmp_path)
    flat = " ".join((out + err).split())
    assert code == 0, flat[-3000:]
    assert "registered faults-prefect-restart v1" in flat, flat[-3000:]
    with pointed_at(stack):
        assert registry_state("faults-prefect-restart") == {"versions": [("1", "READY", "prefect-restart")],
                                                            "aliases": {"candidate": "1", "champion": "1"}}
        assert _flow_run_states("faults-prefect-restart") == ["COMPLETED"]


def test_postgres_restarted_mid_fleet_each_client_ends_registered_once(stack, tmp_path):
    """PostgreSQL, the database of the Prefect and the MLflow servers, stops while a fleet's pack of two clients
    trains and starts again once the fleet has met the outage. Each client's run finishes, or fails with one line
    saying why (then the fleet's run key finishes it); in the end each client has exactly one complete version,
    nothing half-registered, and stdout holds only the fleet's JSON result."""
    defaults = spec_dict(stack.model, stack.data, task="pg-restart", train__max_steps=12, train__eval_every=6,
                         train__checkpoint_every=6)
    defaults.pop("client")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"defaults": defaults, "clients": [{"client": "pga"}, {"client": "pgb"}]}))
    argv = ["fleet", str(fleet), "--run-key", "pg-restart", "--format", "json"]
    code, out, err = restarted_while_held(stack, "postgres", argv, tmp_path)
    flat = " ".join(err.split())
    assert code in (0, 1), flat[-3000:]
    result = json.loads(out)  # stdout holds the JSON result only
    failed = [e for e in result["entries"] if not e["ok"]]
    assert (code == 0) == (not failed), result
    for entry in failed:  # one line, naming the service that failed
        assert re.match(r"the (Prefect|MLflow|S3) server", entry["error"]) and "\n" not in entry["error"], entry
    print("fleet after the outage:", result["summary"], [e["error"] for e in failed])  # pytest -rP
    if failed:
        again = cli(argv, stack.env)
        assert again.returncode == 0, " ".join((again.stdout + again.stderr).split())[-3000:]
        result = json.loads(again.stdout)
    assert sorted((e["client"], e["ok"]) for e in result["entries"]) == [("pga", True), ("pgb", True)]
    with pointed_at(stack):
        for client in ("pga", "pgb"):
            assert registry_state(f"{client}-pg-restart") == {"versions": [("1", "READY", "pg-restart")],
                                                              "aliases": {"candidate": "1", "champion": "1"}}
            assert_loads(f"{client}/pg-restart@champion", tmp_path)
        assert "COMPLETED" in _flow_run_states("pga-pg-restart")


def _flow_run_states(name: str) -> list[str]:
    """The state types of the flow runs called ``name`` on the Prefect server of the environment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return [r.state.type.value for r in runs]
