"""KV memory written in place: a slot per running row, and each loaded prefix stored once for all rows that use it.

``SlotCache`` holds, per attention layer, keys and values ``[rows, kv_heads, columns, head_dim]`` allocated up front
(or grown by doubling between steps, never during one). A row owns one slot (a batch index) from admission to its
end; its real tokens sit left-aligned at columns ``0, 1, ...`` of that slot. A forward writes exactly the new
tokens' columns (``index_put``) and reads the slots through views: a decode step copies nothing of the cache, a row
that joins or leaves touches no other row's memory.

``PrefixPool`` holds the prefixes of the running rows (and recently used ones): per layer
``[entries, kv_heads, P_max, head_dim]`` plus ``valid [entries, P_max]``. A row refers to its prefix by entry index;
rows with the same prefix (the same source tensors) share one entry. Entry 0 is the empty prefix. Prefix keys and
values are never rotated (they are stored as attention sees them), and a row's real tokens take positions
``P, P + 1, ...`` after its prefix, exactly as in ``PrefixModel``.

Neither class is thread-safe: the engine's one driver loop calls them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .geometry import Geometry


class PrefixPool:
    """Prefix keys/values stored once, shared by every row that uses them (see the module docstring)."""

    def __init__(self, geometry: Geometry, dtype: torch.dtype, device: torch.device, entries: int = 8) -> None:
        self.sites, self.dtype, self.device = geometry.sites, dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self._alloc(max(2, entries), 0)
        self._owner: dict[tuple, int] = {}  # source tensors' identity -> entry
        self._sources: dict[int, tuple] = {}  # entry -> (identity, the source tensors, kept alive while stored)
        self._refs: dict[int, int] = {}  # entry -> rows using it
        self._idle: OrderedDict[int, None] = OrderedDict()  # stored, unused entries, least recently used first

    @property
    def in_use(self) -> int:
        """Entries some running row uses."""
        return len(self._refs)

    @property
    def width(self) -> int:
        """``P_max``: the columns of every entry (shorter prefixes are padded, ``valid`` False)."""
        return self.valid.shape[1]

    def acquire(self, keys: list[torch.Tensor] | None, values: list[torch.Tensor] | None) -> int:
        """The entry holding this prefix (stored now if it is not yet; one more row uses it). ``keys``/``values``:
        per site ``[kv_heads, P, head_dim]`` in the pool's dtype and device, or None for no prefix (entry 0)."""
        if keys is None:
            return 0
        identity = (*(k.data_ptr() for k in keys), *(v.data_ptr() for v in values), keys[0].shape[1])
        entry = self._owner.get(identity)
        if entry is None:
            entry = self._free_entry(keys[0].shape[1])
            for site, (k, v) in enumerate(zip(keys, values, strict=True)):
                self.keys[site][entry, :, : k.shape[1]] = k
                self.values[site][entry, :, : v.shape[1]] = v
            self.valid[entry] = torch.arange(self.width, device=self.device) < keys[0].shape[1]
            self._owner[identity] = entry
            self._sources[entry] = (identity, keys, values)
        self._idle.pop(entry, None)
        self._refs[entry] = self._refs.get(entry, 0) + 1
        return entry

    def release(self, entry: int) -> None:
        """A row that used ``entry`` ended; an unused entry stays stored until its room is needed."""
        if entry == 0:
            return
        self._refs[entry] -= 1
        if not self._refs[entry]:
            del self._refs[entry]
            self._idle[entry] = None

    def storage(self, entry: int, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one entry's keys/values at ``site`` (all ``P_max`` columns)."""
        return self.keys[site][entry], self.values[site][entry]

    def _free_entry(self, p: int) -> int:
        entries, used = self.valid.shape[0], {0, *self._sources}
        free = next((e for e in range(1, entries) if e not in used), None)
        if free is None and self._idle:  # reuse the least recently used idle entry
            free, _ = self._idle.popitem(last=False)
            identity, *_ = self._sources.pop(free)
            del self._owner[identity]
        if free is None:
            free = entries
            self._alloc(2 * entries, self.width)
        if p > self.width:
            self._alloc(self.valid.shape[0], p)
        return free

    def _alloc(self, entries: int, width: int) -> None:
        """(Re)allocate to ``entries x width``, keeping what is stored (rare: a longer prefix or more of them)."""
        kept, kept_width = self.valid.shape
        def zeros(site) -> torch.Tensor:
            return torch.zeros(entries, site.kv_heads, width, site.head_dim, dtype=self.dtype, device=self.device)
        keys, values = [zeros(s) for s in self.sites], [zeros(s) for s in self.sites]
        for new, old in zip(keys + values, self.keys + self.values, strict=False):
            new[:kept, :, :kept_width] = old
        valid = torch.zeros(entries, width, dtype=torch.bool, device=self.device)
        valid[:kept, :kept_width] = self.valid
        self.keys, self.values, self.valid = keys, values, valid


class SlotCache:
    """The running rows' own keys/values, one slot per row (see the module docstring).

    ``rows``: slots; ``max_columns``: the most columns a row may hold (its prompt + generated tokens, the prefix
    not counted); ``columns``: allocated now (grows by doubling up to ``max_columns`` in :meth:`reserve`).
    The engine sets ``plan`` before each forward; the model's attention layers then call :meth:`update`.
    """

    def __init__(self, geometry: Geometry, rows: int, max_columns: int, dtype: torch.dtype, device: torch.device,
                 columns: int | None = None) -> None:
        self.sites, self.rows, self.max_columns = geometry.sites, rows, max_columns
        self.dtype, self.device = dtype, device
        self.columns = min(max_columns, columns or max_columns)
        self.keys = [self._zeros(s, self.columns) for s in self.sites]
        self.values = [self._zeros(s, self.columns) for s in self.sites]
        self.plan: WritePlan | None = None

    @staticmethod
    def bytes_per_column(geometry: Geometry, dtype: torch.dtype) -> int:
        """Bytes one token of one row takes over all layers (keys and values)."""
        return sum(2 * s.kv_heads * s.head_dim for s in geometry.sites) * torch.finfo(dtype).bits // 8

    def reserve(self, columns: int) -> None:
        """Make room for rows of ``columns`` tokens (between forwards only: growing copies the cache once)."""
        if columns <= self.columns:
            return
        if columns > self.max_columns:
            raise ValueError(f"{columns} columns exceed the KV memory's {self.max_columns} per row")
        new = min(self.max_columns, max(columns, 2 * self.columns))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = self._zeros(self.sites[i], new)
                grown[:, :, : self.columns] = old
                store[i] = grown
        self.columns = new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each attention layer with this forward's new keys/values ``[b, kv_heads, q, head_dim]``: write
        the plan's tokens into their slots in place, and return what attention reads (see ``WritePlan``)."""
        plan, k_store, v_store = self.plan, self.keys[layer_idx], self.values[layer_idx]
        k_store[plan.slots, :, plan.cols] = key_states[plan.rows, :, plan.q]
        v_store[plan.slots, :, plan.cols] = value_states[plan.rows, :, plan.q]
        if plan.read is None:  # the new tokens attend only to themselves (and the prefix)
            return key_states, value_states
        slots, width = plan.read
        return k_store[slots, :, :width], v_store[slots, :, :width]

    def row(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of one slot's first ``length`` columns, per layer ``([kv_heads, length, head_dim], same)``."""
        return [(k[slot, :, :length], v[slot, :, :length]) for k, v in zip(self.keys, self.values, strict=True)]

    def _zeros(self, site, columns: int) -> torch.Tensor:
        return torch.zeros(self.rows, site.kv_heads, columns, site.head_dim, dtype=self.dtype, device=self.device)


class WritePlan:
    """Where one forward's new tokens go and what its attention reads.

    ``rows``/``q``: the forward's batch row and query position of each token to keep, ``slots``/``cols``: where it
    is written (all ``[n]`` long tensors). ``read``: ``(slice of slots, width)``: attention reads those slots'
    first ``width`` columns (views: the forward's batch is that slot range); ``None``: it reads the new tokens
    themselves (a batch of rows whose cache is empty before this forward).
    """

    __slots__ = ("cols", "q", "read", "rows", "slots")

    def __init__(self, rows, q, slots, cols, read: tuple[slice, int] | None) -> None:
        self.rows, self.q, self.slots, self.cols, self.read = rows, q, slots, cols, read
