"""Canary rollout of a registered version (no Prefect here).

A canary is two registry entries on the registered model: the ``@canary`` alias (the version) and the tag
``prefixflow.canary.share`` (the percentage of the requests naming ``@champion`` that it serves). Every server
replica reads both at its alias refresh (``serving.bank``), so a start, a finish or an abort reaches all of them
within one refresh period, and a request in flight keeps the version it started with. The share is written
before the alias and removed after it, so a replica never sees an alias without its share.

* :func:`start`: ``@canary`` = VERSION with SHARE percent (another canary is replaced);
* :func:`finish`: the canary becomes ``@champion``, the old champion ``@previous``; the canary entries go;
* :func:`abort`: the canary entries go; ``@champion`` and ``@previous`` stay as they were (:func:`abort_if`:
  only if the canary is still a given version, for a server's automatic rollback);
* :func:`rollback`: :func:`abort` during a canary, else ``registry.rollback`` (swap champion and previous).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefixflow.services import registry, tracking
from prefixflow.services.errors import RegistryError

CANARY_ALIAS = "canary"
SHARE_TAG = "prefixflow.canary.share"
FINISH_TAG = "prefixflow.canary.finish_after"  # requests after which a server finishes a canary that is no worse


@dataclass(frozen=True)
class Canary:
    """An active canary: ``version`` serves ``share`` percent (0-100) of ``name@champion``'s requests."""

    name: str
    version: str
    share: float
    champion: str | None
    finish_after: int | None = None  # canary requests after which a server finishes it when it is no worse


def current(name: str) -> Canary | None:
    """The active canary of registered model ``name``, or None (no ``@canary`` alias, or no share tag)."""
    model = registry.registered_model(name)
    return None if model is None else of(model)


def of(model) -> Canary | None:
    """The active canary of a RegisteredModel read already (its aliases and tags), or None."""
    name = model.name
    aliases = dict(getattr(model, "aliases", None) or {})
    tags = model.tags or {}
    version, share = aliases.get(CANARY_ALIAS), tags.get(SHARE_TAG)
    if version is None or share is None:
        return None
    try:
        share_value, finish_after = float(share), int(tags[FINISH_TAG]) if tags.get(FINISH_TAG) else None
    except ValueError:
        return None
    return Canary(name, str(version), share_value, None if aliases.get("champion") is None
                  else str(aliases["champion"]), finish_after)


def check_share(share: float) -> float:
    if not 0 < share < 100:
        raise RegistryError(f"a canary share is a percentage of @champion's requests, above 0 and below 100, not "
                            f"{share:g}: e.g. --canary 10 (promote without --canary to move all of them)")
    return float(share)


def start(name: str, version: str, share: float, finish_after: int | None = None) -> Canary:
    """Make ``version`` the canary of ``name`` with ``share`` percent of ``@champion``'s requests; with
    ``finish_after``, a server finishes it after that many canary requests if it is no worse than the champion."""
    share = check_share(share)
    registry.owner(name)  # RegistryError naming the model when it is not registered
    c = tracking.client()
    c.get_model_version(name, version)  # raises if missing
    champion = registry.alias_version(name, "champion")
    if champion is None:
        raise RegistryError(f"{name!r} has no @champion for a canary to share requests with: promote v{version} "
                            "without --canary")
    if champion == str(version):
        raise RegistryError(f"v{version} is already {name}@champion: a canary is another version")
    if finish_after:
        c.set_registered_model_tag(name, FINISH_TAG, str(int(finish_after)))
    else:
        _delete_tags(name, FINISH_TAG)
    c.set_registered_model_tag(name, SHARE_TAG, f"{share:g}")
    c.set_registered_model_alias(name, CANARY_ALIAS, str(version))
    return Canary(name, str(version), share, champion, finish_after)


def _delete_tags(name: str, *keys: str) -> None:
    """Delete those of ``keys`` the registered model has (one read of its tags)."""
    present = registry.registered_model(name).tags or {}
    for key in keys:
        if key in present:
            tracking.client().delete_registered_model_tag(name, key)


def _remove(name: str) -> None:
    tracking.client().delete_registered_model_alias(name, CANARY_ALIAS)
    _delete_tags(name, SHARE_TAG, FINISH_TAG)


def _active(name: str) -> Canary:
    active = current(name)
    if active is None:
        raise RegistryError(f"{name!r} has no active canary (start one with `prefixflow promote "
                            f"{name.replace('-', '/', 1)}/VERSION --canary 10`)")
    return active


def _still(name: str, version: str) -> Canary | None:
    """``name``'s canary when it is still ``version`` (another replica may have ended it, or a newer canary
    replaced it), else None."""
    active = current(name)
    return active if active is not None and active.version == str(version) else None


def _promoted(active: Canary) -> tuple[str | None, str]:
    old, new = registry.promote(active.name, active.version)
    _remove(active.name)
    return old, new


def finish(name: str) -> tuple[str | None, str]:
    """Make the canary ``@champion`` (the old champion becomes ``@previous``) and end the canary. Returns
    (old champion, new champion)."""
    return _promoted(_active(name))


def abort(name: str) -> Canary:
    """End the canary; ``@champion`` and ``@previous`` stay as they were. Returns the canary that ended."""
    active = _active(name)
    _remove(name)
    return active


def abort_if(name: str, version: str) -> bool:
    """End ``name``'s canary only if it is still ``version`` (a server's automatic rollback). Returns whether it
    ended it."""
    active = _still(name, version)
    if active is not None:
        _remove(name)
    return active is not None


def finish_if(name: str, version: str) -> bool:
    """Finish ``name``'s canary only if it is still ``version`` (a server's automatic finish). Returns whether it
    finished it."""
    active = _still(name, version)
    if active is not None:
        _promoted(active)
    return active is not None


def rollback(name: str) -> tuple[Canary | None, tuple[str, str] | None]:
    """During a canary: abort it, ``(canary, None)``; otherwise swap champion and previous, ``(None, (from, to))``."""
    registry.owner(name)
    active = current(name)
    if active is not None:
        _remove(name)
        return active, None
    return None, registry.rollback(name)
