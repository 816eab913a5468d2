"""The prefix bank's alias refresh reads the registry once per round however many aliases are in use."""

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


def test_a_thousand_aliases_in_use_are_refreshed_with_one_registry_read():
    from prefix_core import PrefixArtifact
    from prefix_core.geometry import geometry_from_config
    from support.tiny_models import make_base

    base = make_base("llama")
    table = torch.randn(2, geometry_from_config(base.config).width, generator=torch.Generator().manual_seed(0))
    source = _Counting(1000, PrefixArtifact.from_table(table, base, {"num_virtual_tokens": 2}))
    bank = PrefixBank(base, source, max_bytes=64 * 2 * 2 * 2 * 2 * 16 * 4, refresh_s=0)  # room for 64 prefixes
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
