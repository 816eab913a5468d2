"""The pipeline spec: valid specs parse; every kind of mistake gets one clear message."""

import subprocess
import sys

import pytest

from prefixflow.services.spec import PipelineSpec, SpecError, TrainSpec, load_spec, parse_spec

GOOD = {
    "client": "acme",
    "task": "e2e",
    "data": {"source": "data.csv", "source_column": "mr", "target_column": "ref", "group_column": "mr",
             "template": "Table: {source}\nSentence:"},
    "prefix": {"num_virtual_tokens": 10, "projection_hidden": 512},
    "train": {"max_steps": 300, "batch_size": 8, "learning_rate": 8.0e-5, "strategy": "single"},
    "evaluate": {"metrics": ["bleu", "rougeL"], "gate": {"metric": "bleu", "min_gain_over_baseline": 5.0}},
    "schedule": "0 3 * * 1",
}


def with_(path: str, value):
    import copy

    data = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[leaf] = value
    return data


def test_good_spec():
    spec = parse_spec(GOOD)
    assert isinstance(spec, PipelineSpec) and spec.registered_model == "acme-e2e"
    assert spec.experiment == "prefixflow-acme" and len(spec.spec_hash()) == 16
    assert parse_spec(GOOD).spec_hash() == spec.spec_hash() != parse_spec(with_("train.max_steps", 1)).spec_hash()


@pytest.mark.parametrize(("path", "value", "message"), [
    ("client", "Acme Corp", "not a valid name"),
    ("task", "../etc", "not a valid name"),
    ("data.template", "no placeholder", "{source}"),
    ("data.template", "{source} {other}", "only use the {source}"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.max_steps", -5, "train.max_steps"),
    ("prefix.num_virtual_tokens", 0, "prefix.num_virtual_tokens"),
    ("train.strategy", "magic", "train.strategy"),
    ("evaluate.gate", {"metric": "chrf"}, "computed metrics"),
    ("schedule", "every monday", "cron"),
    ("train.machines", 2, "strategy single runs one process"),
    ("train.launcher", "ssh", "train.launcher"),
    ("train.slurm", {"extra_args": ["exclusive"]}, "srun options"),
    ("train.slurm", {"partition": "gpu"}, "train.launcher is local"),
    ("data.validation_fraction", 1.5, "data.validation_fraction"),
])
def test_bad_values(path, value, message):
    with pytest.raises(SpecError) as err:
        parse_spec(with_(path, value))
    assert message in str(err.value)


def test_unknown_field_named():
    with pytest.raises(SpecError, match=r"train\.max_stpes: unknown field"):
        parse_spec(with_("train.max_stpes", 3))


def test_load_yaml_resolves_relative_paths(tmp_path):
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(GOOD))
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.data.source == str(tmp_path / "data.csv")
    (tmp_path / "bad.yaml").write_text("client: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["acme-e2e.yaml", "acme-e2e-slurm.yaml"])
def test_example_specs_are_valid(name):
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / "specs" / name)
    if name == "acme-e2e-slurm.yaml":
        t = spec.train
        assert (t.launcher, t.machines, t.strategy, t.slurm.gpus_per_node) == ("slurm", 2, "deepspeed-zero3", 4)
        assert t.batch_size % (t.machines * t.processes_per_machine) == 0


def test_spec_parses_without_importing_torch():
    code = ("import sys\nfrom prefixflow.services.spec import parse_spec\n"
            "spec = parse_spec({'client': 'a', 'task': 'b', 'data': {'source': 'x.csv'}}, 'spec')\n"
            "assert spec.train.max_steps > 0\n"
            "heavy = ('torch', 'transformers', 'accelerate', 'prefect', 'mlflow')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_train_section_maps_to_one_training_config():
    from dataclasses import fields

    from prefix_core import TrainConfig

    spec = TrainSpec()
    shared = [f.name for f in fields(TrainConfig) if f.name in TrainSpec.model_fields]
    assert len(shared) >= 12
    assert all(getattr(spec, name) == getattr(TrainConfig, name) for name in shared)  # the defaults are TrainConfig's
    custom = TrainSpec(max_steps=90, learning_rate=1e-3, eval_every=7, checkpoint_every=9, mixed_precision="fp32",
                       early_stopping_patience=3, early_stopping_min_delta=0.01, warmup_steps=4, seed=5)
    config = custom.train_config(max_length=77)
    assert config.max_length == 77 and config.log_every == 3
    assert all(getattr(config, name) == getattr(custom, name) for name in shared)
