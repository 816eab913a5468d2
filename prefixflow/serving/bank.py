"""PrefixBank: the registered prefixes a server holds in memory, loaded on first use, bounded in bytes.

A ``model`` name of a request resolves to a registry version (``CLIENT/TASK@ALIAS``, ``CLIENT/TASK/VERSION``,
``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), whose artifact is downloaded, verified (checksums, then the
base identity: a prefix trained on another base is refused) and folded into per-layer keys/values in the base's
dtype and device. Only a completely loaded and verified prefix enters the bank; loads of one version happen once
however many requests wait for it.

Aliases are remembered once used and polled every ``refresh_s`` seconds, all of them (and the canaries) from one
listing of the registry per round (``RegistrySource.snapshot``: one call per 1,000 registered models, however many
aliases are in use); when one moves, the new version is loaded first and the alias switched after, so requests
never wait on a load because of a move. A request keeps
the ``Prefix`` it started with (its tensors stay alive while it runs), so it finishes on that version even if
the alias moves or the entry is evicted meanwhile.

Tiers (``serving.bank_tiers``): the base's device (``max_bytes``), then host memory (``host_max_bytes``), then
the registry; least recently used leave first. ``preload`` fills the bank at start-up with the most used models
(from the usage log) or a given list, and stops before it would push out what it loaded.

Canaries (``services.canary``): a request naming ``@champion`` of a model with an active canary is served by the
canary version with the canary's share (sticky per OpenAI ``user``: one user sees one version; without ``user``,
drawn per request). The canary is read when its model's champion is first used and polled with the aliases; a
new canary version is loaded before requests are sent to it, and a canary that cannot be loaded gets none.

Thread-safe: request handlers call ``get`` from worker threads; one poller thread refreshes aliases. ``on_event``
is never called with the bank's lock held (it may read ``loaded`` and ``nbytes``).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable

from torch import nn

from prefix_core import PrefixArtifact
from prefix_core.errors import PrefixError
from prefixflow.services import canary, registry, tracking
from prefixflow.services.errors import RegistryError
from prefixflow.serving.bank_tiers import BankTiers, Prefix

log = logging.getLogger(__name__)
BASE = "base"


class ModelAccessError(PrefixError):
    """A request names a model its key may not use (HTTP 403)."""


class UnknownModel(RegistryError):
    """A request names a registered model, version or alias that does not exist (HTTP 404)."""


class PrefixUnusable(PrefixError):
    """The named version exists but cannot be served here: wrong base, corrupt artifact (HTTP 400)."""


class RegistrySource:
    """How the bank reads the registry (``prefixflow.services.registry`` over the configured MLflow)."""

    def parse(self, model: str) -> tuple[str, str | None, str | None]:
        return registry.parse_ref(model)

    def owner(self, name: str) -> str | None:
        """The model's ``client`` tag; RegistryError when there is no such registered model."""

        return registry.owner(name)

    def version_of(self, name: str, alias: str) -> str | None:
        return registry.alias_version(name, alias)

    def exists(self, name: str, version: str) -> bool:
        return registry.version_exists(name, version)

    def load(self, name: str, version: str) -> PrefixArtifact:
        return registry.load_version(tracking.client().get_model_version(name, version))

    def canary(self, name: str) -> canary.Canary | None:
        """The active canary of ``name``, or None."""
        return canary.current(name)

    def snapshot(self, names: list[str]) -> dict[str, tuple[dict[str, str], canary.Canary | None]]:
        """The aliases (alias -> version) and canary of each of ``names`` that still exists, from one listing of
        the registry (one call per ``registry.PAGE`` registered models), not one call per alias."""
        wanted = set(names)
        return {m.name: ({a: str(v) for a, v in (m.aliases or {}).items()}, canary.of(m))
                for m in registry.all_models() if m.name in wanted}


def _settings(active: canary.Canary | None) -> tuple | None:
    """What of a canary changes routing (not its champion, which the aliases follow)."""
    return None if active is None else (active.version, active.share, active.finish_after)


def in_canary(name: str, user: str | None, share: float, rng: random.Random) -> bool:
    """Whether a request for ``name@champion`` goes to its canary (``share`` percent): sticky per ``user`` (a hash
    of name and user picks one of 10,000 buckets), else drawn from ``rng``."""
    if user:
        bucket = int.from_bytes(hashlib.sha256(f"{name}\0{user}".encode()).digest()[:8], "big") % 10_000
        return bucket < share * 100
    return rng.random() * 100 < share


