"""What a server sees of a canary: request, error and latency counts per version of the models with an active
canary (``/metrics``: ``prefixflow_canary_requests`` and ``prefixflow_canary_request_duration_seconds``, labels
``model``, ``version``, ``role``), and the automatic rollback of a canary that fails more often than its champion.

A request counts for a canary model when the version it was served by is that model's ``@canary`` or ``@champion``
(``role``). An error is a 5xx answer (a 4xx is the caller's mistake, 499 the caller leaving). When the canary has
answered ``min_requests`` requests and its error rate exceeds the champion's by more than ``error_margin`` points,
this replica ends the canary (``services.canary.abort_if``: only if it is still that version), once. A canary
started with ``finish_after`` (the gate's ``canary.min_requests``) that has answered that many requests and is no
worse (its error rate at most the champion's plus the margin) is finished instead (``services.canary.finish_if``):
it becomes ``@champion``. Counts are this replica's own. Series of a model whose canary ended leave ``/metrics``
at the next scrape (:meth:`CanaryWatch.prune`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from prefixflow.services import canary
from prefixflow.serving.bank import Prefix, PrefixBank
from prefixflow.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryPolicy:
    """``error_margin``: percentage points of error rate above the champion's that end a canary (None: never);
    ``min_requests``: canary requests answered before the rule applies."""

    error_margin: float | None = 5.0
    min_requests: int = 50


class CanaryWatch:
    """Per-version counts and the rollback rule of one server (thread-safe)."""

    def __init__(self, metrics: ServerMetrics, bank: PrefixBank, policy: CanaryPolicy | None = None,
                 abort: Callable[[str, str], bool] = canary.abort_if,
                 finish: Callable[[str, str], bool] = canary.finish_if) -> None:
        self.metrics, self.bank, self.policy = metrics, bank, policy or CanaryPolicy()
        self.abort, self.finish = abort, finish
        self._lock = threading.Lock()
        self._tally: dict[tuple[str, str], dict[str, list[int]]] = {}  # (model, canary version) -> role -> [n, err]
        self._series: dict[str, set[tuple[str, str, str]]] = {}  # model -> (version, role, status) recorded
        self._ended: set[tuple[str, str]] = set()  # (model, canary version) this replica ended or finished

    def label(self, prefix: Prefix | None) -> tuple[str, str, str] | None:
        """``(model, version, role)`` when ``prefix`` is the canary or the champion of a model with a canary."""
        if prefix is None:
            return None
        role = self.bank.canary_role(prefix.name, prefix.version)
        return None if role is None else (prefix.name, prefix.version, role)

    def record(self, label: tuple[str, str, str], status: int, seconds: float) -> None:
        """One answered request of ``label``; may start the rollback or the finish of its model's canary."""
        name, version, role = label
        self.metrics.canary_requests.labels(name, version, role, str(status)).inc()
        self.metrics.canary_latency.labels(name, version, role).observe(seconds)
        active = self.bank.canary_of(name)
        with self._lock:
            self._series.setdefault(name, set()).add((version, role, str(status)))
            if active is None:
                return
            tally = self._tally.setdefault((name, active.version), {})
            counts = tally.setdefault(role, [0, 0])
            counts[0] += 1
            counts[1] += status >= 500
            act = self._decide(tally, active.finish_after)
            if act is None or (name, active.version) in self._ended:
                return
            self._ended.add((name, active.version))
        threading.Thread(target=act[0], args=(name, active.version, act[1]), name="canary-end", daemon=True).start()

    def _decide(self, tally: dict[str, list[int]], finish_after: int | None) -> tuple[Callable, str] | None:
        """``(self._roll_back or self._finish, why)`` when the canary must end now, else None (lock held)."""
        (n, errors), (m, champion_errors) = tally.get("canary", [0, 0]), tally.get("champion", [0, 0])
        if not n:
            return None
        rate, champion_rate = 100 * errors / n, 100 * champion_errors / m if m else 0.0
        margin = self.policy.error_margin
        why = f"error rate {rate:.1f}% over {n} requests against the champion's {champion_rate:.1f}% over {m}"
        if margin is not None and n >= self.policy.min_requests and rate - champion_rate > margin:
            return self._roll_back, f"{why} (margin {margin:g} points)"
        if finish_after is not None and n >= finish_after and rate - champion_rate <= (margin or 0.0):
            return self._finish, f"no worse than the champion: {why}"
        return None

    def _roll_back(self, name: str, version: str, reason: str) -> None:
        if self._registry(self.abort, name, version, reason):
            self.metrics.canary_rollbacks.labels(name, version).inc()
            log.warning("canary %s v%s rolled back: %s", name, version, reason)

    def _finish(self, name: str, version: str, reason: str) -> None:
        if self._registry(self.finish, name, version, reason):
            log.warning("canary %s v%s finished, now @champion: %s", name, version, reason)

    def _registry(self, change: Callable[[str, str], bool], name: str, version: str, reason: str) -> bool:
        try:
            return change(name, version)
        except Exception as err:  # the registry is down: the next request of this canary tries again
            log.warning("canary %s v%s should end (%s) but the registry refused: %s", name, version, reason, err)
            with self._lock:
                self._ended.discard((name, version))
            return False

    def prune(self) -> None:
        """Remove the series of models whose canary has ended (at a scrape of ``/metrics``)."""
        with self._lock:
            ended = [name for name in self._series if self.bank.canary_of(name) is None]
            for name in ended:
                for version, role, status in self._series.pop(name):
                    self.metrics.canary_requests.remove(name, version, role, status)
                    with contextlib.suppress(KeyError):  # the latency series of (version, role) goes once
                        self.metrics.canary_latency.remove(name, version, role)
                for key in [k for k in self._tally if k[0] == name]:
                    del self._tally[key]


