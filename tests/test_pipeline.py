"""The pipeline flow, embedded (a Prefect test server, a local MLflow store) on a tiny model:
end to end, cache reuse, idempotent registration, the gate, bad input, fleet concurrency."""

from __future__ import annotations

import itertools

import pytest
from typer.testing import CliRunner

from prefixflow.services.spec import parse_spec
from support.pipeline import patched_environ, save_tiny_model, spec_dict, write_task


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A state folder of its own (embedded MLflow) and a Prefect test server for this module."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("pipeline")
    with patched_environ({"PREFIXFLOW_HOME": str(root / "state")}, unset=("MLFLOW_TRACKING_URI",)), \
            prefect_test_harness(server_startup_timeout=120):
        yield {"root": root, "model": save_tiny_model(root / "tiny-llama"),
               "data": write_task(root / "rev.jsonl", n=120)}


def _versions(name: str) -> list:
    from prefixflow.services import tracking

    return sorted(tracking.client().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


@pytest.fixture(scope="module")
def first_run(env):
    """The first, uninterrupted pipeline run of acme/rev (single process)."""
    from prefixflow.flows.pipeline import prefix_pipeline

    return prefix_pipeline(parse_spec(spec_dict(env["model"], env["data"])), run_key="run-one")


def test_pipeline_registers_a_champion_that_generates_as_evaluated(env, first_run):
    from prefix_core import MultiPrefixGenerator, PrefixArtifact, load_base_model
    from prefix_core.precision import decide
    from prefixflow.services import lineage, registry, tracking

    spec = parse_spec(spec_dict(env["model"], env["data"]))
    result = first_run
    auto = decide("auto", "cpu")  # evaluation's precision (the spec trains in fp32: mixed_precision "no")
    reg = result.registration
    assert reg.created and reg.version == "1" and reg.champion == "1" and reg.previous is None
    mv = tracking.client().get_model_version(spec.registered_model, "1")
    assert mv.tags[tracking.RUN_KEY_TAG] == "run-one" and mv.tags["data_fingerprint"] == result.data.fingerprint
    assert mv.tags["spec_hash"] == spec.spec_hash() and mv.tags["gate"] == "passed"
    assert mv.tags["base_model"] == str(env["model"]) and len(mv.tags["base_fingerprint"]) > 8
    assert {"candidate.bleu", "baseline.bleu"} <= set(mv.tags)
    assert registry.alias_version(spec.registered_model, "candidate") == "1"
    run = tracking.client().get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "test_bleu" in run.data.metrics and "train_loss" in run.data.metrics
    params = run.data.params
    assert params["train.precision_used"] == "fp32" and params["train.precision_reason"].startswith("fp32 as requested")
    assert params["evaluate.precision_used"] == auto.mode and params["evaluate.precision_reason"] == auto.reason
    assert result.trained.precision["mode"] == "fp32" and result.report.precision["mode"] == auto.mode
    assert run.info.artifact_uri.startswith((env["root"] / "state" / "mlflow" / "artifacts").as_uri())
    counts, digest = result.data.counts, result.data.fingerprint[:12]  # the run's data, as MLflow shows it
    assert lineage.logged_data(result.mlflow_run_id) == {
        context: {"name": f"acme/rev:{split}", "digest": digest, "source": str(env["data"]), "rows": counts[split]}
        for split, context in (("train", "training"), ("validation", "validation"), ("test", "testing"))}
    lineage.log_data(result.mlflow_run_id, spec, result.data)  # a retried opening adds no second input
    assert len(tracking.client().get_run(result.mlflow_run_id).inputs.dataset_inputs) == 3
    artifacts = {a.path for a in tracking.client().list_artifacts(result.mlflow_run_id, "eval")}
    assert {"eval/samples.json", "eval/loss_curve.png", "eval/report.json"} <= artifacts
    # pulled @champion generates exactly what the evaluation generated before registration
    pulled = registry.download(f"{spec.client}/{spec.task}@champion", env["root"] / "pulled")
    art = PrefixArtifact.load(pulled)
    assert art.manifest["pipeline"]["run_key"] == "run-one"
    assert art.manifest["training"]["precision"] == result.trained.precision
    assert result.trained.precision["requested"] == "fp32"  # "no" is fp32
    base, tok = load_base_model(str(env["model"]), dtype=auto.dtype)  # as `prefixflow generate` loads it
    gen = MultiPrefixGenerator(base, tok, {"p": art})
    samples = result.report.samples
    texts = gen.generate([("p", gen.render("p", s["source"])) for s in samples], max_new_tokens=12, do_sample=False)
    assert [t.split("\n", 1)[0].strip() for t in texts] == [s["candidate"] for s in samples]
    assert result.timings["total"] >= result.timings["train"] > 0
    # Prefect artifacts: the training progress (at 100%) and the markdown summary
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts() if a.key}
    assert artifacts["acme-rev-training"].data == 100.0
    summary = artifacts["acme-rev-summary"].data
    assert "acme-rev v1" in summary and "| baseline |" in summary and result.mlflow_run_id in summary


