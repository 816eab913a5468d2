"""A fleet of many small clients through ``prefixflow fleet`` on the server stack with PostgreSQL (issue: 200
clients, all registered, no "database is locked", wall time and seconds per client).

Each client is the one of ``bench_fleet.py`` (a tiny random llama, 80 rows of its own data, P = 4, MLP 32, 10 steps
of batch 8, validation every 5), all in one fleet file (shared defaults, each client's own data). The stack
(``prefixflow stack up``: PostgreSQL, SeaweedFS, MLflow, Prefect) runs on free ports in a new state folder; the
command is ``prefixflow fleet FLEET.yaml --max-concurrent 2 --format json`` with the stack's env. Afterwards: the
registered versions, the servers' logs searched for "database is locked", and ``prefixflow usage`` totals.

Exact command of the reported run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_fleet_stack.py --clients 200

Results go to ``benchmarks/results/fleet_stack.json`` (and docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fleet import pack_sizes, tiny_model  # noqa: E402


def write_fleet_file(folder: Path, model: Path, clients: int) -> Path:
    from support.pipeline import write_task

    folder.mkdir(parents=True, exist_ok=True)
    defaults = {"task": "reverse", "base_model": str(model),
                "data": {"template": "in: {source}\nout:", "validation_fraction": 0.1, "test_fraction": 0.1,
                         "max_length": 64},
                "prefix": {"num_virtual_tokens": 4, "projection_hidden": 32},
                "train": {"max_steps": 10, "batch_size": 8, "learning_rate": 1e-2, "eval_every": 5,
                          "checkpoint_every": 5, "mixed_precision": "no"},
                "evaluate": {"metrics": ["bleu", "exact_match"], "max_new_tokens": 12}}
    entries = []
    for i in range(clients):
        write_task(folder / f"client{i:03d}.jsonl", n=80, seed=i)
        entries.append({"client": f"client{i:03d}", "data": {"source": f"client{i:03d}.jsonl"}})
    path = folder / "fleet.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, "clients": entries}, sort_keys=False))
    return path


def prefixflow(args: list[str], env: dict[str, str], timeout: float | None = None) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("prefixflow"))
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet_stack.json")
    args = ap.parse_args()
    import torch

    from prefixflow.infra.stack import stack_down, stack_up
    from prefixflow.launch.usage import cpu_name
    from support.stack_ports import stack_config_with_free_ports

    root = Path(tempfile.mkdtemp(prefix="prefixflow-bench-stack-"))
    model = tiny_model(root / "tiny-llama-64x2")
    fleet = write_fleet_file(root / "fleet", model, args.clients)
    config = stack_config_with_free_ports(root / "stack")
    t0 = time.time()
    stack_env = stack_up(config)
    up_s = time.time() - t0
    env = {**os.environ, **stack_env, "PREFIXFLOW_HOME": str(root / "state"), "HF_HUB_OFFLINE": "1",
           "COLUMNS": "200"}
    try:
        t0 = time.time()
        run = prefixflow(["fleet", str(fleet), "--max-concurrent", str(args.max_concurrent), "--format", "json"],
                         env)
        wall = time.time() - t0
        if run.returncode not in (0, 1):
            sys.exit(f"fleet failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        try:
            result = json.loads(run.stdout)
        except json.JSONDecodeError:
            sys.exit(f"fleet printed no JSON ({run.returncode}):\n{run.stdout[:3000]}\n{run.stderr[-3000:]}")
        outcomes = [e["outcome"] for e in result["entries"]]
        usage = prefixflow(["usage", "--format", "json"], env, timeout=600)
        rows = json.loads(usage.stdout) if usage.returncode == 0 else []
        sizes = pack_sizes(root / "state")
        locked = {name: (config.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
                  .count("database is locked") for name in config.services()}
    finally:
        stack_down(config.state_dir)
    record = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "clients": args.clients,
              "database": config.database, "stack_up_s": round(up_s, 1),
              "argv": f"fleet FLEET.yaml --max-concurrent {args.max_concurrent} --format json",
              "wall_s": round(wall, 1), "per_client_s": round(wall / args.clients, 2),
              "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))}, "summary": result["summary"],
              "database_is_locked": locked, "packs": len(sizes), "pack_sizes": sizes,
              "usage_versions": sum(r["versions"] for r in rows),
              "usage_train_cpu_hours": round(sum(r["train_hours"].get("cpu", 0.0) for r in rows), 4),
              "usage_tokens_trained": sum(r["tokens_trained"] for r in rows)}
    print(json.dumps(record, indent=2))
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
