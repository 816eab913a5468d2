"""The prefixflow CLI and the demo job."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefix_core import PrefixArtifact, precision
from prefixflow.cli import app
from prefixflow.flows.demo_task import TEMPLATE, make_examples, split
from prefixflow.flows.embedded import STARTUP_TIMEOUT_VAR

runner = CliRunner()


def test_demo_task_is_deterministic_and_split_disjoint():
    assert make_examples(5, seed=1) == make_examples(5, seed=1)
    train, val, test = split()
    sources = [{e.source for e in part} for part in (train, val, test)]
    assert len(train) == 400 and len(val) == 40 and len(test) == 20
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    assert "{source}" in TEMPLATE


def test_generate_with_a_bad_prefix_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["generate", "--prefix", str(tmp_path / "nope"), "hello"])
    assert result.exit_code == 2
    assert "not a prefix artifact" in result.output and "Traceback" not in result.output


def test_bad_option_is_refused():
    result = runner.invoke(app, ["demo", "--steps", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


CLIENT_ENV = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFIXFLOW_HOME", "PREFECT_HOME", STARTUP_TIMEOUT_VAR,
              "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user who has set nothing of ours (wide terminal so table cells stay whole)."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    return {**env, "COLUMNS": "200", **extra}


def _prefixflow(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefixflow")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_doctor_on_this_machine(tmp_path):
    result = _prefixflow("doctor", env=_user_env(PREFIXFLOW_HOME=str(tmp_path)), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert precision.cpu_capability() in out and precision.decide("auto", "cpu").reason in out
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in out and "embedded" in out
    assert "first run: creates its database" in out and str(tmp_path) in out


def test_doctor_reports_an_unreachable_server_with_its_fix(tmp_path):
    env = _user_env(PREFIXFLOW_HOME=str(tmp_path), MLFLOW_TRACKING_URI="http://127.0.0.1:9/")
    result = _prefixflow("doctor", env=env, timeout=120)
    out = " ".join(result.stdout.split())
    assert result.returncode == 1 and "unreachable" in out and "prefixflow stack up" in out
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_demo_command_first_run_in_a_new_state_and_prefect_home(tmp_path):
    """README command 1 as a user runs it: `prefixflow demo` as a subprocess with a brand-new state folder and
    Prefect home (the ephemeral Prefect API first migrates a new database: Prefect's default 20 s allowance
    timed out on a 2-core AVX2 CPU) and no Prefect setting of ours in the environment. The whole pipeline on
    SmolLM2, then the registered prefix pulled back and compared with the bare model."""
    from mlflow import MlflowClient

    state = tmp_path / "state"
    result = _prefixflow("demo", "--state", str(state), "--steps", "20", env=_user_env(), timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = " ".join(result.stdout.split())
    assert out.index("doctor:") < out.index("first run with Prefect home") < out.index("registered demo-restaurants")
    assert (state / "prefect" / "prefect.db").exists()  # Prefect's home is under the state folder
    uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    [version] = client.search_model_versions("name = 'demo-restaurants'")
    params = client.get_run(version.run_id).data.params
    auto = precision.decide("auto", "cpu")
    assert params["train.mixed_precision"] == "auto" and params["train.precision_used"] == auto.mode
    assert params["evaluate.precision_used"] == auto.mode and params["train.precision_reason"] == auto.reason
    pulled = next(p for p in (state / "champion", state / "candidate") if p.exists())
    art = PrefixArtifact.load(pulled)
    assert art.prompt_template == TEMPLATE and art.manifest["pipeline"]["client"] == "demo"
    assert art.manifest["training"]["precision"]["mode"] == auto.mode and art.manifest["training"]["steps"] == 20
    assert list((state / "mlflow" / "artifacts").rglob("prefix.safetensors"))  # all under the state folder
    match = re.search(r"exact match on 20 held-out records: no prefix (\d+)%, with the pulled prefix (\d+)%", out)
    assert match and int(match[2]) > int(match[1])


def test_first_run_note_only_for_a_new_prefect_home(tmp_path, monkeypatch):
    from prefixflow.flows.embedded import use_embedded_prefect

    for var in ("PREFECT_API_URL", "PREFECT_HOME", "PREFIXFLOW_HOME"):
        monkeypatch.setenv(var, "")  # recorded, so monkeypatch restores what the calls below set
        monkeypatch.delenv(var)
    monkeypatch.setenv(STARTUP_TIMEOUT_VAR, "45")  # a value the user set wins
    note = use_embedded_prefect(tmp_path / "s")
    assert note and str(tmp_path / "s" / "prefect") in note and os.environ[STARTUP_TIMEOUT_VAR] == "45"
    (tmp_path / "s" / "prefect" / "prefect.db").write_bytes(b"")
    assert use_embedded_prefect(tmp_path / "s") is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.delenv("PREFECT_HOME")
    assert use_embedded_prefect(tmp_path / "t") is None and "PREFECT_HOME" not in os.environ


def test_a_json_result_keeps_library_prints_off_stdout(capsys):
    """``--format json``: what a library prints while the run goes (MLflow's "View run ..." lines, with a tracking
    server) goes to stderr, so stdout is exactly the JSON printed afterwards."""
    from prefixflow.cli.pipeline import _keyed_run

    def chatty_run(**_):
        sys.stdout.write("🏃 View run r at: http://127.0.0.1:5000/#/experiments/1/runs/abc\n")
        print("more chatter")
        return "result"

    assert _keyed_run("run key", "prefixflow fleet F --run-key k1", "it stops", "finishes it", chatty_run,
                      on_stderr=True) == "result"
    out, err = capsys.readouterr()
    assert out == ""
    assert "View run r" in err and "more chatter" in err and "k1" in err
    assert _keyed_run("run key", "prefixflow fleet F --run-key k2", "it stops", "finishes it", chatty_run) == "result"
    assert "View run r" in capsys.readouterr().out
