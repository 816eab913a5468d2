"""Fleet files (services.fleet_file): defaults merged under each client's own fields, relative data paths, and one
error naming every bad client."""

from __future__ import annotations

import pytest
import yaml

from prefixflow.services.fleet_file import load_fleet_file, merged
from prefixflow.services.spec import SpecError

DEFAULTS = {"task": "e2e", "base_model": "smollm2-135m",
            "data": {"template": "{source} ->", "max_length": 96},
            "train": {"max_steps": 50, "learning_rate": 0.01}}


def write(tmp_path, clients, defaults=DEFAULTS):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, "clients": clients}))
    return path


def test_a_client_gets_the_defaults_with_its_own_fields_merged_over_them(tmp_path):
    specs = load_fleet_file(write(tmp_path, [
        {"client": "acme", "data": {"source": "data/acme.jsonl"}},
        {"client": "globex", "task": "chat", "data": {"source": "s3://bucket/globex.jsonl", "max_length": 64},
         "train": {"learning_rate": 0.001}}]))
    acme, globex = specs
    assert (acme.client, acme.task, globex.task) == ("acme", "e2e", "chat")
    assert acme.data.source == str((tmp_path / "data" / "acme.jsonl").resolve())  # against the file's folder
    assert globex.data.source == "s3://bucket/globex.jsonl"
    assert (acme.data.max_length, globex.data.max_length) == (96, 64)
    assert globex.data.template == acme.data.template == "{source} ->"
    assert (acme.train.learning_rate, globex.train.learning_rate) == (0.01, 0.001)
    assert acme.train.max_steps == globex.train.max_steps == 50


def test_merging_replaces_lists_and_scalars_and_merges_mappings_at_any_depth():
    base = {"a": {"b": {"c": 1, "d": 2}, "l": [1, 2]}, "x": 1}
    assert merged(base, {"a": {"b": {"d": 3}, "l": [9]}, "x": None}) == {"a": {"b": {"c": 1, "d": 3}, "l": [9]},
                                                                          "x": None}
    assert base == {"a": {"b": {"c": 1, "d": 2}, "l": [1, 2]}, "x": 1}  # the defaults are not changed


def test_one_error_names_every_bad_client(tmp_path):
    path = write(tmp_path, [{"client": "acme", "data": {"source": "a.jsonl"}},
                            {"client": "globex", "data": {"source": "b.jsonl"}, "train": {"max_steps": 0}},
                            "not a mapping",
                            {"client": "Bad Name", "data": {"source": "c.jsonl"}}])
    with pytest.raises(SpecError) as err:
        load_fleet_file(path)
    text = str(err.value)
    assert "3 of 4 client(s) are invalid" in text
    assert "clients[1] (globex/e2e)" in text and "train.max_steps" in text
    assert "clients[2]: must be a mapping" in text and "clients[3] (Bad Name/e2e)" in text
    assert "clients[0]" not in text
