"""services.data_watch: a source's state from its listing, and the debounced watcher (local files; the S3 case
and the Prefect trigger run on the stack in test_stack_pipeline.py)."""

from __future__ import annotations

import logging
import os

import pytest

from prefixflow.services.data_watch import DataWatcher, source_state
from prefixflow.services.spec import parse_spec
from support.pipeline import spec_dict


def _touch(path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_source_state_follows_size_and_time_and_a_folder_its_files(tmp_path):
    data = tmp_path / "d.jsonl"
    assert source_state(str(data)) is None  # nothing there yet
    _touch(data, "a\n", 1_000_000_000)
    first = source_state(str(data))
    _touch(data, "b\n", 1_000_000_000)  # same size and time: a listing cannot tell (documented)
    assert source_state(str(data)) == first
    _touch(data, "b\n", 2_000_000_000)
    assert source_state(str(data)) != first
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    _touch(folder / "train" / "part-0.arrow", "x", 1_000_000_000)
    before = source_state(str(folder))
    _touch(folder / ".lock", "x", 5_000_000_000)  # hidden files are not data
    assert source_state(str(folder)) == before
    _touch(folder / "train" / "part-1.arrow", "y", 1_000_000_000)
    assert source_state(str(folder)) != before


def test_the_watcher_reports_a_settled_change_once(tmp_path):
    data, test = tmp_path / "d.jsonl", tmp_path / "t.jsonl"
    _touch(data, "a\n", 1_000_000_000)
    seen = []
    watcher = DataWatcher({"acme/rev": [str(data), str(test)]}, lambda name, changed: seen.append((name, changed)))
    assert watcher.poll() == []  # the first poll is the baseline: what was there before is not news
    assert watcher.poll() == []
    _touch(data, "ab\n", 2_000_000_000)
    assert watcher.poll() == []  # changed: wait for one quiet poll
    _touch(data, "abc\n", 3_000_000_000)  # a burst: still changing
    assert watcher.poll() == []
    _touch(test, "t\n", 3_000_000_000)  # the test source appears in the same burst
    assert watcher.poll() == []
    assert watcher.poll() == ["acme/rev"]  # settled: one report naming both sources
    assert seen == [("acme/rev", [str(data), str(test)])]
    assert watcher.poll() == [] and watcher.poll() == []  # reported once
    _touch(data, "abcd\n", 4_000_000_000)
    assert watcher.poll() == []
    _touch(data, "abc\n", 3_000_000_000)  # written back before it settled: nothing new
    assert watcher.poll() == [] and watcher.poll() == []
    assert len(seen) == 1


def test_a_source_that_cannot_be_listed_is_no_change_and_is_said_once(tmp_path, monkeypatch, caplog):
    from prefixflow.services import data_watch

    data = tmp_path / "d.jsonl"
    _touch(data, "a\n", 1_000_000_000)
    seen = []
    watcher = DataWatcher({"acme/rev": [str(data)]}, lambda name, changed: seen.append(name))
    watcher.poll()

    def down(uri):
        raise OSError("the share is gone")

    monkeypatch.setattr(data_watch, "source_state", down)
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            assert watcher.poll() == []
    assert caplog.text.count("the share is gone") == 1
    monkeypatch.undo()
    assert watcher.poll() == [] and seen == []  # back, unchanged


def test_a_reporter_that_fails_does_not_stop_the_watcher(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    _touch(data, "a\n", 1_000_000_000)
    calls = []

    def report(name, changed):
        calls.append(name)
        raise ConnectionError("Prefect server down")

    watcher = DataWatcher({"acme/rev": [str(data)]}, report)
    watcher.poll()
    _touch(data, "ab\n", 2_000_000_000)
    with caplog.at_level(logging.WARNING):
        watcher.poll()
        assert watcher.poll() == ["acme/rev"]
    assert calls == ["acme/rev"] and "Prefect server down" in caplog.text


def test_only_on_new_data_specs_are_watched_and_get_a_trigger(tmp_path):
    from prefixflow.flows.deploy import _triggers, data_watcher, watched_sources

    plain = parse_spec(spec_dict(str(tmp_path / "m"), str(tmp_path / "a.jsonl"), client="plain"))
    d = spec_dict(str(tmp_path / "m"), str(tmp_path / "b.jsonl"), client="watched")
    d["trigger"] = "on_new_data"
    d["data"]["test_source"] = str(tmp_path / "b-test.jsonl")
    watched = parse_spec(d)
    assert data_watcher([plain], 15) is None and _triggers(plain) == []
    watcher = data_watcher([plain, watched], 15)
    assert [(w.name, w.sources) for w in watcher.watches] == [("watched/rev", tuple(watched_sources(watched)))]
    assert watched_sources(watched) == [str(tmp_path / "b.jsonl"), str(tmp_path / "b-test.jsonl")]
    (trigger,) = _triggers(watched)
    assert trigger.expect == {"prefixflow.data.changed"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "prefixflow.data.watched.rev"}


def test_a_bad_trigger_or_interval_is_refused_with_what_to_write(tmp_path, monkeypatch):
    from prefixflow import settings

    d = spec_dict(str(tmp_path / "m"), str(tmp_path / "a.jsonl"))
    d["trigger"] = "on_change"
    with pytest.raises(ValueError, match="on_new_data"):
        parse_spec(d)
    monkeypatch.setenv(settings.WATCH_INTERVAL_ENV, "often")
    with pytest.raises(ValueError, match="PREFIXFLOW_WATCH_INTERVAL_S='often' is not a number"):
        settings.watch_interval_s()
    monkeypatch.setenv(settings.WATCH_INTERVAL_ENV, "0.01")
    assert settings.watch_interval_s() == 1.0
