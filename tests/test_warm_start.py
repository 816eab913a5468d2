"""Warm start (``prefix.init: champion``) on the embedded pipeline and a tiny model: a warm-started training
begins exactly where the registered version ended, says so in its version's tags and its run's lineage, starts
cold when rows the version learned from were removed, and refuses a version it cannot continue."""

from __future__ import annotations

import pytest

from prefixflow.services.spec import parse_spec
from support.pipeline import patched_environ, save_tiny_model, spec_dict, write_task


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("warm")
    with patched_environ({"PREFIXFLOW_HOME": str(root / "state")}, unset=("MLFLOW_TRACKING_URI",)), \
            prefect_test_harness(server_startup_timeout=120):
        yield {"root": root, "model": save_tiny_model(root / "tiny-llama"), "data": write_task(root / "d.jsonl")}


@pytest.fixture(scope="module")
def champion(env):
    """warm/rev v1, trained cold: the version the tests start from."""
    from prefixflow.flows.pipeline import prefix_pipeline

    return prefix_pipeline(parse_spec(_spec(env, env["data"])), run_key="cold")


def _spec(env, data) -> dict:
    """warm/rev's spec, scored with chrF too (never 0 for a tiny model's output, unlike its BLEU)."""
    d = spec_dict(env["model"], data, client="warm")
    d["evaluate"]["metrics"] = ["bleu", "chrf", "exact_match"]
    return d


def _warm(env, data=None, **prefix) -> dict:
    d = _spec(env, data or env["data"])
    d["prefix"] = {**d["prefix"], "init": "champion", **prefix}
    return d


def _state(name: str) -> tuple[list[str], dict]:
    from prefixflow.services import registry, tracking

    versions = sorted(v.version for v in tracking.client().search_model_versions(f"name = '{name}'"))
    return versions, dict(registry.registered_model(name).aliases)


def test_a_warm_start_begins_where_the_champion_ended(env, champion):
    from prefix_core import PrefixArtifact
    from prefixflow.flows.pipeline import prefix_pipeline
    from prefixflow.services import lineage, tracking

    ended = PrefixArtifact.load(champion.trained.artifact_uri).manifest["training"]["best_eval_loss"]
    result = prefix_pipeline(parse_spec(_warm(env)), run_key="warm")  # the same data: the same validation split

    warm = result.trained.warm_start
    assert warm["name"] == "warm-rev" and warm["version"] == "1" and warm["cold"] is None
    assert abs(warm["step0_eval_loss"] - ended) <= 1e-6, (warm, ended)  # its validation loss before any update
    mv = tracking.client().get_model_version("warm-rev", result.registration.version)
    assert mv.tags["warm_start.from"] == "warm-rev v1"
    assert abs(float(mv.tags["warm_start.step0_eval_loss"]) - ended) <= 1e-6
    run = tracking.client().get_run(result.mlflow_run_id)
    assert min(m.step for m in tracking.client().get_metric_history(run.info.run_id, "eval_loss")) == 0
    inherited = [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs
                 if {t.key: t.value for t in i.tags}.get(lineage.CONTEXT_TAG) == "warm-start"]
    digest = champion.data.fingerprint[:12]
    splits = ("test", "train", "validation")
    assert sorted(inherited) == sorted((f"warm/rev:{s} via warm-rev v1", digest) for s in splits)
    assert set(lineage.logged_data(result.mlflow_run_id)) == {"training", "validation", "testing"}
    # the same test set and v1 is the champion compared: its scores on v1's test set are the main comparison's
    assert result.report.warm_start_test == {"version": "warm-rev v1", "test_sources": result.report.test_sources,
                                             "metrics": {"candidate": result.report.metrics["candidate"],
                                                         "started_from": result.report.metrics["champion"]}}


