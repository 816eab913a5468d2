"""Canary rollout of a registered version (no Prefect here).

A canary is two registry entries on the registered model: the ``@canary`` alias (the version) and the tag
``prefixflow.canary.share`` (the percentage of the requests naming ``@champion`` that it serves). Every server
replica reads both at its alias refresh (``serving.bank``), so a start, a finish or an abort reaches all of them
within one refresh period, and a request in flight keeps the version it started with. The share is written
before the alias and removed after it, so a replica never sees an alias without its share.

* :func:`start`: ``@canary`` = VERSION with SHARE percent (another canary is replaced);
* :func:`finish`: the canary becomes ``@champion``, the old champion ``@previous``; the canary entries go;
* :func:`abort`: the canary entries go; ``@champion`` and ``@previous`` stay as they were;
* :func:`rollback`: :func:`abort` during a canary, else ``registry.rollback`` (swap champion and previous).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefixflow.services import registry, tracking
from prefixflow.services.errors import RegistryError

CANARY_ALIAS = "canary"
SHARE_TAG = "prefixflow.canary.share"


@dataclass(frozen=True)
class Canary:
    """An active canary: ``version`` serves ``share`` percent (0-100) of ``name@champion``'s requests."""

    name: str
    version: str
    share: float
    champion: str | None


def current(name: str) -> Canary | None:
    """The active canary of registered model ``name``, or None (no ``@canary`` alias, or no share tag)."""
    model = registry.registered_model(name)
    if model is None:
        return None
    aliases = dict(getattr(model, "aliases", None) or {})
    version, share = aliases.get(CANARY_ALIAS), (model.tags or {}).get(SHARE_TAG)
    if version is None or share is None:
        return None
    try:
        share_value = float(share)
    except ValueError:
        return None
    return Canary(name, str(version), share_value, None if aliases.get("champion") is None
                  else str(aliases["champion"]))


def check_share(share: float) -> float:
    if not 0 < share < 100:
        raise RegistryError(f"a canary share is a percentage of @champion's requests, above 0 and below 100, not "
                            f"{share:g}: e.g. --canary 10 (promote without --canary to move all of them)")
    return float(share)


def start(name: str, version: str, share: float) -> Canary:
    """Make ``version`` the canary of ``name`` with ``share`` percent of ``@champion``'s requests."""
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
    c.set_registered_model_tag(name, SHARE_TAG, f"{share:g}")
    c.set_registered_model_alias(name, CANARY_ALIAS, str(version))
    return Canary(name, str(version), share, champion)


def _remove(name: str) -> None:
    c = tracking.client()
    c.delete_registered_model_alias(name, CANARY_ALIAS)
    c.delete_registered_model_tag(name, SHARE_TAG)


def _active(name: str) -> Canary:
    active = current(name)
    if active is None:
        raise RegistryError(f"{name!r} has no active canary (start one with `prefixflow promote "
                            f"{name.replace('-', '/', 1)}/VERSION --canary 10`)")
    return active


def finish(name: str) -> tuple[str | None, str]:
    """Make the canary ``@champion`` (the old champion becomes ``@previous``) and end the canary. Returns
    (old champion, new champion)."""
    active = _active(name)
    old, new = registry.promote(name, active.version)
    _remove(name)
    return old, new


def abort(name: str) -> Canary:
    """End the canary; ``@champion`` and ``@previous`` stay as they were. Returns the canary that ended."""
    active = _active(name)
    _remove(name)
    return active


def rollback(name: str) -> tuple[Canary | None, tuple[str, str] | None]:
    """During a canary: abort it, ``(canary, None)``; otherwise swap champion and previous, ``(None, (from, to))``."""
    registry.owner(name)
    if current(name) is not None:
        return abort(name), None
    return None, registry.rollback(name)
