"""A fleet's trainings packed into one job (launch.packing, launch.pack_job), embedded (a Prefect test server, a
local MLflow store) on a tiny model: each client's prefix equals its pipeline run alone, one client's bad
training fails that client only, and each client keeps its own flow run, MLflow run and registered version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixflow.services.spec import parse_spec, registered_model_name
from support.pipeline import patched_environ, save_tiny_model, spec_dict, write_task

# Three clients: different data sizes and seeds, step counts and validation schedules.
CLIENTS = {"a": dict(rows=120, seed=1, max_steps=8, eval_every=4),
           "b": dict(rows=80, seed=2, max_steps=5, eval_every=0),
           "c": dict(rows=160, seed=3, max_steps=6, eval_every=3)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("packing")
    with patched_environ({"PREFIXFLOW_HOME": str(root / "state")}, unset=("MLFLOW_TRACKING_URI",)), \
            prefect_test_harness(server_startup_timeout=120):
        yield {"root": root, "model": save_tiny_model(root / "tiny-llama")}


def client_spec(env, name: str, task: str, **train) -> dict:
    c = CLIENTS[name]
    data = write_task(env["root"] / f"{name}-{c['rows']}.jsonl", n=c["rows"], seed=c["seed"])
    d = spec_dict(env["model"], data, client=name, task=task)
    d["train"].update(max_steps=c["max_steps"], eval_every=c["eval_every"], checkpoint_every=2, **train)
    return d


def packs(env) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((env["root"] / "state" / "packs").glob("*/pack.json"))]


@pytest.fixture(scope="module")
def alone(env) -> dict:
    """Each client's prefix table from its pipeline run alone (no packer)."""
    from prefix_core import PrefixArtifact
    from prefixflow.flows.pipeline import prefix_pipeline

    runs = {name: prefix_pipeline(parse_spec(client_spec(env, name, "alone")), run_key=f"alone-{name}")
            for name in CLIENTS}
    return {name: PrefixArtifact.load(r.trained.artifact_uri).table() for name, r in runs.items()}


def test_a_packed_fleet_trains_each_client_as_alone_and_registers_each(env, alone):
    from prefix_core import PrefixArtifact
    from prefixflow.flows.fleet import fleet_flow
    from prefixflow.services import tracking

    specs = [parse_spec(client_spec(env, name, "packed")) for name in CLIENTS]
    entries = fleet_flow(len(specs), 8, 1)(specs, max_concurrent_trainings=1, pack=8)
    assert all(e.ok and e.outcome == "registered" for e in entries), [e.error for e in entries]
    [pack] = [p for p in packs(env) if any("/packed/" in m for m in p["members"])]  # one job trained all three
    assert sorted(member.split("/")[:2] for member in pack["members"]) == [[n, "packed"] for n in CLIENTS]
    for name, entry in zip(CLIENTS, entries, strict=True):
        versions = tracking.client().search_model_versions(f"name = '{registered_model_name(name, 'packed')}'")
        assert [str(v.version) for v in versions] == [str(entry.version)]  # one registered version per client
        packed_table = PrefixArtifact.load(_artifact(env, name, "packed")).table()
        assert (packed_table - alone[name]).abs().max().item() < 1e-5, name
        history = json.loads((_run_dir(env, name, "packed") / "history.json").read_text())
        assert max(h["step"] for h in history) == CLIENTS[name]["max_steps"]
    # what each client cost: its share of the pack, on its MLflow run and its version
    runs = {name: tracking.client().get_run(v.run_id) for name in CLIENTS
            for v in tracking.client().search_model_versions(f"name = '{registered_model_name(name, 'packed')}'")}
    for name, run in runs.items():
        m = run.data.metrics
        manifest = json.loads((_artifact(env, name, "packed") / "manifest.json").read_text())
        assert m["usage.tokens"] == manifest["training"]["train_tokens"] > 0
        assert m["usage.pack_members"] == 3 and m["usage.cpu_s"] > 0 and m["usage.gpu_s"] == 0
        assert 0 < m["usage.wall_s"] < m["usage.elapsed_s"]  # a share of the pack's time
        assert run.data.tags["usage.device"] == "cpu"
        [version] = tracking.client().search_model_versions(f"name = '{registered_model_name(name, 'packed')}'")
        assert float(version.tags["usage.tokens"]) == m["usage.tokens"]
    # the shares add up to the pack's time until its last member ended
    last = max(r.data.metrics["usage.elapsed_s"] for r in runs.values())
    assert sum(r.data.metrics["usage.wall_s"] for r in runs.values()) == pytest.approx(last, rel=0.01)


