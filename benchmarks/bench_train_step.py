"""Training-step benchmark: prefix_core PrefixModel vs PEFT prefix tuning on the same frozen base.

One step = forward + backward + AdamW step on the prefix parameters only (the base is frozen),
batch 8 x 64 tokens of fixed random token ids (labels = the ids), P = 10 virtual tokens, MLP 512.

Exact command of the reported CPU run (2-core shared CPU; one torch thread, because another
benchmark shared the two cores and two threads per process were about 2x slower and far noisier):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train_step.py --threads 1 --steps 2 --reps 7 --warmup 1 \
        --mem-reps 3

GPU, Llama-3-8B shape with random bf16 weights built on the device (no download); reported run on
one H100 (CUDA peak memory is deterministic, so one memory subprocess per configuration):

    HF_HUB_OFFLINE=1 python benchmarks/bench_train_step.py --device cuda --model llama3-8b-random --steps 20 \
        --reps 7 --warmup 3 --mem-reps 1

Throughput: ours, PEFT and ours + gradient checkpointing live in ONE process (each on its own
base-model instance; the checkpointing figure reuses our model with checkpointing switched on) and
are timed round-robin, repetition by repetition, in a rotating order, so background load hits all
of them alike; the figure is the median tokens/s over repetitions, after warm-up.

Peak memory: each configuration runs again in a fresh subprocess that loads only its own model.
After the model, the prefix and the optimizer are built and one no-grad forward has paged in
every weight (``from_pretrained`` may leave fp32 weights memory-mapped until first use), the
peak counter is reset (CPU: ``5`` to ``/proc/self/clear_refs`` resets VmHWM; CUDA:
``torch.cuda.reset_peak_memory_stats``), then a few steps run (the first one creates gradients
and AdamW state). Reported: the peak since the reset (CPU: VmHWM, CUDA:
``torch.cuda.max_memory_allocated``) and the delta over the level at reset, each the median of
``--mem-reps`` subprocesses per configuration, run interleaved (peak RSS varies by tens of MiB
from run to run with glibc's allocator).

bf16: the base weights are loaded in torch.bfloat16 for both libraries (no autocast); the prefix
parameters and AdamW state stay float32 in both (both cast the prefix to bf16 where it is used).
bf16-autocast: fp32 weights with the forward under ``torch.autocast(bf16)``, which is what the trainer's
``mixed_precision: bf16`` (and ``auto`` where bf16 is native) runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from prefix_core.precision import cpu_bf16_native, cpu_capability, cpu_model

P, MLP_HIDDEN, LR = 10, 512, 5e-4
# bf16-autocast: fp32 weights, forward under torch.autocast(bf16): what the trainer's mixed_precision bf16 runs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}
AUTOCAST = {"bf16-autocast"}
CONFIGS = ("ours", "peft", "ours_gc")
RESULTS = Path(__file__).resolve().parent / "results"


# --- models --------------------------------------------------------------------------------------
def llama3_8b_config(layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=layers or 32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def load_base(model: str, dtype: torch.dtype, device: str, layers: int | None = None):
    """A fresh base-model instance (own config object): frozen, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    if model == "smollm2-135m":
        from prefix_core.base_model import resolve_model_path

        base = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(model), dtype=dtype, attn_implementation="sdpa"
        ).to(device)
    elif model == "llama3-8b-random":
        torch.manual_seed(0)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(llama3_8b_config(layers), dtype=dtype, attn_implementation="sdpa")
    else:
        raise SystemExit(f"unknown --model {model!r}")
    base.requires_grad_(False)
    base.eval()
    return base


def build(name: str, model: str, dtype: torch.dtype, device: str, layers: int | None = None,
          projection_input: int | None = None):
    """Returns (step_model, trainable_params, info). ``step_model(batch)`` returns the loss."""
    base = load_base(model, dtype, device, layers)
    if name in ("ours", "ours_gc"):
        from prefix_core import PrefixConfig, PrefixModel

        cfg = PrefixConfig(num_virtual_tokens=P, projection_hidden=MLP_HIDDEN, projection_input=projection_input)
        pm = PrefixModel(base, cfg)
        pm.train()
        if name == "ours_gc":
            pm.gradient_checkpointing_enable()
        params = [p for p in pm.prefix.parameters() if p.requires_grad]
        return pm, params, {}
    if name == "peft":
        from peft import PrefixTuningConfig, get_peft_model

        cfg = PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=MLP_HIDDEN
        )
        pm = get_peft_model(base, cfg)
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        return pm, params, {}
    raise ValueError(name)


def peft_gc_error(model: str, dtype: torch.dtype, device: str, layers: int | None) -> str:
    """PEFT refuses prefix tuning on a base with gradient checkpointing on: return its error."""
    from peft import PrefixTuningConfig, get_peft_model

    base = load_base(model, dtype, device, layers)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.train()
    cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=MLP_HIDDEN
    )
    try:
        get_peft_model(base, cfg)
    except Exception as err:  # the point: show that it raises
        return f"{type(err).__name__}: {err}"
    finally:
        del base
        gc.collect()
    return "no error (PEFT accepted gradient checkpointing)"


