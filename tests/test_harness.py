"""The test harness itself (tests/support/harness.py): waits end on the condition or fail with what was seen, and
a missing tool skips on a developer's machine but fails in CI."""

from __future__ import annotations

import time

import pytest

from support.harness import require, wait_until


def test_wait_until_returns_the_first_truthy_value():
    values = iter([None, 0, "", "ready"])
    assert wait_until(lambda: next(values), 5, interval=0.01) == "ready"


def test_wait_until_fails_with_the_message_and_the_last_value():
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"after 0.2 s: the log says nothing \(last value: \[\]\)"):
        wait_until(lambda: [], 0.2, interval=0.05, message=lambda: "the log says nothing")
    assert 0.2 <= time.monotonic() - started < 5


def test_wait_until_lets_the_predicates_own_failure_through():
    def check():
        raise AssertionError("the process exited")

    with pytest.raises(AssertionError, match=r"^the process exited$"):
        wait_until(check, 60)


@pytest.mark.parametrize("tool", ["no-such-program-xyz", "root"])
def test_a_missing_tool_skips_without_ci_and_fails_in_ci(monkeypatch, tool):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(tool)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require(tool)


def test_a_group_of_test_packages_names_the_install_command(monkeypatch):
    monkeypatch.setattr("support.test_packages.binary", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"test_packages.py install slurm"):
        require("slurm")
    with pytest.raises(pytest.skip.Exception, match=r"chromium not installed.*install browser"):
        require("chromium")


def test_a_present_program_is_returned():
    assert require("sh").endswith("/sh")
