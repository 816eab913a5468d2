"""ServeConfig: the settings of one ``prefixflow serve`` process, checked before anything heavy is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Deferred imports: torch is imported by ``torch_device`` only, so the CLI can build a config cheaply.


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server. ``max_batch``: rows decoding together; ``max_queued``: rows waiting for a batch row
    before new requests get 429; ``client_max_running`` / ``client_max_queued``: the same per client (None: no
    limit; rows are taken in fair order between clients either way, ``serving.fair_queue``); ``max_tokens``: the
    most tokens one request may ask for (and the chat default); ``rate_limit``: requests per second per key (0:
    none; bursts up to max(1, rate)); ``bank_mb``: memory for prefix keys/values; ``refresh_s``: how often used
    aliases are re-read from the registry (0: never); ``precision``: the base's dtype (``auto``: bf16 only where
    it is native); ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``max_prefill_rows``: new rows prefilled
    together per step (None: all free rows; a bound keeps one big admission wave from stalling the running rows);
    ``prefill_chunk``: prompt tokens prefilled per step (a longer prompt takes several steps, so running rows keep
    their pace; None: 2 x max_batch on a CPU, 512 on a GPU); ``kv_cache_mb``: KV memory for the rows' own tokens,
    split between the ``max_batch`` rows (it bounds prompt + max_tokens of one request; larger requests get 400);
    ``threads``: torch CPU threads (None: torch's default); ``canary_error_margin`` / ``canary_min_requests``: the
    automatic canary rollback (``serving.canary_watch``; None: off); ``host_bank_mb``: host memory behind the
    bank (``host_mb``); ``preload`` / ``preload_top``: models loaded at start-up, then the most used of the usage
    log (0: none)."""

    base: str = "smollm2-135m"
    keys_file: Path | None = None
    max_batch: int = 16
    max_queued: int = 256
    client_max_running: int | None = None
    client_max_queued: int | None = None
    max_tokens: int = 512
    rate_limit: float = 0.0
    bank_mb: float = 1024
    refresh_s: float = 5.0
    precision: str = "auto"
    device: str = "auto"
    max_prefill_rows: int | None = None
    prefill_chunk: int | None = None
    kv_cache_mb: float = 2048.0
    threads: int | None = None
    usage_dir: Path | None = None
    usage_flush_s: float = 30.0
    canary_error_margin: float | None = 5.0
    canary_min_requests: int = 50
    host_bank_mb: float | None = None
    preload: tuple[str, ...] = ()
    preload_top: int = 32

    def host_mb(self, device: str) -> float:
        """Host memory for prefixes pushed out of the device tier: ``host_bank_mb``, else 4 x ``bank_mb`` on a
        GPU and none on a CPU (where both tiers would be the same memory)."""
        if self.host_bank_mb is not None:
            return self.host_bank_mb
        return 0.0 if device == "cpu" else 4 * self.bank_mb

    @property
    def torch_device(self) -> str:
        """``auto``: the first GPU when there is one, else the CPU. ValueError saying what this machine has
        when the device asked for is not one of its devices."""

        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.device == "auto":
            return "cuda" if gpus else "cpu"
        if self.device == "cpu":
            return "cpu"
        found = re.fullmatch(r"cuda(?::(\d+))?", self.device)
        if found is None:
            raise ValueError(f"--device {self.device!r} is not a device: use auto, cpu, cuda or cuda:N")
        index = int(found.group(1) or 0)
        if index >= gpus:
            have = f"{gpus} GPU(s): cuda:0..cuda:{gpus - 1}" if gpus else "no CUDA GPU this torch can use"
            raise ValueError(f"--device {self.device}: this machine has {have}; use --device auto or cpu")
        return self.device
