"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: they only add noise to dashboards

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Counters, gauges and histograms of one server. Units: seconds and tokens."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("prefixflow_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.cancelled = Counter("prefixflow_requests_cancelled", "Requests whose client went away before the end",
                                 registry=r)
        self.prompt_tokens = Counter("prefixflow_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("prefixflow_completion_tokens", "Tokens generated", registry=r)
        self.queue_wait = Histogram("prefixflow_queue_wait_seconds", "Time from admission to a batch row",
                                    buckets=_LATENCY, registry=r)
        self.ttft = Histogram("prefixflow_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("prefixflow_time_per_output_token_seconds",
                              "Mean time between a request's tokens after the first", buckets=_PER_TOKEN, registry=r)
        self.latency = Histogram("prefixflow_request_duration_seconds", "Time from request to its last token",
                                 buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("prefixflow_batch_size", "Rows in the running batch at each decode step",
                                    buckets=_BATCH, registry=r)
        self.running = Gauge("prefixflow_running_requests", "Rows decoding now", registry=r)
        self.queued = Gauge("prefixflow_queued_requests", "Admitted rows waiting for a batch row", registry=r)
        self.prefixes_loaded = Gauge("prefixflow_prefixes_loaded", "Prefix versions held in the bank", registry=r)
        self.bank_bytes = Gauge("prefixflow_prefix_bank_bytes", "Bytes of prefix keys/values in the bank",
                                registry=r)
        self.host_prefixes = Gauge("prefixflow_prefixes_in_host_memory", "Prefix versions pushed out of the device "
                                   "to host memory (the bank's second tier)", registry=r)
        self.host_bytes = Gauge("prefixflow_prefix_bank_host_bytes", "Bytes of prefixes in host memory", registry=r)
        self.bank = Counter("prefixflow_prefix_bank_events", "Prefix bank events: hit, host_hit, load, evict, "
                            "host_evict, preload, alias_move", ["event"], registry=r)
        self.preemptions = Counter("prefixflow_preemptions", "Running rows preempted for another client's share "
                                   "(recomputed when admitted again)", registry=r)
        self.rejected = Counter("prefixflow_requests_rejected", "Requests refused before admission, by reason",
                                ["reason"], registry=r)
        # per client (one series per client: the owner of the prefix used, else the caller's client, else "-")
        self.client_requests = Counter("prefixflow_client_requests", "Requests admitted, by client", ["client"],
                                       registry=r)
        self.client_prompt_tokens = Counter("prefixflow_client_prompt_tokens", "Prompt tokens prefilled, by client",
                                            ["client"], registry=r)
        self.client_completion_tokens = Counter("prefixflow_client_completion_tokens", "Tokens generated, by client",
                                                ["client"], registry=r)
        # per caller's client (the share the fair queue balances: the key's client, each admin key its own)
        self.client_queue_wait = Histogram("prefixflow_queue_wait_by_client_seconds", "Time from admission to a batch "
                                           "row, by the caller's client", ["client"], buckets=_LATENCY, registry=r)
        self.client_ttft = Histogram("prefixflow_time_to_first_token_by_client_seconds", "Time from request to its "
                                     "first token, by the caller's client", ["client"], buckets=_LATENCY, registry=r)

        # per version, only for models with an active canary (serving.canary_watch; removed when it ends)
        self.canary_requests = Counter("prefixflow_canary_requests", "Requests answered for a model with an active "
                                       "canary, by version, role (canary or champion) and HTTP status",
                                       ["model", "version", "role", "status"], registry=r)
        self.canary_latency = Histogram("prefixflow_canary_request_duration_seconds", "Time from request to its "
                                        "answer's end for a model with an active canary, by version and role",
                                        ["model", "version", "role"], buckets=_LATENCY, registry=r)
        self.canary_rollbacks = Counter("prefixflow_canary_rollbacks", "Canaries this server ended for their error "
                                        "rate", ["model", "version"], registry=r)

    def client_usage(self, client: str, requests: int, prompt_tokens: int, completion_tokens: int) -> None:
        for counter, amount in ((self.client_requests, requests), (self.client_prompt_tokens, prompt_tokens),
                                (self.client_completion_tokens, completion_tokens)):
            if amount:
                counter.labels(client).inc(amount)

    def bank_event(self, kind: str, amount: int) -> None:
        self.bank.labels(kind).inc(amount)
