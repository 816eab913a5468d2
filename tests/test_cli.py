"""The prefixflow CLI and the demo job."""

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.demo_task import TEMPLATE, make_examples, split
from prefix_core import PrefixArtifact

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


@pytest.mark.slow
def test_demo_job_end_to_end(tmp_path, monkeypatch):
    """README command 1 in small: the whole pipeline on SmolLM2 with embedded Prefect and MLflow, then
    the registered prefix pulled back and compared with the bare model."""
    from flows.demo import run_demo

    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFIXFLOW_HOME", "PREFECT_HOME"):
        monkeypatch.delenv(var, raising=False)
    result = run_demo(tmp_path, steps=20)
    p = result.pipeline
    assert (tmp_path / "mlflow" / "mlflow.db").exists() and (tmp_path / "prefect").is_dir()
    assert list((tmp_path / "mlflow" / "artifacts").rglob("prefix.safetensors"))  # all under the state folder
    art = PrefixArtifact.load(result.pulled)
    assert art.prompt_template == TEMPLATE and art.manifest["pipeline"]["client"] == "demo"
    assert p.registration.version == "1" and result.pulled_alias in ("champion", "candidate")
    assert p.trained.steps == 20 and p.trained.final_train_loss < 3.0
    assert p.report.metrics["candidate"]["bleu"] > p.report.metrics["baseline"]["bleu"]
    assert len(result.rows) == 20 and all(len(r) == 4 for r in result.rows)
    assert result.rows[0][1] != result.rows[0][2]  # the prefix changes the generation
    assert p.timings["orchestration"] < p.timings["total"]
