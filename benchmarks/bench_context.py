"""Context benchmark: bare-base decode tokens/s at batch B with L cached tokens per row, DecodeEngine vs transformers'
``StaticCache`` (prefilled once, then decoded token by token), same prompts, dtype and threads.

Command of the reported run (docs/benchmarks.md names the CPU)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_context.py --out benchmarks/results/context_cpu.json

Each run: B random prompts of L tokens (seeded; no EOS stops the rows: ``ignore_eos``), prefilled (not timed), then
``--tokens`` decode steps timed: tokens/s = B x steps / seconds. ``ours``: ``DecodeEngine(max_batch=B)``, the rows
admitted and prefilled (in chunks) until every row has its first token, then ``step()`` timed. ``static``:
``StaticCache(max_cache_len = L + tokens + 1)``, one prefill forward, then one forward per token with the cache
position, as ``generate`` does with a static cache (no compile). Reported: the median of ``--runs`` runs per
variant and length, and ours / static.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def ours(base, prompts: torch.Tensor, tokens: int) -> float:
    from prefix_core import DecodeEngine

    engine = DecodeEngine(base, None, max_batch=prompts.shape[0], eos_token_ids=(-1,))
    b, length = prompts.shape
    prefill_steps = b * -(-length // engine.prefill_chunk)  # rows that start early decode meanwhile
    for i, p in enumerate(prompts):
        engine.add(i, p.tolist(), max_new_tokens=tokens + prefill_steps + 2, ignore_eos=True)
    started = set()
    while len(started) < prompts.shape[0]:
        started |= {o.request_id for o in engine.step()}
    t0 = time.perf_counter()
    for _ in range(tokens):
        assert len(engine.step()) == prompts.shape[0]
    return prompts.shape[0] * tokens / (time.perf_counter() - t0)


@torch.no_grad()
def static(base, prompts: torch.Tensor, tokens: int) -> float:
    from transformers import StaticCache

    b, length = prompts.shape
    cache = StaticCache(config=base.config, max_cache_len=length + tokens + 1)
    out = base(input_ids=prompts, cache=cache, use_cache=True, cache_position=torch.arange(length))
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for i in range(tokens):
        out = base(input_ids=nxt, cache=cache, use_cache=True, cache_position=torch.tensor([length + i]))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return b * tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from prefix_core import load_base_model

    base, _ = load_base_model(args.base, dtype=torch.float32)
    vocab = base.config.vocab_size
    results = {"base": args.base, "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
               "dtype": "float32", "cpu": platform.processor() or platform.machine(),
               "capability": torch.backends.cpu.get_cpu_capability(), "lengths": {}}
    for length in args.lengths:
        runs: dict[str, list[float]] = {"ours": [], "static": []}
        for run in range(args.runs):
            prompts = torch.randint(100, vocab, (args.batch, length), generator=torch.Generator().manual_seed(run))
            for name, fn in (("ours", ours), ("static", static)):
                runs[name].append(fn(base, prompts, args.tokens))
                print(f"L={length} run {run} {name}: {runs[name][-1]:.1f} tokens/s", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        results["lengths"][str(length)] = {"runs": runs, "median": med, "ratio": med["ours"] / med["static"]}
        print(f"L={length}: ours {med['ours']:.1f}, static {med['static']:.1f}, ratio "
              f"{med['ours'] / med['static']:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
