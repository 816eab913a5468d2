"""Demo-sized clients on SmolLM2-135M: their trainings packed in one job vs one job each, one after another (issue:
16 clients, at least 1.3x on CPU, and what limits it).

Each client is the demo's (``prefixflow demo``: 400 restaurant records of its own, a generated-data seed each, 40 for
validation; P = 10 with an MLP of 512, batch 8, learning rate 1e-3, validation every 5 steps, early stopping on a
plateau, ``mixed_precision: auto``: bf16 only where the CPU has it natively), at the demo's step budget unless
``--steps`` says less. Only the training is measured, through the product's launch layer (the same code
``prefixflow fleet`` runs, without Prefect, MLflow or evaluation): ``--no-pack``'s path (each training its own job:
a new interpreter, torch imported, the base loaded) for every client in turn, then the same trainings through a
:class:`~prefixflow.launch.packing.Packer` (one job, the base loaded once, each step one forward over every member's
own batch). Tokens are the tokens trained (every client's usage event, summed); wall time is all of the trainings,
launches included.

Exact command of the reported run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_fleet_smollm2.py --clients 16 --steps 10

Results go to ``benchmarks/results/fleet_smollm2.json`` (and docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fleet import pack_sizes  # noqa: E402


def client_specs(folder: Path, clients: int, steps: int, model: str) -> list:
    """The demo's spec for ``clients`` clients, each with its own generated records (seed = its number)."""
    from prefixflow.flows.demo import demo_spec
    from prefixflow.flows.demo_task import split
    from prefixflow.services.spec import parse_spec

    specs = []
    for i in range(clients):
        own = folder / f"client{i:02d}"
        spec = demo_spec(own, steps, model).model_dump(mode="json")  # writes seed 0's records under own/input
        train, val, test = split(seed=i)
        for name, rows in (("records.jsonl", train + val), ("held_out.jsonl", test)):
            with open(own / "input" / name, "w") as fh:
                fh.writelines(json.dumps({"record": e.source, "description": e.target}) + "\n" for e in rows)
        spec["client"] = f"client{i:02d}"
        specs.append(parse_spec(spec, f"client {i}"))
    return specs


def train_all(specs, data, run_key: str, packed: bool) -> tuple[float, list]:
    """Train every spec (one job each, in turn; or all in packs of up to 16); the wall time and the outcomes."""
    from prefixflow.launch.packing import Packer, pack_key, packing
    from prefixflow.launch.training import train

    t0 = time.time()
    if not packed:
        outcomes = [train(s, d, run_key) for s, d in zip(specs, data, strict=True)]
        return time.time() - t0, outcomes
    packer, outcomes = Packer(16), [None] * len(specs)

    def one(i: int) -> None:
        with packer.expecting(pack_key(specs[i])):
            outcomes[i] = train(specs[i], data[i], run_key)

    with packing(packer):  # the packer is a context variable: each thread runs in a copy of this context
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(one, i)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return time.time() - t0, outcomes


def evaluate_all(specs, data, trained) -> dict:
    """Each client's evaluation (candidate and baseline on its 20 held-out records, greedy) one after another,
    then all at once in threads, as a fleet's pipelines run them (their generations decoded together in
    mixed-prefix batches, ``eval_batching``): wall times, and whether every client's metrics are equal."""
    from prefix_core.precision import decide
    from prefixflow.services.eval_batching import POOL
    from prefixflow.services.evaluation import evaluate, shared_base

    # the base is loaded once, before either is timed (a fleet's process loads it once too)
    shared_base(specs[0].base_model, decide(specs[0].evaluate.precision, "cpu").dtype)
    t0 = time.time()
    alone = [evaluate(s, d, t, None).metrics for s, d, t in zip(specs, data, trained, strict=True)]
    alone_s, before = time.time() - t0, POOL.batches
    together: list = [None] * len(specs)

    def one(i: int) -> None:
        together[i] = evaluate(specs[i], data[i], trained[i], None).metrics

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {"alone_s": round(alone_s, 1), "together_s": round(time.time() - t0, 1),
              "mixed_batches": POOL.batches - before, "metrics_equal": alone == together}
    result["speedup"] = round(result["alone_s"] / result["together_s"], 3)
    print("evaluation", json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150, help="step budget (the demo's: 150, early stopping on)")
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluations (alone vs decoded together)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet_smollm2.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prefixflow-bench-smollm2-"))
    os.environ["PREFIXFLOW_HOME"] = str(root / "state")
    import torch

    from prefix_core import DEFAULT_MODEL
    from prefixflow.launch.usage import cpu_name
    from prefixflow.services.preparation import prepare

    specs = client_specs(root / "clients", args.clients, args.steps, args.model or DEFAULT_MODEL)
    data = [prepare(s) for s in specs]  # also converts the embedded GGUF once, before either mode is timed
    record = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "clients": args.clients,
              "step_budget": args.steps, "argv": " ".join(sys.argv[1:])}
    for mode in ("one_at_a_time", "packed"):
        wall, outcomes = train_all(specs, data, mode, packed=mode == "packed")
        tokens = sum(o.usage["tokens"] for o in outcomes)
        packs = pack_sizes(root / "state")
        if (mode == "packed") != bool(packs):
            sys.exit(f"{mode}: {len(packs)} pack(s) ran")
        record[mode] = {"packs": len(packs), "wall_s": round(wall, 1), "tokens": tokens,
                        "tokens_per_s": round(tokens / wall, 1),
                        "steps": [o.steps for o in outcomes],
                        "train_wall_s": [round(o.usage["wall_s"], 1) for o in outcomes],
                        "peak_host_mb": max(o.usage["peak_host_mb"] for o in outcomes),
                        "precision": outcomes[0].precision}
        print(mode, json.dumps(record[mode]), flush=True)
    if not args.no_eval:
        record["evaluation"] = evaluate_all(specs, data, outcomes)
    record["speedup"] = round(record["one_at_a_time"]["wall_s"] / record["packed"]["wall_s"], 3)
    record["tokens_per_s_ratio"] = round(record["packed"]["tokens_per_s"] / record["one_at_a_time"]["tokens_per_s"], 3)
    print(json.dumps(record, indent=2))
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