def test_rerun_reuses_cached_work_and_registration_is_idempotent(env, first_run):
    from prefixflow.flows.pipeline import prefix_pipeline
    from prefixflow.services.registration import register

    spec = parse_spec(spec_dict(env["model"], env["data"]))
    first = prefix_pipeline(spec, run_key="run-one")  # same run again: data reused, later tasks cached
    assert first.data.reused
    assert first.trained == first_run.trained and first.report == first_run.report  # not redone
    assert first.registration.version == "1" and len(_versions(spec.registered_model)) == 1
    again = register(spec, first.data, first.trained, first.report, "run-one", first.mlflow_run_id)
    assert not again.created and again.version == "1" and len(_versions(spec.registered_model)) == 1


def test_gate_refuses_a_worse_candidate_and_keeps_the_champion(env, first_run):
    from prefixflow.flows.pipeline import prefix_pipeline
    from prefixflow.services import registry

    d = spec_dict(env["model"], env["data"])
    d["evaluate"]["gate"]["min_gain_over_champion"] = 1000.0  # no candidate can pass
    spec = parse_spec(d)
    result = prefix_pipeline(spec, run_key="run-two")
    assert not result.report.gate.passed and "champion" in result.report.metrics
    assert result.report.champion_version == "1"
    assert result.registration.version == "2" and result.registration.champion == "1"
    assert registry.alias_version(spec.registered_model, "candidate") == "2"
    assert registry.alias_version(spec.registered_model, "champion") == "1"
    # promote and roll back by hand
    assert registry.promote(spec.registered_model, "2") == ("1", "2")
    assert registry.alias_version(spec.registered_model, "previous") == "1"
    assert registry.rollback(spec.registered_model) == ("2", "1")
    assert registry.alias_version(spec.registered_model, "champion") == "1"
    # the same through the CLI, and a clear message for a version that does not exist
    from prefixflow.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["promote", "acme/rev@candidate"])
    assert out.exit_code == 0 and "v1 -> v2" in out.output, out.output
    out = runner.invoke(app, ["rollback", "acme/rev"])
    assert out.exit_code == 0 and registry.alias_version(spec.registered_model, "champion") == "1"
    out = runner.invoke(app, ["promote", "acme/rev/9"])
    assert out.exit_code == 2 and "has no version 9" in out.output and "Traceback" not in out.output


