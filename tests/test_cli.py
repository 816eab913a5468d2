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
def test_demo_job_end_to_end(tmp_path):
    """README command 1 in small: train on SmolLM2, save, reload, generate with and without."""
    from flows.demo import run_demo

    events = []
    result = run_demo(tmp_path, steps=20, on_event=events.append)
    art = PrefixArtifact.load(result.artifact_dir)
    assert art.prompt_template == TEMPLATE and art.manifest["training"]["steps"] == 20
    assert len(result.rows) == 20 and all(len(r) == 4 for r in result.rows)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert losses[-1] < losses[0]
    assert result.rows[0][1] != result.rows[0][2]  # the prefix changes the generation
    assert (tmp_path / "checkpoints").is_dir()
