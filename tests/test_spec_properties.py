"""Property tests (hypothesis) of what users write: spec fields, prompt templates and spec files. Whatever the
input, the answer is an accepted spec that really is valid, or one SpecError / ValueError with a message; never
another exception (a traceback), never an invalid spec accepted."""

from __future__ import annotations

import copy
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefix_core.template import check_template, render
from prefixflow.services.spec import Metric, PipelineSpec, SpecError, load_spec, parse_spec

GOOD = {
    "client": "acme", "task": "e2e",
    "data": {"source": "data.csv", "source_column": "mr", "target_column": "ref", "group_column": "mr",
             "template": "Table: {source}\nSentence:"},
    "prefix": {"num_virtual_tokens": 10, "projection_hidden": 512},
    "train": {"max_steps": 300, "batch_size": 8, "learning_rate": 8.0e-5, "strategy": "single"},
    "evaluate": {"metrics": ["bleu", "rougeL"], "gate": {"metric": "bleu", "min_gain_over_baseline": 5.0}},
    "sweep": {"trials": 4, "space": {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}},
}
FIELDS = [
    "client", "task", "base_model", "schedule", "retrain",
    "data.source", "data.template", "data.validation_fraction", "data.test_fraction", "data.max_length",
    "data.group_column", "prefix.num_virtual_tokens", "prefix.projection_hidden", "prefix.init",
    "prefix.init_text", "train.max_steps", "train.batch_size", "train.grad_accum", "train.learning_rate",
    "train.warmup_steps", "train.mixed_precision", "train.eval_every", "train.eval_max_examples",
    "train.strategy", "train.machines", "train.processes_per_machine", "train.launcher",
    "train.early_stopping_min_delta", "evaluate.metrics", "evaluate.max_new_tokens", "evaluate.num_beams",
    "evaluate.length_penalty", "evaluate.max_examples", "evaluate.gate.metric",
    "evaluate.gate.min_gain_over_baseline", "sweep.trials", "sweep.concurrent", "sweep.sampler", "sweep.pruner",
    "sweep.space", "sweep.final_max_steps", "unknown_field", "train.unknown_field",
]
NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["single", "ddp", "bf16", "text", "bleu", "tpe", "0 3 * * 1", "{source}",
                                           "acme", "a-b", "../x", "", "random", "always"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _set(data: dict, path: str, value) -> None:
    """``data[a][b] = value`` for ``"a.b"``; a parent that is not a mapping becomes an empty one."""
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def _finite_numbers(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return True


def assert_valid(spec: PipelineSpec) -> None:
    """What an accepted spec must satisfy, checked independently of the spec's own validators."""
    assert NAME.match(spec.client) and len(spec.client) <= 40, spec.client
    assert NAME.match(spec.task) and len(spec.task) <= 40, spec.task
    t, d, p, e = spec.train, spec.data, spec.prefix, spec.evaluate
    assert t.max_steps >= 1 and t.batch_size >= 1 and t.grad_accum >= 1 and t.warmup_steps >= 0
    assert 0 < t.learning_rate < math.inf
    assert t.eval_every >= 0 and t.eval_max_examples >= 0 and t.machines >= 1 and t.processes_per_machine >= 1
    assert t.strategy != "single" or (t.machines == 1 and t.processes_per_machine == 1)
    assert 0 < d.validation_fraction < 1 and 0 < d.test_fraction < 1 and d.max_length >= 8
    assert isinstance(d.template, str) and "{source}" in d.template
    assert "SOURCE-TEXT" in render(d.template, "SOURCE-TEXT")
    assert 1 <= p.num_virtual_tokens <= 512 and (p.projection_hidden is None or p.projection_hidden >= 1)
    assert e.metrics and set(e.metrics) <= set(Metric.__args__) and e.gate.metric in e.metrics
    assert e.max_new_tokens >= 1 and e.num_beams >= 1 and (e.max_examples is None or e.max_examples >= 1)
    assert spec.schedule is None or len(spec.schedule.split()) == 5
    assert _finite_numbers(spec.model_dump(mode="python"))
    if spec.sweep is not None:
        assert spec.sweep.trials >= 1 and spec.sweep.concurrent >= 1 and spec.sweep.space
    assert parse_spec(spec.model_dump(mode="json")) == spec  # what we accept, we accept again unchanged


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=4))
def test_any_field_change_is_valid_or_one_clear_error(changes):
    data = copy.deepcopy(GOOD)
    for path, value in changes:
        _set(data, path, value)
    try:
        spec = parse_spec(data)
    except SpecError as err:
        message = str(err)
        assert message.startswith("spec is invalid:\n  ") and "Traceback" not in message
        return
    assert_valid(spec)


NUMERIC = [f for f in FIELDS if f.split(".")[-1] in {
    "validation_fraction", "test_fraction", "max_length", "num_virtual_tokens", "projection_hidden", "max_steps",
    "batch_size", "grad_accum", "learning_rate", "warmup_steps", "eval_every", "eval_max_examples", "machines",
    "processes_per_machine", "early_stopping_min_delta", "max_new_tokens", "num_beams", "length_penalty",
    "max_examples", "min_gain_over_baseline", "trials", "concurrent", "final_max_steps"}]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NUMERIC), st.one_of(st.floats(), st.integers(-10**12, 10**12)))
def test_any_number_in_a_numeric_field_is_valid_or_one_clear_error(path, number):
    data = copy.deepcopy(GOOD)
    _set(data, path, number)
    try:
        spec = parse_spec(data)
    except SpecError as err:
        assert path.split(".")[-1] in str(err), str(err)
        return
    assert_valid(spec)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("{}source!:r.[0]x ab\n")), max_size=24))
def test_any_template_is_usable_or_refused_with_its_fix(template):
    try:
        check_template(template)
    except ValueError as err:
        assert "{source}" in str(err)
        return
    rendered = render(template, "SRC{}")  # braces in the source stay literal
    assert "SRC{}" in rendered and render(template, "other") != rendered


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=200), st.sampled_from([
    "!!python/object/apply:os.system ['echo owned']", "client: [unclosed", "- a\n- b", "client: acme\ntask: x\n",
    "client: acme\ntask: e2e\ndata: {source: d.csv}\ntrain: {max_steps: .inf}", "a: &a [*a]", "? [a]\n: b",
    "client: acme\ntask: e2e\ndata: 5", "\t\x00", "client: 1e999"])))
def test_any_spec_file_parses_or_gives_one_clear_error(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    try:
        spec = load_spec(path)
    except SpecError as err:
        assert str(err) and "Traceback" not in str(err)
        return
    assert_valid(spec)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_numbers_must_be_finite(value):
    with pytest.raises(SpecError, match="finite"):
        parse_spec({**GOOD, "train": {**GOOD["train"], "learning_rate": value}})