def test_a_gate_with_canary_starts_the_passing_version_as_canary(env, first_run):
    """evaluate.gate.canary: with no champion yet the version becomes champion as usual; with one, a version that
    passes starts as @canary with the share and the finish rule as tags, and @champion does not move."""
    from prefixflow.services import canary, registry
    from prefixflow.services.registration import register

    d = spec_dict(env["model"], env["data"], client="canary")
    d["evaluate"]["gate"]["canary"] = {"share": 20, "min_requests": 300}
    spec = parse_spec(d)
    first = register(spec, first_run.data, first_run.trained, first_run.report, "c-one", first_run.mlflow_run_id)
    assert first.champion == first.version == "1" and first.canary is None
    report = first_run.report.model_copy(update={"champion_version": "1"})  # passed, against champion v1
    second = register(spec, first_run.data, first_run.trained, report, "c-two", first_run.mlflow_run_id)
    assert (second.version, second.champion, second.canary) == ("2", "1", "2")
    assert "starts as @canary with 20% of the requests naming @champion (v1)" in second.note
    assert canary.current("canary-rev") == canary.Canary("canary-rev", "2", 20.0, "1", 300)
    assert registry.alias_version("canary-rev", "champion") == "1"
    assert canary.finish_if("canary-rev", "2") and canary.current("canary-rev") is None
    assert registry.alias_version("canary-rev", "champion") == "2"
    assert registry.alias_version("canary-rev", "previous") == "1"