@dataclass
class VersionStats:
    """One version's side of a canary, summed over the scraped servers. Seconds."""

    version: str
    role: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    buckets: dict[float, float] | None = None  # upper bound -> cumulative count

    @property
    def error_rate(self) -> float:
        return 100 * self.errors / self.requests if self.requests else 0.0

    @property
    def mean_s(self) -> float | None:
        return self.seconds / self.requests if self.requests else None

    def quantile_s(self, q: float) -> float | None:
        """The upper bound of the histogram bucket that holds quantile ``q`` (an upper estimate)."""
        if not self.buckets or not self.requests:
            return None
        rank = q * self.requests
        return next((bound for bound, count in sorted(self.buckets.items()) if count >= rank), None)


def version_stats(metrics_texts: list[str], model: str) -> list[VersionStats]:
    """The canary and champion of registered model ``model`` as ``/metrics`` texts of one or more servers report
    them (canary first)."""
    stats: dict[tuple[str, str], VersionStats] = {}
    for text in metrics_texts:
        for family in text_string_to_metric_families(text):
            if family.name not in ("prefixflow_canary_requests", "prefixflow_canary_request_duration_seconds"):
                continue
            for sample in family.samples:
                labels = sample.labels
                if labels.get("model") != model:
                    continue
                entry = stats.setdefault((labels["version"], labels["role"]),
                                         VersionStats(labels["version"], labels["role"], buckets={}))
                if sample.name == "prefixflow_canary_requests_total":
                    entry.requests += int(sample.value)
                    entry.errors += int(sample.value) if labels["status"].startswith("5") else 0
                elif sample.name.endswith("_sum"):
                    entry.seconds += sample.value
                elif sample.name.endswith("_bucket"):
                    bound = float(labels["le"])
                    entry.buckets[bound] = entry.buckets.get(bound, 0.0) + sample.value
    return sorted(stats.values(), key=lambda s: (s.role != "canary", s.version))
