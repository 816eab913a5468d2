"""The MLflow model registry for prefixes: one registered model per (client, task), named
``CLIENT-TASK``; versions carry tags; aliases ``candidate`` (newest evaluated), ``champion`` (served)
and ``previous`` (the champion before, for rollback).

References accepted everywhere: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``CLIENT/TASK@ALIAS``,
``CLIENT/TASK/VERSION``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from prefix_core import PrefixArtifact
from prefix_core.files import atomic_write_dir
from prefixflow.services import boundary, tracking
from prefixflow.services.errors import AccessDenied, RegistryError

# Deferred imports: mlflow is deferred to the calls: the CLI imports this module.

ALIASES = ("candidate", "champion", "previous")
_REF = re.compile(r"^(?:models:/(?P<name>[^/@]+)|(?P<client>[a-z0-9-]+)/(?P<task>[a-z0-9-]+))"
                  r"(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``(registered model name, alias, version)`` of a reference; exactly one of alias/version is set."""
    m = _REF.match(ref.strip())
    if not m:
        raise RegistryError(f"{ref!r} is not a registry reference: use models:/NAME@ALIAS, models:/NAME/VERSION, "
                            "CLIENT/TASK@ALIAS or CLIENT/TASK/VERSION (e.g. acme/e2e@champion)")
    name = m["name"] or f"{m['client']}-{m['task']}"
    return name, m["alias"], m["version"]


def is_ref(text: str) -> bool:
    return text.startswith("models:/") or (bool(_REF.match(text)) and not Path(text).exists())


def _absent(err: Exception) -> bool:
    """MLflow said the registered model or version does not exist."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST"


def registered_model(name: str):
    """The RegisteredModel ``name`` (with its tags and ``aliases``: alias -> version), or None when there is none."""
    try:
        return tracking.client().get_registered_model(name)
    except Exception as err:
        if _absent(err):
            return None
        raise


def version_exists(name: str, version: str) -> bool:
    try:
        tracking.client().get_model_version(name, version)
    except Exception as err:
        if _absent(err):
            return False
        raise
    return True


def resolve(ref: str):
    """The ModelVersion a reference points at (RegistryError with the choices if none)."""
    name, alias, version = parse_ref(ref)
    model = registered_model(name)
    if model is None:
        raise RegistryError(f"no registered model {name!r} in {tracking.tracking_uri()} (run the pipeline for it "
                            "first, or check MLFLOW_TRACKING_URI)")
    version = model.aliases.get(alias) if alias else version
    if version is not None:
        try:
            return tracking.client().get_model_version(name, str(version))
        except Exception as err:
            if not _absent(err):
                raise
    aliases = ", ".join(f"@{a}=v{v}" for a, v in sorted(model.aliases.items())) or "none"
    raise RegistryError(f"{ref}: {name!r} has no {'alias @' + alias if alias else 'version ' + version} "
                        f"(aliases: {aliases})")


def alias_version(name: str, alias: str) -> str | None:
    """The version behind ``@alias`` of ``name``, or None when the model or alias does not exist (or, on a server
    with auth, the user cannot see the model: creating it then says whose it is)."""
    try:
        model = registered_model(name)
    except AccessDenied:
        return None
    version = model.aliases.get(alias) if model is not None else None
    return None if version is None else str(version)


def aliased(name: str, alias: str):
    """The ModelVersion behind ``@alias`` of ``name``, or None (see :func:`alias_version`)."""
    version = alias_version(name, alias)
    return None if version is None else tracking.client().get_model_version(name, version)


def download(ref: str, out: Path | None = None) -> Path:
    """Download the prefix a reference points at, check it loads, and place it at ``out`` atomically
    (a temporary folder when ``out`` is None). Returns the folder."""
    return download_version(resolve(ref), out)


def download_version(mv, out: Path | None = None) -> Path:
    """:func:`download` for an already resolved ModelVersion."""
    import mlflow.artifacts

    uri = tracking.tracking_uri()
    tmp = Path(tempfile.mkdtemp(prefix="prefixflow-pull-"))
    try:
        source = tracking.client().get_model_version_download_uri(mv.name, mv.version)
        with boundary.mlflow_calls("download_artifacts", artifacts=True):
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri))
        PrefixArtifact.load(got)  # checksums and format before anything is replaced
        if out is None:
            return got
        out = Path(out)
        if out.exists() and not (out / "manifest.json").exists():
            raise RegistryError(f"{out} exists and is not a prefix folder; choose another --out")
        return atomic_write_dir(out, lambda staged: shutil.copytree(got, staged, dirs_exist_ok=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-downloaded is left behind
        raise
    finally:
        if out is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_version(mv) -> PrefixArtifact:
    """Download a resolved ModelVersion into a temporary folder, verify and load it, and remove the folder."""
    folder = download_version(mv)
    try:
        return PrefixArtifact.load(folder)
    finally:
        shutil.rmtree(folder.parent if folder.parent.name.startswith("prefixflow-pull-") else folder,
                      ignore_errors=True)


def owner(name: str) -> str | None:
    """The client a registered model belongs to (its ``client`` tag; None when untagged). RegistryError when
    there is no such model."""
    model = registered_model(name)
    if model is None:
        raise RegistryError(f"no registered model {name!r}")
    return model.tags.get("client")


def models(client: str | None = None) -> list:
    """Registered models (all, or one client's by its ``client`` tag), with their tags and aliases, by name."""
    return sorted(all_models(f"tags.client = '{client}'" if client else None), key=lambda m: m.name)


PAGE = 1000  # registered models per registry call (MLflow's largest page)


def all_models(filter_string: str | None = None) -> list:
    """Every registered model matching ``filter_string`` (None: all), read ``PAGE`` per call."""
    found, token = [], None
    while True:
        page = tracking.client().search_registered_models(filter_string=filter_string, max_results=PAGE,
                                                          page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def versions_for_run(name: str, run_key: str) -> list:
    found = tracking.client().search_model_versions(f"name = '{name}'")
    return [v for v in found if v.tags.get(tracking.RUN_KEY_TAG) == run_key]


def promote(name: str, version: str) -> tuple[str | None, str]:
    """Make ``version`` the champion; the old champion becomes ``previous``. Returns (old, new)."""
    c = tracking.client()
    c.get_model_version(name, version)  # raises if missing
    old = alias_version(name, "champion")
    if old == str(version):
        return old, str(version)
    if old is not None:
        c.set_registered_model_alias(name, "previous", old)
    c.set_registered_model_alias(name, "champion", str(version))
    return old, str(version)


def rollback(name: str) -> tuple[str, str]:
    """Swap ``champion`` and ``previous`` (so a second rollback undoes the first). Returns (from, to)."""
    owner(name)  # RegistryError naming the model when it is not registered
    current, previous = alias_version(name, "champion"), alias_version(name, "previous")
    if previous is None:
        raise RegistryError(f"{name!r} has no @previous version to roll back to (champion is "
                            f"{'v' + current if current else 'unset'})")
    c = tracking.client()
    c.set_registered_model_alias(name, "champion", previous)
    if current is not None:
        c.set_registered_model_alias(name, "previous", current)
    return current or "-", previous
