"""prepare_data: cleaning, quarantine, dedupe, group split, cache reuse, and one clear message per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixflow.services.errors import DataError
from prefixflow.services.preparation import prepare, read_split
from prefixflow.services.spec import parse_spec
from support.pipeline import save_tiny_model, spec_dict, write_task


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_HOME", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _spec(model_dir, source, **data):
    d = spec_dict(model_dir, source)
    d["data"].update(data)
    return parse_spec(d)


def test_quarantine_dedupe_group_split_and_cache(home, model_dir):
    src = home / "data.csv"
    rows = ["source,target,grp"] + [f"item {i % 30},answer {i},g{i % 30}" for i in range(90)]
    rows += ["item 1,answer 1,g1", ",no source,g1", "item x,,g2", "item y,bad \ufffd,g3"]
    src.write_text("\n".join(rows) + "\n")
    spec = _spec(model_dir, src, source_column="source", target_column="target", group_column="grp")
    out = prepare(spec)
    assert out.counts["read"] == 94 and out.counts["rejected"] == 3 and out.counts["duplicates"] == 1
    assert out.counts["train"] + out.counts["validation"] + out.counts["test"] == 90
    rejected = [json.loads(line) for line in Path(out.rejected_uri).read_text().splitlines()]
    assert sorted(r["reason"] for r in rejected) == ["empty source", "empty target",
                                                    "undecodable characters (U+FFFD or NUL)"]
    groups = {name: {r["group"] for r in read_split(out.uri, name)} for name in ("train", "validation", "test")}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    assert out.stats["train"]["prompt_tokens"]["max"] > 0 and not out.reused
    again = prepare(spec)
    assert again.reused and again.fingerprint == out.fingerprint and again.uri == out.uri
    src.write_text(src.read_text() + "item 99,answer 99,g99\n")
    changed = prepare(spec)
    assert not changed.reused and changed.fingerprint != out.fingerprint


def test_test_source_keeps_its_groups_out_of_training(home, model_dir):
    train = write_task(home / "train.jsonl", n=80, seed=1)
    test = write_task(home / "test.jsonl", n=10, seed=2)
    out = prepare(_spec(model_dir, train, test_source=str(test)))
    test_sources = {r["source"] for r in read_split(out.uri, "test")}
    assert not test_sources & {r["source"] for r in read_split(out.uri, "train")}
    assert out.counts["test"] == len(read_split(out.uri, "test")) > 0


@pytest.mark.parametrize("case,content,fields,message", [
    ("missing", None, {}, "does not exist"),
    ("columns", '{"question": "a", "answer": "b"}\n', {}, "no column 'source' (data.source_column); available "
                                                          "columns: question, answer"),
    ("types", '{"source": "a", "target": {"x": 1}}\n', {}, "not text"),
    ("format", "x", {}, "unknown data format"),
    ("empty", '{"source": "", "target": "b"}\n{"source": "a", "target": " "}\n', {}, "empty after filtering"),
    ("encoding", b"source,target\ncaf\xe9,ok\n", {}, "not UTF-8"),
])
def test_bad_data_gives_one_clear_message(home, model_dir, case, content, fields, message):
    suffix = {"format": ".xlsx", "encoding": ".csv"}.get(case, ".jsonl")
    src = home / f"bad{suffix}"
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif content is not None:
        src.write_text(content)
    with pytest.raises(DataError) as err:
        prepare(_spec(model_dir, src, **fields))
    assert message in str(err.value)
    assert "Traceback" not in str(err.value) and len(str(err.value).splitlines()) == 1
    assert not list((home / "state").glob("data/*/*/*/meta.json"))  # nothing half-written


@pytest.mark.parametrize("kind", ["parquet", "saved_dataset", "csv_numbers"])
def test_other_formats_load_the_same_rows(home, model_dir, kind):
    import datasets

    rows = [{"source": f"item {i}", "target": f"answer {i}"} for i in range(40)]
    if kind == "parquet":
        src = home / "data.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(src))
    elif kind == "saved_dataset":
        src = home / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(src))
    else:  # numeric targets (a label task) are read as text
        src = home / "labels.csv"
        src.write_text("source,target\n" + "".join(f"item {i},{i % 3}\n" for i in range(40)))
    out = prepare(_spec(model_dir, src))
    assert out.counts["read"] == 40 and out.counts["rejected"] == 0
    assert all(isinstance(r["target"], str) for r in read_split(out.uri, "train"))
