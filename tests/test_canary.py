"""Canary rollout: the split rule, the bank's routing and refresh (an in-memory registry), and the registry
commands as a user runs them (``prefixflow promote --canary/--finish``, ``prefixflow rollback``) on the embedded
MLflow. The server's split over HTTP is in test_serve.py."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from prefixflow.services.canary import Canary
from prefixflow.serving.bank import PrefixBank, RegistrySource, in_canary
from support.pipeline import patched_environ
from support.serving import register_random_prefix, served_model_dir


# --- the split -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [10, 50])
def test_the_split_is_within_5_points_of_the_share_and_sticky_per_user(share):
    users = [f"user-{i}" for i in range(400)]
    by_user = sum(in_canary("acme-rev", u, share, random.Random(0)) for u in users) / 4
    assert abs(by_user - share) <= 5
    rng = random.Random(1)
    drawn = sum(in_canary("acme-rev", None, share, rng) for _ in range(400)) / 4
    assert abs(drawn - share) <= 5
    rng = random.Random(2)  # one user, many requests: always the same side
    assert len({in_canary("acme-rev", "user-7", share, rng) for _ in range(50)}) == 1
    assert not any(in_canary("acme-rev", u, 0, rng) for u in users[:50])
    assert all(in_canary("acme-rev", u, 100, rng) for u in users[:50])


# --- the bank ---------------------------------------------------------------------------------------------------
class _Registry(RegistrySource):
    """Versions, aliases and a canary in memory."""

    def __init__(self, arts: dict[str, object]) -> None:
        self.arts, self.aliases, self.active = arts, {"champion": "1"}, None

    def parse(self, model):
        name, _, alias = model.partition("@")
        return name, alias or None, None

    def owner(self, name):
        return "acme"

    def version_of(self, name, alias):
        return self.aliases.get(alias)

    def exists(self, name, version):
        return version in self.arts

    def load(self, name, version):
        return self.arts[version]

    def canary(self, name):
        return self.active

    def snapshot(self, names):
        return {name: (dict(self.aliases), self.active) for name in names}


@pytest.fixture(scope="module")
def bank_parts():
    from prefix_core import PrefixArtifact
    from prefix_core.geometry import geometry_from_config
    from support.tiny_models import make_base

    base = make_base("llama")
    arts = {}
    for version in ("1", "2", "3"):
        table = torch.randn(2, geometry_from_config(base.config).width,
                            generator=torch.Generator().manual_seed(int(version)))
        arts[version] = PrefixArtifact.from_table(table, base, {"num_virtual_tokens": 2})
    return base, arts


def test_the_bank_sends_the_share_to_the_canary_and_follows_it_ending(bank_parts):
    base, arts = bank_parts
    source = _Registry(arts)
    source.active = Canary("acme-rev", "2", 10.0, "1")
    bank = PrefixBank(base, source, refresh_s=0)
    bank._rng = random.Random(0)
    served = [bank.resolve("acme-rev@champion", "acme", f"user-{i}").version for i in range(400)]
    assert abs(served.count("2") / 4 - 10) <= 5 and set(served) == {"1", "2"}
    assert {bank.resolve("acme-rev@champion", "acme").version for _ in range(200)} == {"1", "2"}  # no user: drawn
    sticky = [bank.resolve("acme-rev@champion", "acme", "user-3").version for _ in range(20)]
    assert len(set(sticky)) == 1
    source.aliases["candidate"] = "3"  # only @champion is split
    assert {bank.resolve("acme-rev@candidate", "acme", f"user-{i}").version for i in range(100)} == {"3"}
    canary_user = next(u for u in (f"user-{i}" for i in range(400)) if in_canary("acme-rev", u, 10, random.Random()))
    started = bank.resolve("acme-rev@champion", "acme", canary_user)
    assert started.version == "2"
    # the canary is replaced by v3 at 50%: v3 is loaded before any request goes to it
    source.active = Canary("acme-rev", "3", 50.0, "1")
    assert ("acme-rev", "canary", "2", "3") in bank.refresh()
    assert ("acme-rev", "3") in {(p.name, p.version) for p in bank.loaded}
    served = [bank.resolve("acme-rev@champion", "acme", f"user-{i}").version for i in range(400)]
    assert abs(served.count("3") / 4 - 50) <= 5 and set(served) == {"1", "3"}
    # finished: v3 is the champion and the canary is gone; every request gets v3
    source.aliases["champion"], source.active = "3", None
    moves = bank.refresh()
    assert ("acme-rev", "champion", "1", "3") in moves and ("acme-rev", "canary", "3", None) in moves
    assert {bank.resolve("acme-rev@champion", "acme", f"user-{i}").version for i in range(100)} == {"3"}
    assert started.version == "2" and started.keys[0].shape[1] == 2  # a request in flight keeps its prefix


def test_a_canary_that_cannot_be_loaded_gets_no_requests(bank_parts, caplog):
    from prefix_core import PrefixArtifact
    from prefix_core.geometry import geometry_from_config
    from support.tiny_models import make_base

    base, arts = bank_parts
    other = make_base("llama", seed=7)  # same shape, other weights: refused by check_base
    table = torch.randn(2, geometry_from_config(other.config).width)
    source = _Registry({**arts, "9": PrefixArtifact.from_table(table, other, {"num_virtual_tokens": 2})})
    bank = PrefixBank(base, source, refresh_s=0)
    assert bank.resolve("acme-rev@champion", "acme", "u").version == "1"
    source.active = Canary("acme-rev", "9", 50.0, "1")
    assert bank.refresh() == []  # not switched: retried at the next refresh
    assert {bank.resolve("acme-rev@champion", "acme", f"user-{i}").version for i in range(100)} == {"1"}
    assert "canary acme-rev v9 cannot be served" in caplog.text


# --- the server's watch: counts per version and the automatic rollback -----------------------------------------
class _Bank:
    """What CanaryWatch reads of the bank: acme-rev has canary v2 of champion v1."""

    def __init__(self, finish_after: int | None = None) -> None:
        self.active = Canary("acme-rev", "2", 10.0, "1", finish_after)

    def canary_of(self, name):
        return self.active if name == "acme-rev" else None

    def canary_role(self, name, version):
        if self.canary_of(name) is None:
            return None
        return {"2": "canary", "1": "champion"}.get(version)


def _watch(margin=5.0, min_requests=50, finish_after=None, finished=None):
    from prefixflow.serving.canary_watch import CanaryPolicy, CanaryWatch
    from prefixflow.serving.metrics import ServerMetrics

    ended = []

    def abort(name, version):
        ended.append((name, version))
        return True

    def finish(name, version):
        finished.append((name, version))
        return True

    bank = _Bank(finish_after)
    return CanaryWatch(ServerMetrics(), bank, CanaryPolicy(margin, min_requests), abort, finish), bank, ended


def test_a_canary_failing_more_than_its_champion_is_rolled_back_once():
    from support.harness import wait_until

    watch, _, ended = _watch()
    for i in range(100):
        watch.record(("acme-rev", "1", "champion"), 500 if i % 50 == 0 else 200, 0.1)  # 2% errors
    for i in range(49):
        watch.record(("acme-rev", "2", "canary"), 500 if i % 5 == 0 else 200, 0.1)  # 20% errors, too few yet
    assert ended == []
    watch.record(("acme-rev", "2", "canary"), 200, 0.1)  # the 50th
    wait_until(lambda: ended, 10, 0.05, message="no rollback")
    for _ in range(20):
        watch.record(("acme-rev", "2", "canary"), 500, 0.1)
    assert ended == [("acme-rev", "2")]  # once
    assert watch.metrics.canary_rollbacks.labels("acme-rev", "2")._value.get() == 1


@pytest.mark.parametrize("canary_errors, margin, rolled_back", [(3, 5.0, False), (4, 5.0, True), (50, None, False)])
def test_the_rollback_rule_uses_the_margin_over_the_champion(canary_errors, margin, rolled_back):
    """Champion 2% errors; the canary's 50 requests with 3 errors (6%: 4 points above) stay, 4 (8%) end it; with
    no margin nothing ends it, and 4xx and 499 answers are not errors."""
    import time

    watch, _, ended = _watch(margin)
    for i in range(100):
        watch.record(("acme-rev", "1", "champion"), 500 if i < 2 else 404 if i < 30 else 200, 0.1)
    for i in range(50):
        watch.record(("acme-rev", "2", "canary"), 500 if i < canary_errors else 499 if i < 40 else 200, 0.1)
    time.sleep(0.5)
    assert bool(ended) == rolled_back


@pytest.mark.parametrize("canary_errors, margin, finishes", [(0, 5.0, True), (6, 5.0, True), (8, 5.0, False),
                                                              (3, None, False), (2, None, True)])
def test_a_canary_of_the_gate_is_finished_after_its_requests_when_no_worse(canary_errors, margin, finishes):
    """finish_after 100: at the 100th canary request, a canary within the margin of the champion's 2% error rate
    becomes the champion (8%: rolled back at 50 already); with the rollback off it must not be worse at all."""
    import time

    finished = []
    watch, _, ended = _watch(margin, finish_after=100, finished=finished)
    for i in range(100):
        watch.record(("acme-rev", "1", "champion"), 500 if i < 2 else 200, 0.1)
    for i in range(99):  # the errors last, so the rollback rule sees the whole rate before the finish
        watch.record(("acme-rev", "2", "canary"), 500 if i >= 99 - canary_errors else 200, 0.1)
    time.sleep(0.3)
    assert finished == [] and bool(ended) == (canary_errors == 8)
    watch.record(("acme-rev", "2", "canary"), 200, 0.1)
    time.sleep(0.5)
    assert (finished == [("acme-rev", "2")]) == finishes


def test_per_version_series_exist_only_while_the_canary_runs():
    from prometheus_client import generate_latest

    from prefixflow.serving.canary_watch import version_stats

    watch, bank, _ = _watch(margin=None)
    for status, version, role in [(200, "1", "champion")] * 30 + [(500, "2", "canary")] * 3 + [(200, "2", "canary")]:
        watch.record(("acme-rev", version, role), status, 0.2 if role == "canary" else 0.05)
    watch.prune()  # still running: kept
    text = generate_latest(watch.metrics.registry).decode()
    canary, champion = version_stats([text, text], "acme-rev")  # two replicas reporting the same
    assert (canary.version, canary.role, canary.requests, canary.errors) == ("2", "canary", 8, 6)
    assert (champion.version, champion.requests, champion.errors) == ("1", 60, 0)
    assert canary.error_rate == 75.0 and abs(canary.mean_s - 0.2) < 1e-9 and canary.quantile_s(0.95) == 0.25
    assert champion.quantile_s(0.5) == 0.05
    bank.active = None  # the canary ended
    watch.prune()
    text = generate_latest(watch.metrics.registry).decode()
    assert "acme-rev" not in text.replace('prefixflow_canary_rollbacks', '') and version_stats([text], "acme-rev") == []


# --- the commands ----------------------------------------------------------------------------------------------
def _registry(root) -> dict:
    """acme/rev v1 (@champion), v2 and v3 in an embedded registry under ``root``: its environment."""
    env = {"PREFIXFLOW_HOME": str(root / "home")}
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        model = served_model_dir(root / "model")
        register_random_prefix(model, "acme", "rev", seed=1)
        for seed in (2, 3):
            register_random_prefix(model, "acme", "rev", seed=seed, alias=None)
    return env


@pytest.fixture
def registry_home(tmp_path):
    return _registry(tmp_path)


@pytest.fixture(scope="module")
def unchanged_registry(tmp_path_factory):
    """One registry for the commands that must change nothing."""
    return _registry(tmp_path_factory.mktemp("canary"))


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        return subprocess.run([sys.executable, "-m", "prefixflow.cli", *args], capture_output=True, text=True)


def _state(env: dict) -> tuple[dict, str | None]:
    from prefixflow.services import canary, registry

    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        model = registry.registered_model("acme-rev")
        return {alias: str(v) for alias, v in model.aliases.items()}, model.tags.get(canary.SHARE_TAG)


def test_promote_canary_finish_and_rollback_move_the_aliases_as_documented(registry_home):
    env = registry_home
    res = _cli(env, "promote", "acme/rev/2", "--canary", "10")
    assert res.returncode == 0, res.stderr
    assert "@canary v2 serves 10% of the requests naming @champion (v1)" in res.stdout
    assert _state(env) == ({"champion": "1", "canary": "2"}, "10")
    res = _cli(env, "rollback", "acme/rev")  # during a canary: ends it, nothing else moves
    assert res.returncode == 0 and "canary v2 ended; @champion stays v1" in res.stdout
    assert _state(env) == ({"champion": "1"}, None)
    assert _cli(env, "promote", "acme/rev/3", "--canary", "25").returncode == 0
    assert _cli(env, "promote", "acme/rev/2", "--canary", "5").returncode == 0  # another canary replaces it
    assert _state(env) == ({"champion": "1", "canary": "2"}, "5")
    res = _cli(env, "promote", "acme/rev", "--finish")
    assert res.returncode == 0 and "canary v2 finished: @champion v1 -> v2; @previous = v1" in res.stdout
    assert _state(env) == ({"champion": "2", "previous": "1"}, None)
    res = _cli(env, "rollback", "acme/rev")  # no canary: swaps champion and previous as before
    assert res.returncode == 0 and _state(env) == ({"champion": "1", "previous": "2"}, None)
    assert _cli(env, "promote", "acme/rev/3", "--canary", "20").returncode == 0
    assert _cli(env, "promote", "acme/rev/3").returncode == 0  # promoting the canary itself finishes it
    assert _state(env) == ({"champion": "3", "previous": "1"}, None)


def test_a_servers_rollback_ends_only_the_canary_it_measured(registry_home):
    from prefixflow.services import canary

    env = registry_home
    assert _cli(env, "promote", "acme/rev/2", "--canary", "10").returncode == 0
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        assert canary.abort_if("acme-rev", "3") is False  # another version: a newer canary, left alone
        assert _state(env) == ({"champion": "1", "canary": "2"}, "10")
        assert canary.abort_if("acme-rev", "2") is True
        assert _state(env) == ({"champion": "1"}, None)
        assert canary.abort_if("acme-rev", "2") is False  # another replica was first


@pytest.mark.parametrize("args, words", [
    (["promote", "acme/rev/2", "--canary", "0"], "above 0 and below 100"),
    (["promote", "acme/rev/2", "--canary", "100"], "promote without --canary"),
    (["promote", "acme/rev/1", "--canary", "10"], "v1 is already acme-rev@champion"),
    (["promote", "acme/rev", "--finish"], "has no active canary"),
    (["promote", "acme/rev/2", "--canary", "10", "--finish"], "give one of them"),
    (["promote", "acme/rev/9", "--canary", "10"], "no version 9"),
])
def test_a_bad_canary_command_gets_one_message_and_changes_nothing(unchanged_registry, args, words):
    res = _cli(unchanged_registry, *args)
    assert res.returncode != 0 and words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert _state(unchanged_registry) == ({"champion": "1"}, None)