class PrefixBank:
    """Registered prefixes in memory for one ``base``. ``on_event(kind, amount)`` feeds the server's metrics:
    kinds ``hit``, ``host_hit``, ``load``, ``evict``, ``host_evict``, ``preload``, ``alias_move``."""

    def __init__(self, base: nn.Module, source: RegistrySource | None = None, max_bytes: int = 1 << 30,
                 refresh_s: float = 5.0, on_event: Callable[[str, int], None] | None = None,
                 host_max_bytes: int = 0) -> None:
        self.base = base
        self.source = source or RegistrySource()
        self.refresh_s = refresh_s
        self.on_event = on_event or (lambda kind, amount: None)
        param = next(base.parameters())
        self._cast = {"dtype": param.dtype, "device": param.device}
        self._lock = threading.Lock()
        self._tiers = BankTiers(max_bytes, host_max_bytes, param.device)
        self._aliases: dict[tuple[str, str], str] = {}  # (name, alias) -> version, for the aliases in use
        self._owners: dict[str, str | None] = {}
        self._canaries: dict[str, canary.Canary | None] = {}  # name -> its canary, for the champions in use
        self._rng = random.Random()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # --- lookups ----------------------------------------------------------------------------------------------
    def resolve(self, model: str, client: str | None, user: str | None = None) -> Prefix | None:
        """The prefix a request's ``model`` names, for a caller of ``client`` (``None``: admin): ``None`` for the
        bare base; ``user`` (the request's OpenAI ``user``) keeps a user on one side of a canary. Raises
        ModelAccessError (another client's), UnknownModel, PrefixUnusable, or RegistryError (not a model name)."""
        if model == BASE:
            return None
        name, alias, version = self.source.parse(model)
        if client is not None and not name.startswith(f"{client}-"):
            raise ModelAccessError(f"this API key belongs to client {client!r} and may use only its own prefixes "
                                   f"({client}/TASK@ALIAS); {model!r} is not one of them")
        owner = self._owner(name)
        if client is not None and owner != client:
            raise ModelAccessError(f"this API key belongs to client {client!r} and may use only its own prefixes; "
                                   f"{model!r} belongs to another client")
        if alias is not None:
            version = self._alias(name, alias, model)
            if alias == "champion" and (pick := self._canary_pick(name, version, user)) is not None:
                try:
                    return self.get(name, pick, owner)
                except PrefixError as err:  # the canary cannot be served here: the champion serves its share
                    log.warning("canary %s v%s cannot be served, its requests go to the champion: %s", name, pick,
                                err)
        elif not self._has(name, version) and not self.source.exists(name, version):
            raise UnknownModel(f"{model}: {name!r} has no version {version}")
        return self.get(name, version, owner)

    def get(self, name: str, version: str, owner: str | None = None) -> Prefix:
        """The loaded prefix of ``name`` version ``version`` (loaded now if needed; one load per version)."""
        key = (name, version)
        with self._lock:
            entry = self._tiers.get(key)
            gate = self._loading.setdefault(key, threading.Lock())
            events = self._tiers.drain()
        self._emit(events)
        if entry is not None:
            return entry
        with gate:
            with self._lock:
                entry = self._tiers.get(key)  # loaded by the request we waited for
                events = self._tiers.drain()
            self._emit(events)
            if entry is not None:
                return entry
            entry = self._load(name, version, owner if owner is not None else self._owner(name))
            with self._lock:
                self._tiers.put(key, entry)
                self._loading.pop(key, None)
                events = self._tiers.drain()
        self._emit([("load", 1), *events])
        return entry

    def _emit(self, events: list[tuple[str, int]]) -> None:
        for kind, amount in events:
            self.on_event(kind, amount)

    @property
    def loaded(self) -> list[Prefix]:
        """The prefixes in the device tier."""
        with self._lock:
            return self._tiers.loaded

    @property
    def nbytes(self) -> int:
        """Bytes in the device tier."""
        with self._lock:
            return self._tiers.nbytes

    @property
    def host(self) -> tuple[int, int]:
        """Prefixes and bytes in the host tier."""
        with self._lock:
            return self._tiers.host_count, self._tiers.host_nbytes

    def _has(self, name: str, version: str) -> bool:
        with self._lock:
            return (name, version) in self._tiers

    def _owner(self, name: str) -> str | None:
        if name not in self._owners:
            try:
                self._owners[name] = self.source.owner(name)
            except RegistryError as err:
                raise UnknownModel(str(err)) from None
        return self._owners[name]

    def _alias(self, name: str, alias: str, model: str) -> str:
        with self._lock:
            version = self._aliases.get((name, alias))
        if version is None:
            version = self.source.version_of(name, alias)
            if version is None:
                raise UnknownModel(f"{model}: {name!r} has no alias @{alias}")
            with self._lock:
                self._aliases[(name, alias)] = version
        return version

    def canary_of(self, name: str) -> canary.Canary | None:
        """The canary this bank routes by for ``name``, or None (no canary, or not read yet)."""
        with self._lock:
            return self._canaries.get(name)

    def canary_role(self, name: str, version: str) -> str | None:
        """``canary`` or ``champion`` when ``name`` has an active canary and ``version`` is one of the two."""
        with self._lock:
            active, champion = self._canaries.get(name), self._aliases.get((name, "champion"))
        if active is None:
            return None
        return "canary" if version == active.version else "champion" if version == champion else None

    def _canary_pick(self, name: str, champion: str, user: str | None) -> str | None:
        """The canary version when this request goes to ``name``'s canary, else None."""
        with self._lock:
            known, active = name in self._canaries, self._canaries.get(name)
        if not known:
            active = self.source.canary(name)
            with self._lock:
                self._canaries[name] = active
        if active is None or active.version == champion or not in_canary(name, user, active.share, self._rng):
            return None
        return active.version

    def _load(self, name: str, version: str, owner: str | None) -> Prefix:
        started = time.monotonic()
        try:
            art = self.source.load(name, version)
            art.check_base(self.base)
        except PrefixError as err:
            raise PrefixUnusable(f"{name} v{version} cannot be served by this server: {err}") from None
        keys, values = art.keys_values()
        keys = tuple(k.to(**self._cast).contiguous() for k in keys)
        values = tuple(v.to(**self._cast).contiguous() for v in values)
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        log.info("loaded prefix %s v%s (P=%d, %d bytes) in %.2f s", name, version, keys[0].shape[1], nbytes,
                 time.monotonic() - started)
        return Prefix(name, str(version), owner, keys, values, art.prompt_template, nbytes)

    def preload(self, models: list[str]) -> int:
        """Load ``models`` (request ``model`` names, most wanted first) until the device tier is full; one that
        cannot be loaded is logged and skipped. Returns how many were loaded."""
        done, size = 0, 0  # size: the last one's bytes, the guess for the next
        for model in models:
            with self._lock:
                if not self._tiers.has_room(size):
                    break
            try:
                prefix = self.resolve(model, None)
            except (PrefixError, RegistryError) as err:
                log.warning("preload of %s skipped: %s", model, err)
                continue
            if prefix is not None:
                done, size = done + 1, prefix.nbytes
                self.on_event("preload", 1)
        return done

    # --- alias refresh ----------------------------------------------------------------------------------------
    def refresh(self) -> list[tuple[str, str, str, str]]:
        """Check every alias and canary in use (one snapshot of the registry); load each moved alias's new
        version, then switch the alias. Returns the moves ``(name, alias, old, new)``; an alias that was removed
        is forgotten (its next use is a 404)."""
        with self._lock:
            aliases, known = dict(self._aliases), dict(self._canaries)
        state = self.source.snapshot(sorted({name for name, _ in aliases} | set(known)))
        moves = []
        for (name, alias), old in aliases.items():
            new = state.get(name, ({}, None))[0].get(alias)
            if new == old:
                continue
            if new is not None:
                try:
                    self.get(name, new)
                except PrefixError as err:  # keep serving the old version; the move is retried next round
                    log.warning("alias %s@%s moved to v%s, which cannot be served: %s", name, alias, new, err)
                    continue
            with self._lock:
                if new is None:
                    self._aliases.pop((name, alias), None)
                else:
                    self._aliases[(name, alias)] = new
            moves.append((name, alias, old, new))
            self.on_event("alias_move", 1)
            log.info("alias %s@%s moved: v%s -> v%s", name, alias, old, new)
        return moves + self._refresh_canaries(known, {name: c for name, (_, c) in state.items()})

    def _refresh_canaries(self, known: dict, now: dict) -> list[tuple[str, str, str | None, str | None]]:
        """Apply the canaries read now (``now``: name -> canary) to the champions in use (``known``: name -> the
        canary routed by); a new canary version is loaded before it gets requests."""
        moves = []
        for name, old in known.items():
            new = now.get(name)
            if _settings(new) == _settings(old):
                continue
            if new is not None and (old is None or new.version != old.version):
                try:
                    self.get(name, new.version)
                except PrefixError as err:
                    log.warning("canary %s v%s cannot be served (retried at the next refresh): %s", name,
                                new.version, err)
                    continue
            with self._lock:
                self._canaries[name] = new
            moves.append((name, "canary", old and old.version, new and new.version))
            self.on_event("alias_move", 1)
            log.info("canary of %s: %s -> %s", name, f"v{old.version} at {old.share:g}%" if old else "none",
                     f"v{new.version} at {new.share:g}%" if new else "none")
        return moves

    def start(self) -> None:
        """Start the poller thread (every ``refresh_s`` seconds; registry errors are logged and retried)."""
        if self.refresh_s <= 0 or self._poller is not None:
            return

        def poll() -> None:
            while not self._stop.wait(self.refresh_s):
                try:
                    self.refresh()
                except Exception as err:  # an unreachable registry must not stop serving what is loaded
                    log.warning("alias refresh failed (retrying in %.0f s): %s", self.refresh_s, err)

        self._poller = threading.Thread(target=poll, name="prefix-bank-refresh", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
