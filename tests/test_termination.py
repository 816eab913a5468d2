"""Stopping a `prefixflow` command with a signal, as a user would: nothing it started keeps running, it says
what happened and how to finish, and `prefixflow run --run-key K` then finishes the same run (one version)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from prefixflow import processes
from support.harness import wait_until
from support.pipeline import marked, save_tiny_model, spec_dict, write_task

CLIENT_ENV = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFIXFLOW_HOME", "PREFECT_HOME")
STOPPED_WITHIN_S = 30.0  # a service manager escalates to SIGKILL after about this long


def command_env(tmp_path: Path, mark: str) -> dict[str, str]:
    """The environment of a command under test: a state folder of its own, embedded services, processes marked."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    env.update(PREFIXFLOW_HOME=str(tmp_path / "state"), PREFIXFLOW_TEST_MARK=mark, COLUMNS="200")
    return env


def start_command(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``prefixflow ARGS`` in a session of its own, its output in ``log``; as from a terminal: SIGINT at its default
    (pytest-xdist workers ignore it, and children inherit that)."""
    exe = str(Path(sys.executable).with_name("prefixflow"))
    with open(log, "w") as out:
        return subprocess.Popen([exe, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop_and_check(proc: subprocess.Popen, sig: int, log: Path, mark: str) -> str:
    """Send ``sig`` to the command only (as a service manager or a terminal would); check that it exits with
    128 + sig, says so in one line with the command that finishes the run, and that its process group, every
    rank, launcher and pack, the ephemeral Prefect API and the SIGKILL watcher are gone within STOPPED_WITHIN_S.
    Returns the run key it printed."""
    try:
        os.kill(proc.pid, sig)
        signalled = time.monotonic()
        code = proc.wait(STOPPED_WITHIN_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = " ".join(log.read_text().split())
    assert code == 128 + sig, text[-3000:]
    name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
    assert f"stopped by {name}" in text and "Traceback" not in text
    key = text.split("run key ")[1].split(":")[0].strip()
    assert f"--run-key {key}" in text.split("stopped by")[1]
    left = max(0.0, STOPPED_WITHIN_S - (time.monotonic() - signalled))
    wait_until(lambda: not processes.group_alive(proc.pid) and marked(mark) == [], left, 0.25,
               message=lambda: f"still running {time.monotonic() - signalled:.1f} s after the signal: "
                               f"{[(p, processes.cmdline(p)[:120]) for p in marked(mark)]}")
    return key


def stopped_when_held(args: list[str], env: dict[str, str], step: int, log: Path, mark: str) -> str:
    """Start ``prefixflow ARGS`` with its training held after ``step`` (tests.support.faults.pause_fault), wait
    until it is held, then SIGTERM it and check it as :func:`stop_and_check` does; returns the printed run key."""
    from support.faults import pause_fault

    paused = log.with_name(log.stem + ".paused")
    proc = start_command(args, {**env, **pause_fault(0, step, paused)}, log)

    def held() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return paused.exists()

    try:
        wait_until(held, 300, 0.5, message=lambda: log.read_text()[-3000:])
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return stop_and_check(proc, signal.SIGTERM, log, mark)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_leaves_nothing_running_and_its_run_key_finishes_it(tmp_path, sig):
    model, data = save_tiny_model(tmp_path / "model"), write_task(tmp_path / "rev.jsonl", n=120)
    d = spec_dict(model, data)
    d["train"].update(max_steps=90, checkpoint_every=5, eval_every=45)  # a log line every 3 steps
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(d))
    mark = uuid.uuid4().hex
    env = command_env(tmp_path, mark)
    exe = str(Path(sys.executable).with_name("prefixflow"))
    log = tmp_path / "run.log"
    proc = start_command(["run", str(spec)], env, log)

    def past_two_checkpoints():
        assert proc.poll() is None, log.read_text()[-3000:]
        return re.search(r"step (1[0-9]|[2-9][0-9])/90", log.read_text())

    try:
        wait_until(past_two_checkpoints, 300, 0.5, message=lambda: log.read_text()[-3000:])
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    key = stop_and_check(proc, sig, log, mark)
    if sig != signal.SIGTERM:
        return

    again = subprocess.run([exe, "run", str(spec), "--run-key", key], env=env, capture_output=True, text=True,
                           timeout=900)
    out = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, out[-3000:] + again.stderr[-3000:]
    assert "registered acme-rev v1" in out and "resumed from checkpoint" in out
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    assert len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name = 'acme-rev'")) == 1
    assert marked(mark) == []


@pytest.mark.slow
def test_a_killed_run_command_leaves_a_training_that_its_rerun_stops_before_it_resumes(tmp_path):
    """SIGKILL of `prefixflow run` mid-training (the OOM killer, `kill -9`): nothing of it can clean up, and its
    training goes on without it. Its watcher stops its ephemeral Prefect API; `prefixflow run --run-key K` must
    stop the training before it starts its own (never two trainings writing one run's checkpoints), resume from
    the newest checkpoint and register one version."""
    from prefixflow import processes
    from prefixflow.flows.embedded import EPHEMERAL_API
    from prefixflow.launch.protocol import JOB_MODULE
    from support.faults import pause_fault

    model, data = save_tiny_model(tmp_path / "model"), write_task(tmp_path / "rev.jsonl", n=120)
    d = spec_dict(model, data)
    d["train"].update(max_steps=12, checkpoint_every=3, eval_every=6)
    spec, paused = tmp_path / "spec.yaml", tmp_path / "paused"
    spec.write_text(yaml.safe_dump(d))
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    env.update(PREFIXFLOW_HOME=str(tmp_path / "state"), PREFIXFLOW_TEST_MARK=mark, COLUMNS="200")
    command = [str(Path(sys.executable).with_name("prefixflow")), "run", str(spec), "--run-key", "killed"]
    killed = subprocess.Popen(command, env={**env, **pause_fault(0, 6, paused)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)

    def at_pause() -> bool:  # the rank finished step 6 (and its checkpoint) and waits
        assert killed.poll() is None, f"the command exited with {killed.returncode} before the pause"
        return paused.exists()

    try:
        wait_until(at_pause, 300, 0.5, message="training did not reach step 6")
        killed.kill()
        killed.wait()
        orphans = [p for p in marked(mark) if JOB_MODULE in processes.cmdline(p)]
        assert orphans, "the training should outlive a command killed with SIGKILL"
        # its ephemeral Prefect API is stopped by the command's watcher
        wait_until(lambda: not [p for p in marked(mark) if EPHEMERAL_API in processes.cmdline(p)], 15, 0.5,
                   message="the killed command's ephemeral Prefect API is still running")

        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        out = " ".join((rerun.stdout + rerun.stderr).split())
        assert rerun.returncode == 0, out[-3000:]
        assert "resumed from checkpoint" in out and "(step 6)" in out, out[-3000:]
        assert "registered acme-rev v1" in out, out[-3000:]
        assert not [p for p in orphans if processes.alive(p)]
        log = (tmp_path / "state" / "runs" / "acme" / "rev" / "killed" / "train.log").read_text()
        assert "stopped the training left running by an earlier command that was killed" in log
    finally:
        for pid in marked(mark):  # whatever a failed check left
            os.kill(pid, signal.SIGKILL)
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    assert len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name = 'acme-rev'")) == 1


@pytest.mark.slow
def test_a_stopped_fleet_with_a_pack_running_exits_promptly_and_its_run_key_resumes_each_client(tmp_path):
    """SIGTERM to `prefixflow fleet FILE` (a fleet file) while a pack of two clients trains (held after its first
    member's step 10, past that member's step-10 and the other's step-5 checkpoints): the command, its pack and
    the ephemeral API are gone within STOPPED_WITHIN_S; `prefixflow fleet FILE --run-key K` then resumes each
    client from its own newest checkpoint and registers one version each."""

    model = save_tiny_model(tmp_path / "model")
    defaults = spec_dict(model, write_task(tmp_path / "ca.jsonl", n=120, seed=120))
    defaults["train"].update(max_steps=30, checkpoint_every=5, eval_every=15)
    defaults.pop("client")
    write_task(tmp_path / "cb.jsonl", n=80, seed=80)
    specs = tmp_path / "fleet.yaml"  # a fleet file: shared defaults, each client's own data (a relative path)
    specs.write_text(yaml.safe_dump({"defaults": defaults, "clients": [
        {"client": "ca", "data": {"source": "ca.jsonl"}}, {"client": "cb", "data": {"source": "cb.jsonl"}}]}))
    mark = uuid.uuid4().hex
    env = command_env(tmp_path, mark)
    # held once the pack's first member finished step 10 and its checkpoint
    key = stopped_when_held(["fleet", str(specs)], env, 10, tmp_path / "fleet.log", mark)
    [pack] = [json.loads(f.read_text()) for f in (tmp_path / "state" / "packs").glob("*/pack.json")]
    first, second = (member.split("/")[0] for member in pack["members"])  # the order each member steps in

    exe = str(Path(sys.executable).with_name("prefixflow"))
    again = subprocess.run([exe, "fleet", str(specs), "--run-key", key, "--format", "json"], env=env,
                           capture_output=True, text=True, timeout=900)
    out = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, out[-3000:]
    result = json.loads(again.stdout)  # stdout holds the JSON result only (logs and progress go to stderr)
    assert sorted((e["client"], e["outcome"]) for e in result["entries"]) == [("ca", "registered"),
                                                                              ("cb", "registered")]
    assert result["summary"].startswith("fleet: 2 clients: 2 registered, 0 unchanged, 0 failed in ")
    runs = tmp_path / "state" / "runs"
    for client, step in ((first, 10), (second, 5)):
        log_lines = (runs / client / "rev" / key / "train.log").read_text().splitlines()
        resumed = [json.loads(line)["step"] for line in log_lines if '"event": "resume"' in line]
        assert resumed == [step], client  # from its own newest checkpoint
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [len(client.search_model_versions(f"name = '{c}-rev'")) for c in ("ca", "cb")] == [1, 1]
    assert marked(mark) == []


@pytest.mark.slow
def test_a_stopped_sweep_exits_promptly_and_its_run_key_finishes_it(tmp_path):
    """SIGTERM to `prefixflow sweep` while its first trial trains (held after step 5, past its step-5 checkpoint):
    the command, the trial's training and the ephemeral API are gone within STOPPED_WITHIN_S; `prefixflow sweep
    SPEC --run-key K` then finishes the sweep and registers one version."""

    model, data = save_tiny_model(tmp_path / "model"), write_task(tmp_path / "rev.jsonl", n=120)
    d = spec_dict(model, data)
    d["train"].update(max_steps=20, checkpoint_every=5, eval_every=10)
    d["sweep"] = {"trials": 2, "sampler": "grid", "pruner": "none", "seed": 0,
                  "space": {"train.learning_rate": [2e-2, 1e-2]}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(d))
    mark = uuid.uuid4().hex
    env = command_env(tmp_path, mark)
    key = stopped_when_held(["sweep", str(spec)], env, 5, tmp_path / "sweep.log", mark)

    exe = str(Path(sys.executable).with_name("prefixflow"))
    again = subprocess.run([exe, "sweep", str(spec), "--run-key", key], env=env, capture_output=True, text=True,
                           timeout=900)
    out = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, out[-3000:]
    assert "registered acme-rev v1" in out
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    assert len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name = 'acme-rev'")) == 1
    assert marked(mark) == []
