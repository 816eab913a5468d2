"""What each client costs: the servers' usage log (services.usage_log) and per-client counters, and
``prefixflow usage`` over them. (Training figures per client are checked where trainings run: test_fleet_packing.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import openai
import pytest

from prefixflow.services.usage import parse_since
from prefixflow.services.usage_log import UsageLog, most_used_models, read_usage
from support.harness import wait_until
from support.pipeline import patched_environ
from support.serving import register_random_prefix, serve_process, served_model_dir


def test_since_takes_durations_and_dates_and_says_what_it_takes():
    now = 1_000_000.0
    assert parse_since("7d", now) == now - 7 * 86400 and parse_since("12h", now) == now - 12 * 3600
    assert parse_since("30m", now) == now - 1800 and parse_since("2w", now) == now - 14 * 86400
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert parse_since(None) is None
    with pytest.raises(ValueError, match=r"use e\.g\. 7d, 12h"):
        parse_since("last week")


def test_replicas_logs_add_up_and_a_torn_last_line_is_skipped(tmp_path):
    one, two = UsageLog(tmp_path, flush_s=3600), UsageLog(tmp_path, flush_s=3600)
    two.path = tmp_path / "serving-other-host.jsonl"  # another replica
    one.add("acme", 1, 10, 5)
    one.add("acme", 1, 4, 2)
    two.add("acme", 2, 6, 6)
    two.add("globex", 1, 3, 1)
    one.flush()
    two.flush()
    one.flush()  # nothing new: nothing written
    assert len(one.path.read_text().splitlines()) == 1
    with open(two.path, "a") as fh:  # a process killed in the middle of a line
        fh.write('{"hour": "2026-')
    three = UsageLog(tmp_path)  # a restarted replica appends its own file
    three.path = tmp_path / "serving-restarted.jsonl"
    three.add("globex", 1, 1, 1)
    three.stop()  # flushes
    assert read_usage(tmp_path) == {"acme": {"requests": 4, "prompt_tokens": 20, "completion_tokens": 13},
                                    "globex": {"requests": 2, "prompt_tokens": 4, "completion_tokens": 2}}
    assert read_usage(tmp_path, client="globex") == {"globex": {"requests": 2, "prompt_tokens": 4,
                                                                "completion_tokens": 2}}
    assert read_usage(tmp_path, since=datetime(2999, 1, 1, tzinfo=UTC).timestamp()) == {}
    assert read_usage(tmp_path / "missing") == {}


def test_the_most_used_models_are_read_from_every_replicas_log(tmp_path):
    one, two = UsageLog(tmp_path, flush_s=3600), UsageLog(tmp_path, flush_s=3600)
    two.path = tmp_path / "serving-other-host.jsonl"
    one.add("acme", 3, 1, 1, model="acme/a@champion")
    two.add("acme", 2, 1, 1, model="acme/a@champion")
    two.add("acme", 4, 1, 1, model="acme/b/2")
    one.add("globex", 9, 1, 1, model="base")  # the bare base: not a prefix to preload
    one.add("globex", 1, 1, 1, model="globex/c@champion")
    one.add("initech", 7, 1, 1)  # no model (as older servers wrote)
    one.flush()
    two.flush()
    assert most_used_models(tmp_path) == ["acme/a@champion", "acme/b/2", "globex/c@champion"]
    assert most_used_models(tmp_path, limit=1) == ["acme/a@champion"]
    assert most_used_models(tmp_path, since=datetime(2999, 1, 1, tzinfo=UTC).timestamp()) == []
    assert read_usage(tmp_path)["acme"]["requests"] == 9  # per client as before, whatever the model


def test_a_log_that_cannot_be_written_keeps_its_counts_for_the_next_flush(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    log = UsageLog(blocker / "usage")
    log.add("acme", 1, 2, 3)
    log.flush()  # the folder cannot be created: logged, kept
    log.folder = tmp_path / "usage"
    log.path = log.folder / log.path.name
    log.flush()
    assert read_usage(log.folder) == {"acme": {"requests": 1, "prompt_tokens": 2, "completion_tokens": 3}}


def _bank_events(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("prefixflow_prefix_bank_events_total{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('"')[1]] = float(value)
    return out


def _client_counters(url: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("prefixflow_client_"):
            name, value = line.rsplit(" ", 1)
            metric, _, label = name.partition("{")
            out[(metric.removesuffix("_total"), label.split('"')[1])] = float(value)
    return out


@pytest.mark.slow
def test_two_replicas_and_a_restart_count_each_clients_requests_and_tokens(tmp_path):
    """Two servers on one usage folder, one restarted: /metrics counts per client (the owner of the prefix used),
    and `prefixflow usage` adds up what every response's usage said, across replicas and restarts."""
    env = {"PREFIXFLOW_HOME": str(tmp_path / "home"), "PREFIXFLOW_USAGE_DIR": str(tmp_path / "usage")}
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        model = served_model_dir(tmp_path / "model")
        register_random_prefix(model, "acme", "rev", seed=1)
        register_random_prefix(model, "globex", "rev", seed=2)
    keys = tmp_path / "keys.yaml"
    key = {}
    for who in ("acme", "globex", "*"):
        res = subprocess.run([sys.executable, "-m", "prefixflow.cli", "keys", "add", "--client", who, "--file",
                              str(keys)], capture_output=True, text=True, check=True)
        key[who] = res.stdout.strip().splitlines()[-1]
    expected: dict[str, dict[str, int]] = {}  # client -> what its responses' usage said
    by_server: dict[str, dict[tuple[str, str], int]] = {}  # url -> (counter, client) -> amount

    def ask(url: str, who: str, model_name: str, n: int = 1, stream: bool = False) -> None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=key[who], max_retries=0, timeout=120)
        if stream:
            chunks = list(c.completions.create(model=model_name, prompt="red cat", max_tokens=6, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
            usage = chunks[-1].usage
        else:
            usage = c.completions.create(model=model_name, prompt="blue sun", max_tokens=5, temperature=0.7, n=n,
                                         seed=1).usage
        owner = model_name.split("/")[0] if "/" in model_name else ("-" if who == "*" else who)
        mine = expected.setdefault(owner, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        counters = by_server.setdefault(url, {})
        for k, amount in (("requests", 1), ("prompt_tokens", usage.prompt_tokens),
                          ("completion_tokens", usage.completion_tokens)):
            mine[k] += amount
            counters[(f"prefixflow_client_{k}", owner)] = counters.get((f"prefixflow_client_{k}", owner), 0) + amount

    args = ("--keys", str(keys), "--usage-flush", "3600")  # only the stop flushes
    with serve_process(model, env, *args) as first, serve_process(model, env, *args) as second:
        ask(first, "acme", "acme/rev@champion")
        ask(first, "acme", "acme/rev@champion", n=2)
        ask(second, "acme", "acme/rev@champion", stream=True)
        ask(second, "globex", "globex/rev@champion")
        ask(second, "*", "globex/rev@champion")  # an admin using globex's prefix: globex's use
        ask(first, "acme", "base")  # the bare base: the caller's use
        for url in (first, second):  # one series per client that used the server, equal to its responses' usage
            assert _client_counters(url) == by_server[url]
        assert by_server[second][("prefixflow_client_requests", "globex")] == 2
    logged = [json.loads(line) for f in sorted((tmp_path / "usage").glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    assert {(r["client"], r.get("model")) for r in logged} == {("acme", "acme/rev@champion"), ("acme", "base"),
                                                              ("globex", "globex/rev@champion")}
    with serve_process(model, env, *args) as restarted:
        # the models the usage log names most are loaded at start-up (the bare base is not a prefix)
        wait_until(lambda: _bank_events(restarted).get("preload") == 2, 60,
                   message=lambda: f"not preloaded: {_bank_events(restarted)}")
        ask(restarted, "globex", "globex/rev@champion", stream=True)
        assert _bank_events(restarted)["load"] == 2 and _bank_events(restarted)["hit"] >= 1
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **env}  # the embedded store
    res = subprocess.run([sys.executable, "-m", "prefixflow.cli", "usage", "--format", "json"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = {r["client"]: r for r in json.loads(res.stdout)}
    served = {c: {k: r[k] for k in ("requests", "prompt_tokens", "completion_tokens")} for c, r in rows.items()
              if r["requests"]}
    assert served == expected
    assert rows["acme"]["versions"] == rows["globex"]["versions"] == 1
    res = subprocess.run([sys.executable, "-m", "prefixflow.cli", "usage", "--client", "globex", "--format", "csv",
                          "--since", "1d"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("client,runs,") and len(lines) == 2 and lines[1].startswith("globex,")
