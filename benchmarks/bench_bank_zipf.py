"""A thousand prefixes: `prefixflow serve` with 1,000 registered prefixes and a bank that holds 64, 16 clients
picking prefixes Zipf-distributed (s = 1.1): errors, bank hit rate, loads per second, and time to first token of
bank hits and misses; also how long ``/v1/models`` takes to list the 1,000.

Set-up (a fresh temporary ``PREFIXFLOW_HOME``, embedded MLflow): ``bench_serving.register_prefixes`` registers
``c00``..``c999`` (task ``bench``, alias champion, P = 10, tables of a trained prefix's scale) through the product's
registration code. The server: ``prefixflow serve --base smollm2-135m --max-batch 16 --bank-mb M`` with M the bytes
of exactly ``--bank-prefixes`` prefixes (SmolLM2, fp32: 450 KiB each), no keys (open), alias refresh every 5 s.

Load: 16 closed-loop clients (bench_serving.load_run), each request streams ``/v1/completions`` (temperature 0,
``max_tokens`` 8, ``ignore_eos``) for model ``c{k}/bench@champion`` where rank k is drawn from Zipf(s) over the
1,000 (weights 1/(k+1)^s, a seeded generator per client). Warm-up: each client's first request; then a window of
``--duration`` s. Variants: ``cold`` (``--preload-top 0``: the bank starts empty) and ``preloaded`` (a restart on
the usage log the cold run wrote: ``--preload-top 64`` loads its 64 most requested models at start-up; its window
opens once the preload is done).

Hit rate and loads per second come from the server's own counters (``prefixflow_prefix_bank_events``) over the
window. Per request, hit or miss is replayed on the client: a least-recently-used list of ``--bank-prefixes``
models in the order requests were sent (the bank's rule; with 16 requests in flight the replay can misclassify a
request whose model another request is loading at that moment, which is rare).

Exact command of the reported run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_bank_zipf.py

Results go to ``benchmarks/results/bank_zipf_cpu.json`` (and docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_serving import (  # noqa: E402
    TASK,
    ServerProcess,
    load_run,
    percentile,
    read_sources,
    register_prefixes,
    wait_idle,
)

RESULTS = HERE / "results"


def bank_events(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("prefixflow_prefix_bank_events_total{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('"')[1]] = float(value)
    return out


def time_models(url: str, calls: int) -> dict:
    """``/v1/models`` ``calls`` times: entries listed, p50/p95/max milliseconds."""
    import httpx

    took, entries = [], 0
    with httpx.Client(timeout=60) as http:
        for _ in range(calls):
            started = time.monotonic()
            resp = http.get(f"{url}/v1/models")
            took.append((time.monotonic() - started) * 1000)
            resp.raise_for_status()
            entries = len(resp.json()["data"])
    return {"entries": entries, "calls": calls, "p50_ms": round(percentile(took, 50), 1),
            "p95_ms": round(percentile(took, 95), 1), "max_ms": round(max(took), 1)}


def replay(records: list, capacity: int) -> dict[int, bool]:
    """id(record) -> whether its model was in an LRU list of ``capacity`` models when it was sent."""
    lru: OrderedDict[str, None] = OrderedDict()
    hit = {}
    for rec in sorted(records, key=lambda r: r.start):
        hit[id(rec)] = rec.model in lru
        lru[rec.model] = None
        lru.move_to_end(rec.model)
        while len(lru) > capacity:
            lru.popitem(last=False)
    return hit


def summarize(run: dict, events0: dict, events1: dict, capacity: int) -> dict:
    start, end = run["window"]
    window = [r for r in run["records"] if r.end is not None and start <= r.end < end]  # ended in the window
    hit = replay(run["records"], capacity)
    ok = [r for r in window if r.error is None and r.first is not None]

    def ttft(records: list) -> dict:
        values = [r.first - r.start for r in records]
        return {"requests": len(values), "p50_s": round(percentile(values, 50), 3) if values else None,
                "p95_s": round(percentile(values, 95), 3) if values else None}

    delta = {k: events1.get(k, 0) - events0.get(k, 0) for k in ("hit", "load", "evict", "host_hit")}
    lookups = delta["hit"] + delta["load"] + delta["host_hit"]
    seconds = end - start
    return {"window_s": round(seconds, 1), "requests": len(window), "records": len(run["records"]),
            "warm": run["all_warm"], "warmup_s": round(start - run["started"], 1), "errors": len(window) - len(ok),
            "error_samples": sorted({r.error for r in window if r.error})[:3],
            "distinct_models": len({r.model for r in window}),
            "bank_hits": delta["hit"], "bank_loads": delta["load"], "bank_evictions": delta["evict"],
            "hit_rate": round(delta["hit"] / lookups, 3) if lookups else None,
            "loads_per_s": round(delta["load"] / seconds, 2),
            "requests_per_s": round(len(ok) / seconds, 2),
            "ttft_all": ttft(ok), "ttft_hits": ttft([r for r in ok if hit[id(r)]]),
            "ttft_misses": ttft([r for r in ok if not hit[id(r)]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "e2e" / "devset.csv"),
                    help="E2E NLG dev set CSV (default: ../shared/data/e2e/devset.csv from the repo)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--prefixes", type=int, default=1000)
    ap.add_argument("--bank-prefixes", type=int, default=64, help="prefixes the bank's memory holds")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of the prefix popularity")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--duration", type=float, default=120, help="measurement window of each variant (s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--variants", default="cold,preloaded")
    ap.add_argument("--out", default=str(RESULTS / "bank_zipf_cpu.json"))
    args = ap.parse_args()
    bench_started = time.monotonic()

    home = Path(tempfile.mkdtemp(prefix="bench_bank_zipf_"))
    os.environ["PREFIXFLOW_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    env = {**os.environ, "PREFIXFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PREFIXFLOW_USAGE_DIR": str(home / "usage"), "OMP_NUM_THREADS": str(args.threads)}

    import torch

    from prefix_core import load_base_model
    from prefix_core.geometry import geometry_from_config
    from prefixflow.services.spec import PrefixSpec

    p = PrefixSpec().num_virtual_tokens
    sources = read_sources(Path(args.data))
    base, tok = load_base_model(args.base)
    one = geometry_from_config(base.config).width * p * 4  # fp32 bytes of one prefix's keys and values
    print(f"PREFIXFLOW_HOME={home}; registering {args.prefixes} prefixes (P={p}, {one} bytes each) ...", flush=True)
    setup = register_prefixes(args.prefixes, p, base, tok, sources, home)
    print(f"  registered in {setup['register_s']} s", flush=True)
    del base
    bank_mb = args.bank_prefixes * one / 2**20
    weights = [1 / (k + 1) ** args.zipf for k in range(args.prefixes)]
    top = sum(sorted(weights, reverse=True)[: args.bank_prefixes]) / sum(weights)
    rngs = [random.Random(7000 + c) for c in range(args.clients)]

    def model_of(cid: int) -> str:
        k = rngs[cid].choices(range(args.prefixes), weights)[0]
        return f"c{k:02d}/{TASK}@champion"

    def prompt_of(cid: int, n: int, model: str) -> str:
        return sources[(cid * 37 + n * 101) % len(sources)]

    results: dict = {}
    for variant in args.variants.split(","):
        preload = "0" if variant == "cold" else str(args.bank_prefixes)
        argv = [sys.executable, "-m", "prefixflow.cli", "serve", "--base", args.base, "--max-batch", "16",
                "--bank-mb", f"{bank_mb:.6f}", "--threads", str(args.threads), "--precision", args.precision,
                "--max-queued", "512", "--preload-top", preload, "--usage-flush", "5"]
        server = ServerProcess(variant, argv, env, home / f"serve-{variant}.log")
        ready_s = server.start()
        try:
            preload_s = None
            if variant != "cold":  # the window opens once the preload is done
                started = time.monotonic()
                while bank_events(server.url).get("preload", 0) < args.bank_prefixes:
                    if time.monotonic() - started > 600:
                        break
                    time.sleep(0.5)
                preload_s = round(time.monotonic() - started, 1)
            models = time_models(server.url, 20)
            events0 = bank_events(server.url)
            print(f"  {variant}: ready in {ready_s:.1f} s, preload {preload_s} s, /v1/models {models}", flush=True)
            run = asyncio.run(load_run(server.url, args.clients, model_of, prompt_of, args.max_tokens,
                                       args.duration, 600, ignore_eos=True))
            wait_idle(server.url)
            summary = summarize(run, events0, bank_events(server.url), args.bank_prefixes)
            summary.update(ready_s=round(ready_s, 1), preload_s=preload_s, models=models,
                           preloaded=bank_events(server.url).get("preload", 0))
            results[variant] = summary
            print(f"    {json.dumps(summary)}", flush=True)
        finally:
            server.stop()

    out = {"benchmark": "bank_zipf",
           "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_bank_zipf.py" + "".join(
               f" {a}" for a in sys.argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
           "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cores": os.cpu_count(), "threads": args.threads, "precision": args.precision,
           "prefixes": args.prefixes, "bank_prefixes": args.bank_prefixes, "bank_mb": round(bank_mb, 3),
           "prefix_bytes": one, "clients": args.clients, "zipf_s": args.zipf, "max_tokens": args.max_tokens,
           "share_of_requests_on_the_top_bank_prefixes": round(top, 3), "register_s": setup["register_s"],
           "results": results, "total_wall_s": round(time.monotonic() - bench_started, 1)}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
