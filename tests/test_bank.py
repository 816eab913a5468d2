"""The prefix bank: alias refresh reads the registry once per round however many aliases are in use; prefixes
pushed out of the device wait in host memory; preloading fills the bank and stops when it is full."""

import pytest
import torch

from prefixflow.serving.bank import PrefixBank, RegistrySource


class _Counting(RegistrySource):
    """A registry of ``n`` models ``c0000-task`` .. with ``@champion`` at version 1, counting the calls made."""

    def __init__(self, n: int, art) -> None:
        self.champions = {f"c{i:04d}-task": "1" for i in range(n)}
        self.art, self.calls = art, {"version_of": 0, "snapshot": 0, "load": 0, "canary": 0}

    def parse(self, model):
        name, _, alias = model.partition("@")
        return name, alias or None, None

    def owner(self, name):
        return name.split("-")[0]

    def version_of(self, name, alias):
        self.calls["version_of"] += 1
        return self.champions.get(name) if alias == "champion" else None

    def load(self, name, version):
        self.calls["load"] += 1
        return self.art

    def canary(self, name):
        self.calls["canary"] += 1
        return None

    def snapshot(self, names):
        self.calls["snapshot"] += 1
        return {n: ({"champion": self.champions[n]}, None) for n in names if n in self.champions}


@pytest.fixture(scope="module")
def base_and_art():
    from prefix_core import PrefixArtifact
    from prefix_core.geometry import geometry_from_config
    from support.tiny_models import make_base

    base = make_base("llama")
    table = torch.randn(2, geometry_from_config(base.config).width, generator=torch.Generator().manual_seed(0))
    return base, PrefixArtifact.from_table(table, base, {"num_virtual_tokens": 2})


ONE = 2 * 2 * 2 * 2 * 16 * 4  # bytes of one prefix of the tiny llama: layers x (K, V) x kv_heads x P x head_dim x 4


def test_a_thousand_aliases_in_use_are_refreshed_with_one_registry_read(base_and_art):
    base, art = base_and_art
    source = _Counting(1000, art)
    bank = PrefixBank(base, source, max_bytes=64 * ONE, refresh_s=0)  # room for 64 prefixes
    names = sorted(source.champions)
    for name in names:
        assert bank.resolve(f"{name}@champion", name.split("-")[0]).version == "1"
    assert len(bank.loaded) == 64  # the least recently used left the bank
    first = dict(source.calls)
    assert first["version_of"] == 1000 and first["snapshot"] == 0
    assert bank.refresh() == [] and bank.refresh() == []
    assert source.calls == {**first, "snapshot": 2}  # one read per round, none per alias
    for name in names[:10]:
        source.champions[name] = "2"
    del source.champions[names[10]]
    moves = bank.refresh()
    assert sorted(moves) == sorted([(n, "champion", "1", "2") for n in names[:10]]
                                   + [(names[10], "champion", "1", None)])
    assert source.calls["snapshot"] == 3 and source.calls["version_of"] == 1000
    assert bank.resolve(f"{names[0]}@champion", "c0000").version == "2"


def test_prefixes_pushed_out_of_the_device_wait_in_host_memory_and_come_back_without_a_load(base_and_art):
    base, art = base_and_art
    source, events = _Counting(20, art), {}
    bank = PrefixBank(base, source, max_bytes=4 * ONE, host_max_bytes=8 * ONE, refresh_s=0,
                      on_event=lambda kind, n: events.__setitem__(kind, events.get(kind, 0) + n))
    names = sorted(source.champions)
    first = bank.resolve(f"{names[0]}@champion", None)
    for name in names[1:12]:
        bank.resolve(f"{name}@champion", None)
    assert source.calls["load"] == 12 and bank.nbytes == 4 * ONE and bank.host == (8, 8 * ONE)
    assert events == {"load": 12, "evict": 8}
    again = bank.resolve(f"{names[0]}@champion", None)  # from host memory: no registry load
    assert source.calls["load"] == 12 and events["host_hit"] == 1
    assert all(torch.equal(a, b) for a, b in zip(first.keys + first.values, again.keys + again.values, strict=True))
    assert names[0] in {p.name for p in bank.loaded} and bank.host == (8, 8 * ONE)  # one came down in its place
    for name in names[12:20]:
        bank.resolve(f"{name}@champion", None)
    assert events["host_evict"] == 8 and bank.host == (8, 8 * ONE)  # the host tier's oldest left for the registry
    bank.resolve(f"{names[1]}@champion", None)  # gone from both tiers: loaded again
    assert source.calls["load"] == 21


def test_preload_loads_the_list_in_order_skips_what_fails_and_stops_when_the_bank_is_full(base_and_art, caplog):
    base, art = base_and_art
    source, events = _Counting(10, art), {}
    bank = PrefixBank(base, source, max_bytes=3 * ONE, refresh_s=0,
                      on_event=lambda kind, n: events.__setitem__(kind, events.get(kind, 0) + n))
    wanted = ["c0004-task@champion", "c0099-task@champion", "c0001-task@nope", "c0002-task@champion",
              "c0007-task@champion", "c0003-task@champion", "c0005-task@champion"]
    assert bank.preload(wanted) == 3
    assert [p.name for p in bank.loaded] == ["c0004-task", "c0002-task", "c0007-task"]
    assert events == {"load": 3, "preload": 3} and source.calls["load"] == 3  # none pushed out, none loaded twice
    assert "c0099-task@champion" in caplog.text and "c0001-task@nope" in caplog.text