def test_usage_adds_up_each_clients_runs(env, alone):
    """`prefixflow usage` (JSON) per client: the sum of its runs' usage metrics (alone and packed trainings)."""
    from typer.testing import CliRunner

    from prefixflow.cli import app
    from prefixflow.services import tracking
    from prefixflow.services.spec import experiment_name

    res = CliRunner().invoke(app, ["usage", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["client"]: r for r in json.loads(res.stdout)}
    assert set(CLIENTS) <= set(rows)
    c = tracking.client()
    for name in CLIENTS:
        runs = c.search_runs([c.get_experiment_by_name(experiment_name(name)).experiment_id])
        trained = [r.data.metrics for r in runs if "usage.wall_s" in r.data.metrics]
        assert trained and rows[name]["trainings"] == len(trained)
        assert rows[name]["runs"] == len(runs)
        assert rows[name]["tokens_trained"] == sum(int(m["usage.tokens"]) for m in trained)
        assert rows[name]["train_hours"]["cpu"] == pytest.approx(sum(m["usage.cpu_s"] for m in trained) / 3600)
        assert rows[name]["wall_hours"] == pytest.approx(sum(m["usage.wall_s"] for m in trained) / 3600)
        versions = c.search_model_versions(f"tags.client = '{name}'")
        assert rows[name]["versions"] == len(versions)
    res = CliRunner().invoke(app, ["usage", "--since", "a while"])
    assert res.exit_code == 2 and "is not a duration or a date" in res.output


def test_a_killed_pack_is_retried_and_each_client_resumes_from_its_own_checkpoint(env, alone, monkeypatch, tmp_path):
    from prefix_core import PrefixArtifact
    from prefixflow.flows.fleet import fleet_flow
    from support.faults import FAULT_ENV

    specs = [parse_spec(client_spec(env, name, "killed")) for name in CLIENTS]
    monkeypatch.setenv(FAULT_ENV, f"kill:0:3:{tmp_path / 'killed-once'}")  # the pack dies after a step 3
    entries = fleet_flow(3, 8, 1)(specs, max_concurrent_trainings=1, pack=8)
    assert all(e.ok for e in entries), [e.error for e in entries]
    assert (tmp_path / "killed-once").read_text() == "3"
    for name in CLIENTS:
        events = [json.loads(line) for line in (_run_dir(env, name, "killed") / "train.log").read_text().splitlines()
                  if line.startswith("{")]
        assert [e["step"] for e in events if e["event"] == "resume"] == [2], name
        table = PrefixArtifact.load(_artifact(env, name, "killed")).table()
        assert (table - alone[name]).abs().max().item() < 1e-5, name


def test_a_client_whose_training_diverges_fails_alone_and_the_others_register(env, monkeypatch):
    from prefixflow.flows.fleet import fleet_flow
    from support.faults import FAULT_ENV

    specs = [parse_spec(client_spec(env, name, "diverge")) for name in CLIENTS]
    monkeypatch.setenv(FAULT_ENV, f"poison:0:2:{Path('runs') / 'b' / 'diverge'}")  # b's loss is NaN from step 3
    before = len(packs(env))
    entries = {e.client: e for e in fleet_flow(3, 8, 1)(specs, max_concurrent_trainings=1, pack=8)}
    trained = [m.split("/")[0] for pack in packs(env)[before:] for m in pack["members"] if "/diverge/" in m]
    assert trained.count("a") == trained.count("c") == 1  # trained once, in the pack where b diverged
    assert not entries["b"].ok and "training diverged: the loss is nan at step" in entries["b"].error
    assert entries["a"].ok and entries["c"].ok
    assert not list(_run_dir(env, "b", "diverge").glob("prefix"))  # nothing of b was registered or exported


def _run_dir(env, client: str, task: str):
    [folder] = list((env["root"] / "state" / "runs" / client / task).iterdir())
    return folder


def _artifact(env, client: str, task: str):
    return _run_dir(env, client, task) / "prefix"
