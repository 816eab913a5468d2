"""A fleet file: the settings its clients share and a list of clients with their own, in one YAML file (a folder
of one spec per client stays possible)::

    defaults:                  # any spec fields; each client's own are merged over them
      base_model: smollm2-135m
      data: {template: "{source} ->"}
      train: {max_steps: 300}
    clients:
      - {client: acme, task: e2e, data: {source: data/acme.jsonl}}
      - client: globex
        task: e2e
        data: {source: s3://bucket/globex.jsonl}
        train: {learning_rate: 0.001}

A client's spec is the defaults with its entry merged over them: mappings key by key, at any depth; any other
value (a list, a string, a number, null) replaces the default. Relative local data paths are resolved against the
file's folder. Every entry is checked, and one error lists every bad entry (``clients[3] (globex/e2e)``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from prefixflow.services.spec import PipelineSpec, SpecError, check_fleet, parse_spec, resolve_data_paths

SHOWN_ERRORS = 20  # bad entries listed in full; the rest are counted


def merged(defaults: dict, override: dict) -> dict:
    """``override`` over ``defaults``: nested mappings merged key by key, anything else replaced."""
    out = copy.deepcopy(defaults)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_fleet_file(path: Path) -> bool:
    """Whether ``path`` is a file (a fleet file, as opposed to a folder of specs)."""
    return path.is_file()


def load_fleet_file(path: str | Path) -> list[PipelineSpec]:
    """The specs of a fleet file, each (client, task) once; SpecError naming every bad entry otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SpecError(f"fleet file {path} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or "clients" not in data:
        raise SpecError(f"{path} must hold a mapping with `clients:` (a list of client specs) and optionally "
                        "`defaults:` (the fields they share)")
    unknown = sorted(set(data) - {"defaults", "clients"})
    if unknown:
        raise SpecError(f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}: a fleet file holds "
                        "`defaults:` and `clients:` only (put spec fields under `defaults:`)")
    defaults, clients = data.get("defaults") or {}, data["clients"]
    if not isinstance(defaults, dict):
        raise SpecError(f"{path}: `defaults:` must be a mapping of spec fields, not {type(defaults).__name__}")
    if not isinstance(clients, list) or not clients:
        raise SpecError(f"{path}: `clients:` must be a non-empty list of client specs (client, task, data, ...)")
    specs, errors = [], []
    for i, entry in enumerate(clients):
        if not isinstance(entry, dict):
            errors.append(f"clients[{i}]: must be a mapping of spec fields (client, task, ...), not "
                          f"{type(entry).__name__}")
            continue
        spec = resolve_data_paths(merged(defaults, entry), path.parent)
        where = f"clients[{i}] ({spec.get('client', '?')}/{spec.get('task', '?')})"
        try:
            specs.append(parse_spec(spec, where))
        except SpecError as err:
            errors.append(str(err))
    if errors:
        more = f"\n... and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        raise SpecError(f"{path}: {len(errors)} of {len(clients)} client(s) are invalid:\n"
                        + "\n".join(errors[:SHOWN_ERRORS]) + more)
    check_fleet(specs)
    return specs