def make_batches(vocab: int, batch: int, seq: int, n: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": ids.clone().to(device),
            }
        )
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Trainer:
    def __init__(self, name, model, params, batches, device, autocast: bool = False):
        self.name, self.model, self.batches, self.device = name, model, batches, device
        self.autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast)
        self.opt = torch.optim.AdamW(params, lr=LR)
        self.i = 0
        self.last_loss = float("nan")

    def step(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.autocast:
            loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def timed(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return time.perf_counter() - t0


# --- memory (fresh subprocess per configuration) -------------------------------------------------
def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_worker(args) -> None:
    import peft  # noqa: F401  (same imports in every worker, whatever the configuration)

    import prefix_core  # noqa: F401

    dtype = DTYPES[args.dtype]
    model, params, _ = build(args.worker, args.model, dtype, args.device, args.layers, args.ours_projection_input)
    vocab = model.base.config.vocab_size if args.worker != "peft" else model.get_base_model().config.vocab_size
    batches = make_batches(vocab, args.batch, args.seq, 2, args.device)
    trainer = Trainer(args.worker, model, params, batches, args.device, args.dtype in AUTOCAST)
    with torch.no_grad():  # page in every weight (from_pretrained may leave them mmapped) in all configurations
        model(**batches[0], use_cache=False)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        level = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        level = _proc_kb("VmRSS") * 1024
    for _ in range(args.mem_steps):
        trainer.step()
    sync(args.device)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        kind = "torch.cuda.max_memory_allocated"
    else:
        peak = _proc_kb("VmHWM") * 1024
        kind = "VmHWM (peak RSS)"
    print(json.dumps({"peak_bytes": peak, "level_at_reset_bytes": level, "kind": kind,
                      "loss": float(trainer.last_loss)}))


def measure_memory(args, name: str, dtype_name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--dtype", dtype_name, "--model", args.model,
           "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
           "--mem-steps", str(args.mem_steps)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.ours_projection_input:
        cmd += ["--ours-projection-input", str(args.ours_projection_input)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["peak_mib"] = res["peak_bytes"] / 2**20
    res["delta_mib"] = (res["peak_bytes"] - res["level_at_reset_bytes"]) / 2**20
    return res


# --- throughput (one process, interleaved) -------------------------------------------------------
def measure_throughput(args, dtype: torch.dtype, autocast: bool) -> dict:
    tokens = args.batch * args.seq
    ours, ours_params, _ = build("ours", args.model, dtype, args.device, args.layers, args.ours_projection_input)
    peft_model, peft_params, _ = build("peft", args.model, dtype, args.device, args.layers)
    vocab = ours.base.config.vocab_size
    batches = make_batches(vocab, args.batch, args.seq, 4, args.device)
    trainers = {
        "ours": Trainer("ours", ours, ours_params, batches, args.device, autocast),
        "peft": Trainer("peft", peft_model, peft_params, batches, args.device, autocast),
    }
    # ours_gc: the same PrefixModel and optimizer with checkpointing switched on around its timing.
    trainers["ours_gc"] = trainers["ours"]

    def run(name: str, steps: int) -> float:
        if name == "ours_gc":
            ours.gradient_checkpointing_enable()
        try:
            return trainers[name].timed(steps)
        finally:
            if name == "ours_gc":
                ours.gradient_checkpointing_disable()

    # Same starting loss on the same batch (the prefixes differ: both are randomly initialized).
    with torch.no_grad():
        loss0 = {"ours": float(ours(**batches[0]).loss), "peft": float(peft_model(**batches[0]).loss)}
    for name in CONFIGS:
        run(name, args.warmup)
    times: dict[str, list[float]] = {n: [] for n in CONFIGS}
    for rep in range(args.reps):
        order = CONFIGS[rep % 3:] + CONFIGS[: rep % 3]
        for name in order:
            times[name].append(run(name, args.steps))
        print(f"  rep {rep + 1}/{args.reps}: " + "  ".join(
            f"{n} {tokens * args.steps / times[n][-1]:.0f} tok/s" for n in CONFIGS), flush=True)
    out = {
        "trainable_params": {"ours": sum(p.numel() for p in ours_params),
                             "peft": sum(p.numel() for p in peft_params)},
        "initial_loss_batch0": loss0,
        "throughput": {},
    }
    for name in CONFIGS:
        per_rep = [tokens * args.steps / t for t in times[name]]
        out["throughput"][name] = {
            "tokens_per_s_median": statistics.median(per_rep),
            "tokens_per_s_reps": per_rep,
            "step_s_median": statistics.median(times[name]) / args.steps,
        }
    return out


def bench_dtype(args, dtype_name: str) -> dict:
    dtype = DTYPES[dtype_name]
    print(f"\n[{dtype_name}] building models on {args.device} ...", flush=True)
    out = measure_throughput(args, dtype, dtype_name in AUTOCAST)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    out["peft_gradient_checkpointing"] = peft_gc_error(args.model, dtype, args.device, args.layers)
    runs: dict[str, list[dict]] = {n: [] for n in CONFIGS}
    for rep in range(args.mem_reps):  # interleaved too: ours, peft, ours_gc, then rotated
        for name in CONFIGS[rep % 3:] + CONFIGS[: rep % 3]:
            print(f"  memory subprocess {rep + 1}/{args.mem_reps}: {name} ...", flush=True)
            runs[name].append(measure_memory(args, name, dtype_name))
    out["memory"] = {}
    for name in CONFIGS:
        ok = [r for r in runs[name] if "peak_bytes" in r]
        if not ok:
            out["memory"][name] = runs[name][0]
            continue
        out["memory"][name] = {
            "kind": ok[0]["kind"],
            "peak_bytes": statistics.median(r["peak_bytes"] for r in ok),
            "peak_mib": statistics.median(r["peak_mib"] for r in ok),
            "delta_mib": statistics.median(r["delta_mib"] for r in ok),
            "peak_mib_runs": [r["peak_mib"] for r in ok],
            "delta_mib_runs": [r["delta_mib"] for r in ok],
            "level_at_reset_mib_runs": [r["level_at_reset_bytes"] / 2**20 for r in ok],
        }
    tp, mem = out["throughput"], out["memory"]
    out["ratios"] = {
        "ours_over_peft_tokens_per_s": tp["ours"]["tokens_per_s_median"] / tp["peft"]["tokens_per_s_median"],
        "ours_gc_over_peft_tokens_per_s": tp["ours_gc"]["tokens_per_s_median"] / tp["peft"]["tokens_per_s_median"],
    }
    if all("peak_bytes" in mem[n] for n in CONFIGS):
        out["ratios"]["ours_over_peft_peak"] = mem["ours"]["peak_bytes"] / mem["peft"]["peak_bytes"]
        out["ratios"]["ours_over_peft_delta"] = mem["ours"]["delta_mib"] / mem["peft"]["delta_mib"]
        out["ratios"]["ours_gc_over_peft_delta"] = mem["ours_gc"]["delta_mib"] / mem["peft"]["delta_mib"]
        out["targets"] = {
            "tokens_per_s_ratio_ge_1": out["ratios"]["ours_over_peft_tokens_per_s"] >= 1.0,
            "peak_memory_not_higher": mem["ours"]["peak_bytes"] <= mem["peft"]["peak_bytes"],
        }
    return out


def print_table(results: dict) -> None:
    print(f"\n{'dtype':5} {'config':8} {'tok/s (median)':>15} {'step s':>8} {'peak MiB':>10} {'delta MiB':>10}")
    for dtype_name, r in results["by_dtype"].items():
        for name in CONFIGS:
            tp, mem = r["throughput"][name], r["memory"][name]
            peak = f"{mem['peak_mib']:.0f}" if "peak_mib" in mem else "error"
            delta = f"{mem['delta_mib']:.0f}" if "delta_mib" in mem else "error"
            print(f"{dtype_name:5} {name:8} {tp['tokens_per_s_median']:15.1f} {tp['step_s_median']:8.3f} "
                  f"{peak:>10} {delta:>10}")
        ratios = "  ".join(f"{k}={v:.3f}" for k, v in r["ratios"].items())
        print(f"      ratios: {ratios}")
        print(f"      targets: {r.get('targets')}")
        print(f"      PEFT + gradient checkpointing: {r['peft_gradient_checkpointing'][:160]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama3-8b-random"])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,bf16-autocast (default: fp32,bf16; "
                                                   "bf16 only for the 8B)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition and configuration")
    ap.add_argument("--reps", type=int, default=7, help="repetitions (interleaved round-robin)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per configuration")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps run in each memory subprocess")
    ap.add_argument("--mem-reps", type=int, default=3, help="fresh subprocesses per configuration (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--ours-projection-input", type=int, default=None,
                    help="our MLP input width (default: the model's hidden size; PEFT uses kv_heads * head_dim)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests only)")
    ap.add_argument("--out", default=str(RESULTS / "train_step.json"))
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        memory_worker(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if args.model == "llama3-8b-random" else
                                                          ["fp32", "bf16"])
    import peft
    import transformers

    results = {
        "benchmark": "train_step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else
        f"{cpu_model()} x{os.cpu_count()} ({cpu_capability()}, bf16 {'native' if cpu_bf16_native() else 'not native'})",
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "setup": {"batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
                  "num_virtual_tokens": P, "projection_hidden": MLP_HIDDEN,
                  "ours_projection_input": args.ours_projection_input or "hidden_size (PrefixConfig default)",
                  "optimizer": f"AdamW lr={LR}",
                  "steps_per_rep": args.steps, "reps": args.reps, "warmup_steps": args.warmup,
                  "mem_steps": args.mem_steps, "mem_reps": args.mem_reps, "layers_override": args.layers,
                  "bf16": "base weights loaded in torch.bfloat16, no autocast; prefix params + AdamW state fp32",
                  "timing": "one process, round-robin per repetition (rotating order), median over reps",
                  "memory": "fresh subprocess per configuration, peak counter reset after model+optimizer build"},
        "by_dtype": {},
    }
    for dtype_name in dtypes:
        results["by_dtype"][dtype_name] = bench_dtype(args, dtype_name)
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