@pytest.mark.parametrize("problem,message", [
    ("missing", "does not exist"),
    ("column", "no column 'text'"),
])
def test_bad_input_fails_cleanly_and_touches_nothing_registered(env, tmp_path, problem, message):
    from prefixflow.cli import app

    d = spec_dict(env["model"], env["data"])
    if problem == "missing":
        d["data"]["source"] = str(tmp_path / "nope.jsonl")
    else:
        d["data"]["source_column"] = "text"
    spec_file = tmp_path / "spec.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(d))
    before = [(v.version, v.aliases) for v in _versions("acme-rev")]
    result = CliRunner().invoke(app, ["run", str(spec_file)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert [(v.version, v.aliases) for v in _versions("acme-rev")] == before


def test_bad_spec_is_one_message(tmp_path):
    from prefixflow.cli import app

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("client: Acme!\ntask: e2e\ndata: {source: x.csv, template: 'no placeholder'}\nbogus: 1\n")
    result = CliRunner().invoke(app, ["run", str(spec_file)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    for needle in ("client", "data.template", "bogus: unknown field"):
        assert needle in result.output


def test_fleet_runs_at_most_n_trainings_at_once(env):
    from prefixflow.flows.fleet import retrain_fleet

    specs = [parse_spec(spec_dict(env["model"], env["data"], client="fleet", task=f"t{i}")) for i in range(3)]
    entries = retrain_fleet(specs, max_concurrent_trainings=1, pack=1)  # every training a job of its own
    assert all(e.ok for e in entries), [e.error for e in entries]
    spans = sorted((e.launched_at, e.finished_at) for e in entries)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.05, spans  # no two trainings overlapped


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "ddp", "deepspeed-zero2"])
def test_killed_rank_is_retried_by_prefect_and_resumes_exactly(env, first_run, strategy, monkeypatch, tmp_path,
                                                               fault_rng):
    """SIGKILL one rank after a random step past the step-3 checkpoint; Prefect retries the training task,
    every rank is relaunched, training resumes from step 3 and ends with the prefix of an uninterrupted
    pipeline run of the same spec (<= 1e-6, fp32)."""
    from prefix_core import PrefixArtifact
    from prefixflow.flows.pipeline import prefix_pipeline
    from support.faults import kill_fault

    d = spec_dict(env["model"], env["data"], client="resume", task=strategy)
    d["train"].update(strategy=strategy, processes_per_machine=1 if strategy == "single" else 2)
    if strategy == "ddp":  # a hung launch (seen once under CI load: no output for 900 s after the kill) is caught by
        d["train"]["hang_timeout_s"] = 240  # the launcher's hang check and retried, before pytest's own timeout
    # the uninterrupted run of the same spec (for single: the module's first run)
    uninterrupted = first_run if strategy == "single" else prefix_pipeline(parse_spec(d), run_key=f"ref-{strategy}")
    step = fault_rng.choice([4, 5])  # after the step-3 checkpoint, before the last step
    rank = 0 if strategy == "single" else fault_rng.choice([0, 1])
    marker = tmp_path / "killed"
    for key, value in kill_fault(rank, step, marker).items():
        monkeypatch.setenv(key, value)
    result = prefix_pipeline(parse_spec(d), run_key=f"kill-{strategy}")
    assert marker.read_text() == str(step)  # the rank really died once
    assert result.trained.resumed_from == 3 and result.trained.steps == 6
    assert uninterrupted.trained.resumed_from is None and uninterrupted.trained.steps == 6
    ours = PrefixArtifact.load(result.trained.artifact_uri).table()
    reference = PrefixArtifact.load(uninterrupted.trained.artifact_uri).table()
    assert (ours - reference).abs().max().item() <= 1e-6
    if strategy != "single":  # and the strategy itself changes nothing but the all-reduce order (~2e-7)
        single = PrefixArtifact.load(first_run.trained.artifact_uri).table()
        assert (ours - single).abs().max().item() <= 1e-5


def test_retrain_on_change_skips_an_unchanged_champion_and_trains_on_changed_data(env):
    """A run whose data, base model and training settings equal the champion's ends after preparing the data
    (no training, no new version, a summary saying why); changed data trains and registers a new version; a
    changed launch setting (strategy, checkpoints) is not a change; ``retrain: always`` trains anyway."""
    from prefixflow.flows.pipeline import prefix_pipeline

    d = spec_dict(env["model"], env["data"], client="skip", task="rev")
    first = prefix_pipeline(parse_spec(d), run_key="skip-1")
    name = first.registration.name
    assert first.outcome == "registered" and first.registration.champion == "1"

    launch_only = {**d, "train": {**d["train"], "checkpoint_every": 2, "hang_timeout_s": 600}}
    same = prefix_pipeline(parse_spec(launch_only), run_key="skip-2", retrain="on_change")
    assert same.outcome == "unchanged" and same.trained is None and same.registration is None
    assert same.unchanged.version == "1" and "equal those of champion v1" in same.unchanged.reason
    assert same.mlflow_run_id is None and len(_versions(name)) == 1

    runner = CliRunner()  # the CLI says why, and the spec's own `retrain` is honoured
    from prefixflow.cli import app

    spec_file = env["root"] / "skip.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump({**d, "retrain": "on_change"}))
    out = runner.invoke(app, ["run", str(spec_file)])
    assert out.exit_code == 0 and "unchanged" in out.output and "@champion stays v1" in out.output, out.output
    assert len(_versions(name)) == 1

    changed = {**d, "data": {**d["data"], "source": str(write_task(env["root"] / "rev2.jsonl", n=120, seed=7))}}
    trained = prefix_pipeline(parse_spec(changed), run_key="skip-3", retrain="on_change")
    assert trained.outcome == "registered" and trained.registration.created and trained.registration.version == "2"
    always = prefix_pipeline(parse_spec({**changed, "retrain": "always"}), run_key="skip-4", retrain="on_change")
    assert always.outcome == "registered" and always.registration.version == "3"


def test_flow_parameter_is_the_spec_form():
    """The Prefect UI renders the flow's parameters from this schema: the spec as a typed form."""
    from prefixflow.flows.pipeline import prefix_pipeline

    schema = prefix_pipeline.parameters.model_dump()
    assert schema["required"] == ["spec"]
    spec_def = schema["definitions"]["PipelineSpec"]
    assert {"client", "task", "base_model", "data", "train", "evaluate", "schedule"} <= set(spec_def["properties"])
    assert "pattern" in spec_def["properties"]["client"]
    strategy = schema["definitions"]["TrainSpec"]["properties"]["strategy"]
    assert strategy["enum"] == ["single", "ddp", "deepspeed-zero2", "deepspeed-zero3"]