def test_rows_added_start_warm_and_rows_removed_start_cold(env, champion, tmp_path):
    from prefixflow.flows.pipeline import prefix_pipeline
    from prefixflow.services import tracking

    more = write_task(tmp_path / "more.jsonl", n=140)  # the same first 120 rows, then 20 new ones
    fewer = write_task(tmp_path / "fewer.jsonl", n=100)  # 20 of the rows v1 learned from are gone
    added = prefix_pipeline(parse_spec(_warm(env, more, init_from="warm/rev/1")), run_key="added")
    assert added.trained.warm_start["version"] == "1" and added.trained.warm_start["step0_eval_loss"] > 0
    # scored on v1's own test set too (another split of the new data here), beside v1: v1 scores there exactly as
    # it did in its own evaluation
    on_v1 = added.report.warm_start_test
    assert on_v1["version"] == "warm-rev v1" and on_v1["test_sources"] == champion.report.test_sources
    sources = [{row["source"] for row in run.report.samples} for run in (added, champion)]
    assert sources[0] != sources[1]  # this run's test set is another one than v1's
    assert on_v1["metrics"]["started_from"] == champion.report.metrics["candidate"]
    assert champion.report.metrics["candidate"]["chrf"] > 0 and set(on_v1["metrics"]["candidate"]) == {
        "bleu", "chrf", "exact_match"}
    assert "on warm-rev v1's own test set: bleu" in added.report.gate.reason
    tags = tracking.client().get_model_version("warm-rev", added.registration.version).tags
    assert float(tags["warm_start.test.started_from.chrf"]) == pytest.approx(
        champion.report.metrics["candidate"]["chrf"], abs=1e-4)
    removed = prefix_pipeline(parse_spec(_warm(env, fewer, init_from="warm/rev/1")), run_key="removed")
    cold = removed.trained.warm_start
    assert cold["version"] == "1" and "no longer in the data" in cold["cold"]
    assert "step0_eval_loss" not in cold
    mv = tracking.client().get_model_version("warm-rev", removed.registration.version)
    assert "warm_start.from" not in mv.tags and "no longer in the data" in mv.tags["warm_start.cold"]


def test_a_first_run_with_no_champion_starts_cold(env, tmp_path):
    from prefixflow.flows.pipeline import prefix_pipeline

    d = spec_dict(env["model"], env["data"], client="first")
    d["prefix"] = {**d["prefix"], "init": "champion"}
    result = prefix_pipeline(parse_spec(d), run_key="first")
    assert result.trained.warm_start == {"reference": "first/rev@champion", "name": "first-rev", "version": None,
                                         "run_id": None, "cold": "first-rev has no @champion yet"}
    assert result.registration.champion == "1"


@pytest.mark.parametrize("change, words", [
    ({"prefix__num_virtual_tokens": 8}, "it has 4 virtual tokens and this training 8"),
    ({"prefix__projection_hidden": 16}, "an MLP of width 32 and this training has prefix.projection_hidden 16"),
    ({"base_model": "other"}, "same shape, different weights"),
])
def test_a_version_that_cannot_be_continued_is_refused_and_nothing_changes(env, champion, change, words):
    from prefixflow.flows.pipeline import prefix_pipeline
    from support.tiny_models import char_tokenizer, make_base

    d = _warm(env, init_from="warm/rev/1")  # v1: trained on this data (the champion may have been trained on more)
    if change.get("base_model"):  # the same shapes, other weights
        other = env["root"] / "other-llama"
        if not other.exists():
            make_base("llama", seed=1).save_pretrained(other)
            char_tokenizer().save_pretrained(other)
        d["base_model"] = str(other)
    else:
        key, value = next(iter(change.items()))
        section, field = key.split("__")
        d[section] = {**d[section], field: value}
    before = _state("warm-rev")
    with pytest.raises(Exception) as err:
        prefix_pipeline(parse_spec(d), run_key=f"refused-{'-'.join(change)}")
    assert words in str(err.value), str(err.value)
    assert _state("warm-rev") == before  # no version, no alias moved
