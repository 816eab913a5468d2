"""Chunked-prefill benchmark: while a long prompt is prefilled, how long do the running streams wait between tokens?

Command of the reported run (docs/benchmarks.md names the CPU)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_chunked_prefill.py \
        --out benchmarks/results/chunked_prefill_cpu.json

Set-up: ``DecodeEngine(max_batch=16)`` over the bare base (fp32, ``--threads``); 15 rows with short random prompts
decode without end (``ignore_eos``). After ``--warm`` steps, one request with a ``--long``-token prompt arrives.
Every running row gets one token per step, so the gap between two tokens of a stream is the step's wall time.
The KV memory is grown to its size first (a server's grows once, early; that one copy is not a prefill cost).
Reported per ``prefill_chunk``: the median gap while only decoding (before the long prompt came), the median over
the whole window (before and while it was prefilled), the longest gap while it was prefilled, its ratio to
each (target: at most 3), the steps and seconds the prefill took. ``--chunks`` lists the settings; one of them as
long as the prompt is prefill without chunking.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def run(base, chunk: int, long: int, warm: int, seed: int) -> dict:
    from prefix_core import DecodeEngine

    gen = torch.Generator().manual_seed(seed)
    vocab = base.config.vocab_size
    engine = DecodeEngine(base, None, max_batch=16, prefill_chunk=chunk, eos_token_ids=(-1,))
    engine.cache.reserve(long + 4)  # a server's KV memory has grown to its size long before (once, by doubling)
    for i in range(15):
        engine.add(f"s{i}", torch.randint(100, vocab, (20,), generator=gen).tolist(), max_new_tokens=400,
                   ignore_eos=True)
    while len(engine.active_ids) < 15 or any(engine.scheduler.find(f"s{i}").prefilling for i in range(15)):
        engine.step()
    gaps_before, gaps_during = [], []
    for _ in range(warm):
        t0 = time.perf_counter()
        engine.step()
        gaps_before.append(time.perf_counter() - t0)
    engine.add("long", torch.randint(100, vocab, (long,), generator=gen).tolist(), max_new_tokens=4, ignore_eos=True)
    while True:
        t0 = time.perf_counter()
        out = engine.step()
        gaps_during.append(time.perf_counter() - t0)
        assert sum(o.request_id != "long" for o in out) == 15  # every stream got its token this step
        if any(o.request_id == "long" for o in out):
            break
    decoding, median = statistics.median(gaps_before), statistics.median(gaps_before + gaps_during)
    return {"chunk": chunk, "decode_gap_s": decoding, "median_gap_s": median, "max_gap_s": max(gaps_during),
            "ratio_to_decode": max(gaps_during) / decoding, "ratio": max(gaps_during) / median,
            "prefill_steps": len(gaps_during), "prefill_s": sum(gaps_during)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--long", type=int, default=2000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256, 2000])
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from prefix_core import load_base_model

    base, _ = load_base_model(args.base, dtype=torch.float32)
    results = {"base": args.base, "long": args.long, "threads": args.threads, "dtype": "float32",
               "cpu": platform.processor() or platform.machine(),
               "capability": torch.backends.cpu.get_cpu_capability(), "chunks": {}}
    for chunk in args.chunks:
        runs = [run(base, chunk, args.long, args.warm, seed) for seed in range(args.runs)]
        for r in runs:
            print(json.dumps(r), flush=True)
        results["chunks"][str(chunk)] = {
            "runs": runs, "median_ratio": statistics.median(r["ratio"] for r in runs),
            "median_ratio_to_decode": statistics.median(r["ratio_to_decode"] for r in runs)}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
