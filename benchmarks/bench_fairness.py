"""Fair shares under a flood: client B's time to first token alone and while client A keeps 40 requests in flight
(more than the server's 16 batch rows), on `prefixflow serve` (issue: B's p95 at most 1.5x its p95 alone; before
fair shares, first come first served: 83x).

Set-up: ``prefixflow serve --base smollm2-135m --max-batch 16 --threads T`` with a keys file holding a key for client
``a`` and one for ``b`` (the server's fair share is per API key's client), the bare base (no prefix: fairness does
not depend on it), fp32 unless the CPU has native bf16 (``--precision auto``). Every request streams
``/v1/completions`` with ``temperature 0``, ``max_tokens`` 32 and ``ignore_eos`` (equal work per request), one E2E
meaning representation as its prompt. B sends ``--requests`` requests one after another: first alone, then while A
runs 40 closed-loop clients (each sends its next request when the previous one ends; B starts once A's first
requests are running and the rest queued). TTFT: request sent to its first text chunk. Variants (``--variants``):
``fair`` (the default server), ``fair-limit`` (``--client-max-running 15``: one row is always left for others).

Exact command of the reported run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_fairness.py

Results go to ``benchmarks/results/fairness.json`` (and docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_serving import Record, ServerProcess, one_request, percentile  # noqa: E402

PROMPT = ("Table: name[The Mill], eatType[coffee shop], food[French], priceRange[£20-25], area[riverside], "
          "near[The Sorrento]\nSentence:")
VARIANTS = {"fair": [], "fair-limit": ["--client-max-running", "15"]}


def add_key(keys: Path, client: str, env: dict[str, str]) -> str:
    exe = str(Path(sys.executable).with_name("prefixflow"))
    out = subprocess.run([exe, "keys", "add", "--client", client, "--file", str(keys)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


async def b_requests(url: str, key: str, n: int, max_tokens: int) -> list[Record]:
    """B's ``n`` requests, one after another."""
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=600),
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(n):
            rec = Record(1, i, "base", time.monotonic())
            await one_request(http, url, rec, PROMPT, max_tokens, ignore_eos=True)
            out.append(rec)
    return out


async def flooded(url: str, keys: dict[str, str], n: int, max_tokens: int, in_flight: int) -> tuple[list, int]:
    """B's requests while A keeps ``in_flight`` requests open; also how many of A's requests finished meanwhile."""
    import httpx

    done: list[Record] = []

    async def a_loop(http, cid: int) -> None:
        i = 0
        while True:
            rec = Record(0, i, "base", time.monotonic())
            await one_request(http, url, rec, PROMPT, max_tokens, ignore_eos=True)
            done.append(rec)
            i += 1

    limits = httpx.Limits(max_connections=in_flight + 4, max_keepalive_connections=in_flight + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30, read=1800),
                                 headers={"Authorization": f"Bearer {keys['a']}"}) as http:
        tasks = [asyncio.create_task(a_loop(http, c)) for c in range(in_flight)]
        while not queued_at_least(url, in_flight - 16):  # A's requests fill the batch and wait behind it
            await asyncio.sleep(0.2)
        b = await b_requests(url, keys["b"], n, max_tokens)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
    return b, len(done)


def queued_at_least(url: str, n: int) -> bool:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return any(line.startswith("prefixflow_queued_requests ") and float(line.split()[1]) >= n
               for line in text.splitlines())


def ttft(records: list[Record]) -> dict:
    values = [r.first - r.start for r in records if r.first is not None and r.error is None]
    return {"requests": len(records), "errors": sum(r.error is not None for r in records),
            "p50_s": round(percentile(values, 50), 4), "p95_s": round(percentile(values, 95), 4),
            "max_s": round(max(values), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=30, help="B's requests in each phase")
    ap.add_argument("--in-flight", type=int, default=40, help="A's requests kept open")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(HERE / "results" / "fairness.json"))
    args = ap.parse_args()
    import torch

    from prefixflow.launch.usage import cpu_name

    home = Path(tempfile.mkdtemp(prefix="prefixflow-bench-fair-"))
    env = {**os.environ, "PREFIXFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    keys_file = home / "keys.yaml"
    keys = {c: add_key(keys_file, c, env) for c in ("a", "b")}
    record = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "base": args.base,
              "max_batch": 16, "threads": args.threads, "in_flight": args.in_flight, "max_tokens": args.max_tokens,
              "requests": args.requests}
    exe = str(Path(sys.executable).with_name("prefixflow"))
    for name in args.variants.split(","):
        argv = [exe, "serve", "--base", args.base, "--keys", str(keys_file), "--max-batch", "16", "--threads",
                str(args.threads), "--refresh", "0", *VARIANTS[name]]
        server = ServerProcess(name, argv, env, home / f"serve-{name}.log")
        server.start()
        try:
            asyncio.run(b_requests(server.url, keys["b"], 2, args.max_tokens))  # warm-up
            alone = ttft(asyncio.run(b_requests(server.url, keys["b"], args.requests, args.max_tokens)))
            b, a_done = asyncio.run(flooded(server.url, keys, args.requests, args.max_tokens, args.in_flight))
            loaded = ttft(b)
        finally:
            server.stop()
        record[name] = {"argv": " ".join(argv[1:]), "b_alone": alone, "b_under_flood": loaded,
                        "a_finished_meanwhile": a_done, "p95_ratio": round(loaded["p95_s"] / alone["p95_s"], 2)}
        print(name, json.dumps(record[name]), flush=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
