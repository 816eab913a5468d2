"""A fleet of small clients, packed vs ``--no-pack``, in one run (issue: packed at most a quarter of ``--no-pack``'s
wall time per client).

Each client: a tiny random llama (hidden size 64, 2 layers, a local model folder with a character tokenizer), 80 rows
of its own data (a different seed each), P = 4 with an MLP of 32, 10 steps of batch 8, validation every 5, 8 test
examples. Both modes run ``prefixflow fleet FOLDER --max-concurrent 2`` as a subprocess on the embedded defaults
(ephemeral Prefect API, local MLflow), each in a new state folder; the wall time is the whole command's. The
Prefect home is shared and warmed first by a fleet of one client (a first run in a new Prefect home spends 20-30 s
creating Prefect's database: ``--cold`` measures that case, a new Prefect home per mode).

Exact command of the reported run:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_fleet.py --clients 12

Results go to ``benchmarks/results/fleet_small.json`` (and docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def tiny_model(path: Path) -> Path:
    """A random llama of hidden size 64 and 2 layers, with the tests' character tokenizer, as a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from support.tiny_models import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_specs(folder: Path, model: Path, clients: int) -> None:
    """One spec per client, each with 80 rows of its own data (the tests' reversal task, a seed each)."""
    from support.pipeline import write_task

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clients):
        data = write_task(folder.parent / f"client{i:03d}.jsonl", n=80, seed=i)
        spec = {"client": f"client{i:03d}", "task": "reverse", "base_model": str(model),
                "data": {"source": str(data), "template": "in: {source}\nout:", "validation_fraction": 0.1,
                         "test_fraction": 0.1, "max_length": 64},
                "prefix": {"num_virtual_tokens": 4, "projection_hidden": 32},
                "train": {"max_steps": 10, "batch_size": 8, "learning_rate": 1e-2, "eval_every": 5,
                          "checkpoint_every": 5, "mixed_precision": "no"},
                "evaluate": {"metrics": ["bleu", "exact_match"], "max_new_tokens": 12}}
        (folder / f"client{i:03d}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def pack_sizes(state: Path) -> list[int]:
    """Members of each pack the fleet ran under the state folder ``state`` (none: every training alone)."""
    return [len(json.loads(p.read_text())["members"]) for p in sorted((state / "packs").glob("*/pack.json"))]


def run_fleet(specs: Path, state: Path, extra: list[str], max_concurrent: int, prefect_home: Path) -> dict:
    env = {**os.environ, "PREFIXFLOW_HOME": str(state), "PREFECT_HOME": str(prefect_home),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    argv = [str(Path(sys.executable).with_name("prefixflow")), "fleet", str(specs), "--max-concurrent",
            str(max_concurrent), *extra]
    t0 = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    sizes = pack_sizes(state)
    return {"argv": " ".join(argv[1:]), "wall_s": round(wall, 1), "packs": len(sizes), "pack_sizes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="a new Prefect home per mode, not warmed")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/fleet_small[_cold].json")
    args = ap.parse_args()
    import torch

    root = Path(tempfile.mkdtemp(prefix="prefixflow-bench-fleet-"))
    model = tiny_model(root / "tiny-llama-64x2")
    write_specs(root / "specs", model, args.clients)
    if not args.cold:
        write_specs(root / "warm-up" / "specs", model, 1)
        run_fleet(root / "warm-up" / "specs", root / "warm-up" / "state", ["--no-pack"], 1, root / "prefect-home")
    record = {"prefect_home": "new per mode" if args.cold else "shared, warmed by a fleet of one client",
              "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
              "clients": args.clients}
    for mode, extra in (("no_pack", ["--no-pack"]), ("packed", [])):
        home = root / f"prefect-home-{mode}" if args.cold else root / "prefect-home"
        result = run_fleet(root / "specs", root / f"state-{mode}", extra, args.max_concurrent, home)
        result["per_client_s"] = round(result["wall_s"] / args.clients, 2)
        record[mode] = result
        print(mode, result, flush=True)
    record["packed_over_no_pack"] = round(record["packed"]["wall_s"] / record["no_pack"]["wall_s"], 3)
    print(json.dumps(record, indent=2))
    out = args.out or ROOT / "benchmarks" / "results" / f"fleet_small{'_cold' if args.cold else ''}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
