"""What each client costs: the training figures of its runs (MLflow metrics ``usage.*``, logged from the job's
``usage`` event, launch.usage) and its serving requests and tokens (the servers' usage log, services.usage_log),
added up per client for ``prefixflow usage``.

A client's row: ``runs`` (its pipeline runs started in the window; a sweep's trials are not counted as runs),
``trainings`` (runs with a usage record: trials included), ``versions`` (registered versions created in the
window), ``train_hours`` (device -> hours: CPU process-hours on ``cpu``, GPU-hours by GPU name), ``wall_hours``,
``tokens_trained``, and from the serving log ``requests``, ``prompt_tokens``, ``completion_tokens``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from prefixflow.services import tracking
from prefixflow.services.spec import experiment_name
from prefixflow.services.usage_log import read_usage

FIGURES = ("wall_s", "cpu_s", "gpu_s", "tokens", "elapsed_s", "peak_host_mb", "peak_device_mb", "pack_members",
           "processes")  # the numbers of a usage event, logged as metrics usage.NAME
_PAGE = 1000
_EXPERIMENTS_PER_SEARCH = 100


def usage_metrics(usage: dict) -> dict[str, float]:
    """MLflow metrics (``usage.wall_s`` ...) of a usage event (launch.usage)."""
    return {f"usage.{k}": float(usage[k]) for k in FIGURES if usage.get(k) is not None}


def usage_tags(usage: dict, with_figures: bool = False) -> dict[str, str]:
    """Tags of a usage event: its device (for a run); ``with_figures``: its numbers too (for a registered version,
    whose tags are its only metadata)."""
    tags = {"usage.device": str(usage.get("device")), "usage.device_name": str(usage.get("device_name"))}
    if with_figures:
        tags.update({k: f"{v:.6g}" for k, v in usage_metrics(usage).items()})
    return tags


class ClientUsage(BaseModel):
    client: str
    runs: int = 0
    trainings: int = 0
    versions: int = 0
    train_hours: dict[str, float] = Field(default_factory=dict)  # device -> process-hours (cpu) or GPU-hours
    wall_hours: float = 0.0
    tokens_trained: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """Seconds since the epoch from ``7d``, ``12h``, ``30m``, ``2w`` (that long ago) or an ISO date/time (UTC when
    it names no zone); None for None. ValueError saying the accepted forms otherwise."""
    if not text:
        return None
    now = time.time() if now is None else now
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if found:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[found.group(2)]
        return now - float(found.group(1)) * unit
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r} is not a duration or a date: use e.g. 7d, 12h, 30m, 2w, or "
                         "2026-12-01 / 2026-12-01T08:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _experiments(client: str | None) -> list[str]:
    c = tracking.client()
    if client is not None:
        exp = c.get_experiment_by_name(experiment_name(client))
        return [exp.experiment_id] if exp is not None else []
    ids, token = [], None
    while True:
        page = c.search_experiments(filter_string=f"name LIKE '{experiment_name('')}%'", max_results=_PAGE,
                                    page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _runs(experiment_ids: list[str], since: float | None) -> Iterator:
    c = tracking.client()
    where = f"attributes.start_time >= {int(since * 1000)}" if since is not None else ""
    for i in range(0, len(experiment_ids), _EXPERIMENTS_PER_SEARCH):
        token = None
        while True:
            page = c.search_runs(experiment_ids[i:i + _EXPERIMENTS_PER_SEARCH], filter_string=where,
                                 max_results=_PAGE, page_token=token)
            yield from page
            token = page.token
            if not token:
                break


def _versions(client: str | None, since: float | None) -> Iterator:
    c = tracking.client()
    where = f"tags.client = '{client}'" if client is not None else "tags.client LIKE '%'"
    token = None
    while True:
        page = c.search_model_versions(where, max_results=_PAGE, order_by=["creation_timestamp DESC"],
                                       page_token=token)
        for mv in page:
            if since is not None and mv.creation_timestamp < since * 1000:
                return
            yield mv
        token = page.token
        if not token:
            return


def report(since: float | None = None, client: str | None = None,
           usage_dir: Path | None = None) -> list[ClientUsage]:
    """One row per client (sorted by name) with anything in the window: its trainings from MLflow and its serving
    from the usage log in ``usage_dir`` (None: none read)."""
    rows: dict[str, ClientUsage] = {}

    def row(name: str) -> ClientUsage:
        return rows.setdefault(name, ClientUsage(client=name))

    for run in _runs(_experiments(client), since):
        name = run.data.tags.get("client")
        if not name:
            continue
        r = row(name)
        r.runs += "mlflow.parentRunId" not in run.data.tags
        m = run.data.metrics
        if "usage.wall_s" not in m:
            continue
        r.trainings += 1
        device = run.data.tags.get("usage.device", "cpu")
        if device == "cuda":
            label, seconds = run.data.tags.get("usage.device_name", "cuda"), m.get("usage.gpu_s", 0.0)
        else:
            label, seconds = device, m.get("usage.cpu_s", 0.0)
        r.train_hours[label] = r.train_hours.get(label, 0.0) + seconds / 3600
        r.wall_hours += m["usage.wall_s"] / 3600
        r.tokens_trained += int(m.get("usage.tokens", 0))
    for mv in _versions(client, since):
        row(mv.tags["client"]).versions += 1
    if usage_dir is not None:
        for name, served in read_usage(usage_dir, since, client).items():
            r = row(name)
            r.requests, r.prompt_tokens, r.completion_tokens = (served["requests"], served["prompt_tokens"],
                                                                served["completion_tokens"])
    return [rows[k] for k in sorted(rows)]
