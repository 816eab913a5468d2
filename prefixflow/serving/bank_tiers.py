"""A loaded ``Prefix``, and the prefix bank's memory in two tiers: the base's device, then host memory, each
least recently used first.

A prefix evicted from the device tier moves to the host tier (when it has room: ``host_max_bytes`` > 0) instead of
being dropped, so its next use copies it back (a ``host_hit``) instead of downloading and verifying it again from
the registry (the third tier). On a GPU server the host tier is pinned CPU memory; on a CPU server the two tiers
are the same memory, so the host tier is off unless asked for (it is then simply more room).

Not thread-safe on its own: ``PrefixBank`` calls it with its lock held.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Prefix:
    """A verified prefix ready to serve. ``keys``/``values``: per attention layer ``[kv_heads, P, head_dim]`` in
    the base's dtype and device (never modified). ``nbytes``: their size in memory."""

    name: str
    version: str
    client: str | None
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    template: str | None
    nbytes: int

    @property
    def kv(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.keys), list(self.values)

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys[0].shape[1]


Key = tuple[str, str]  # (registered model name, version)


def moved(prefix: Prefix, device: torch.device | str, pin: bool = False) -> Prefix:
    """``prefix`` with its keys/values on ``device`` (the same object when they are there already)."""
    if prefix.keys[0].device == torch.device(device):
        return prefix

    def to(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)  # blocking: a pushed-out prefix is small and must be whole before the original goes
        return t.pin_memory() if pin else t

    return replace(prefix, keys=tuple(map(to, prefix.keys)), values=tuple(map(to, prefix.values)))


class Tier:
    """One tier: entries by key in LRU order (oldest first), bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Key, Prefix] = OrderedDict()
        self.nbytes = 0

    def take(self, key: Key, keep: bool = True) -> Prefix | None:
        """The entry at ``key`` marked most recently used (``keep``) or removed from the tier; None if absent."""
        entry = self.entries.get(key)
        if entry is not None:
            if keep:
                self.entries.move_to_end(key)
            else:
                del self.entries[key]
                self.nbytes -= entry.nbytes
        return entry

    def put(self, key: Key, entry: Prefix, keep_one: bool) -> list[tuple[Key, Prefix]]:
        """Add ``entry`` as the most recently used; returns the entries pushed out over the budget, oldest first
        (``keep_one``: the new entry stays even when it alone exceeds the budget)."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        out = []
        while self.nbytes > self.max_bytes and len(self.entries) > (1 if keep_one else 0):
            out_key, out_entry = self.entries.popitem(last=False)
            self.nbytes -= out_entry.nbytes
            out.append((out_key, out_entry))
        return out


class BankTiers:
    """Device tier (``max_bytes``) over host tier (``host_max_bytes``; 0: none). What happened is kept as events
    for the caller to hand on once its lock is released (``drain``): ``hit`` (device), ``host_hit`` (copied back
    from host memory), ``evict`` (left the device tier), ``host_evict`` (left host memory too: its next use loads
    it from the registry)."""

    def __init__(self, max_bytes: int, host_max_bytes: int, device: torch.device) -> None:
        self.device_tier, self.host_tier = Tier(max_bytes), Tier(host_max_bytes)
        self.device = device
        self.pin = device.type == "cuda"
        self.host = torch.device("cpu")
        self.events: list[tuple[str, int]] = []

    def on_event(self, kind: str, amount: int) -> None:
        self.events.append((kind, amount))

    def drain(self) -> list[tuple[str, int]]:
        """The events since the last drain."""
        events, self.events = self.events, []
        return events

    def get(self, key: Key) -> Prefix | None:
        """The device-tier entry at ``key``, copied back from host memory when it is there (then the device tier
        may push others down); None when neither tier holds it."""
        entry = self.device_tier.take(key)
        if entry is not None:
            self.on_event("hit", 1)
            return entry
        entry = self.host_tier.take(key, keep=False)
        if entry is None:
            return None
        self.on_event("host_hit", 1)
        entry = moved(entry, self.device)
        self._demote(self.device_tier.put(key, entry, keep_one=True))
        return entry

    def put(self, key: Key, entry: Prefix) -> None:
        """A newly loaded entry (on the device) into the device tier."""
        self.host_tier.take(key, keep=False)
        self._demote(self.device_tier.put(key, entry, keep_one=True))

    def _demote(self, evicted: list[tuple[Key, Prefix]]) -> None:
        if not evicted:
            return
        self.on_event("evict", len(evicted))
        if self.host_tier.max_bytes <= 0:
            return
        dropped = 0
        for key, entry in evicted:
            if entry.nbytes <= self.host_tier.max_bytes:
                dropped += len(self.host_tier.put(key, moved(entry, self.host, self.pin), keep_one=False))
            else:
                dropped += 1
        if dropped:
            self.on_event("host_evict", dropped)

    def __contains__(self, key: Key) -> bool:
        return key in self.device_tier.entries or key in self.host_tier.entries

    @property
    def loaded(self) -> list[Prefix]:
        """The device tier's entries, oldest use first."""
        return list(self.device_tier.entries.values())

    @property
    def nbytes(self) -> int:
        return self.device_tier.nbytes

    @property
    def host_nbytes(self) -> int:
        return self.host_tier.nbytes

    @property
    def host_count(self) -> int:
        return len(self.host_tier.entries)

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the device tier without pushing an entry out."""
        return self.device_tier.nbytes + nbytes <= self.device_tier.max_bytes
