"""E2E NLG quality through a sweep: `prefixflow sweep` on SmolLM2-135M-Instruct, scored with beam search on the
630 test MRs, and PEFT's prefix trained with the best setting and budget, decoded the same way.

Exact command of the reported run (2-core CPU; nothing else ran on the machine):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_e2e_sweep.py

Smoke run (a few minutes; --out elsewhere so the reported results stay):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_e2e_sweep.py --trials 2 --trial-steps 4 --eval-every 2 \
        --final-steps 6 --limit-test 8 --out /tmp/e2e_sweep_smoke.json

What runs, in order:

1. **The sweep, as a user runs it**: the script writes a pipeline spec (E2E ``devset.csv`` for training and
   validation, grouped by ``mr``; the 630 distinct ``mr`` of ``testset_w_refs.csv`` for the test, all references
   of each) into a fresh state folder and runs ``prefixflow sweep SPEC`` as a subprocess (embedded Prefect,
   local MLflow). ``--trials`` short trials of ``--trial-steps`` steps search prefix length, learning rate, the
   MLP (or none) and the initialization; the median pruner stops poor trials at a validation; the best setting
   is trained again for ``--final-steps``; evaluation decodes candidate and bare baseline with beam search
   (``--beams``), stopping at EOS or a newline, and the gate and registration follow. The reported BLEU is the
   pipeline's own (MLflow metric ``test_bleu`` of the sweep's run): sacrebleu corpus BLEU, multi-reference.
2. **PEFT with the best setting and budget**: ``PrefixTuningConfig`` with the best trial's prefix length and MLP
   (``prefix_projection`` when the trial used one; PEFT has no text initialization for prefix tuning, so a
   ``text`` setting starts from PEFT's own random init), trained on the same prepared training split with the same
   batches in the same order as our trainer, AdamW, the same learning rate, warmup and steps. Its prefix is folded
   (PEFT's own encoder run once) into a PEFT adapter without projection and read with
   ``PrefixArtifact.from_peft``, then decoded by the same beam search, stop tokens, batch size and scoring as
   the pipeline's evaluation. A check first: PEFT's own greedy decoding from ``get_prompt`` and ours from the
   folded prefix give the same text on ``--check-n`` test prompts.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
TEMPLATE = "Table: {source}\nSentence:"
RUN_KEY = "e2e-sweep"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_spec(args, home: Path) -> Path:
    """The sweep's pipeline spec, with the data's absolute paths (nothing is copied)."""
    import yaml

    data = args.data.resolve()
    spec = {
        "client": "bench", "task": "e2e", "base_model": MODEL,
        "data": {"source": str(data / "devset.csv"), "source_column": "mr", "target_column": "ref",
                 "group_column": "mr", "template": TEMPLATE, "validation_fraction": 0.1,
                 "test_source": str(data / "testset_w_refs.csv")},
        "prefix": {"num_virtual_tokens": 10, "projection_hidden": 512, "init": "random"},
        "train": {"max_steps": args.trial_steps, "batch_size": 8, "learning_rate": 5e-4, "mixed_precision": "auto",
                  "eval_every": args.eval_every, "eval_max_examples": args.eval_max_examples,
                  "checkpoint_every": max(args.eval_every, 50), "strategy": "single"},
        "evaluate": {"metrics": ["bleu", "rougeL"], "max_new_tokens": 64, "batch_size": 16,
                     "num_beams": args.beams, "length_penalty": 1.0,
                     **({"max_examples": args.limit_test} if args.limit_test else {}),
                     "gate": {"metric": "bleu", "min_gain_over_baseline": 5.0}},
        "sweep": {"trials": args.trials, "concurrent": 1, "sampler": "tpe", "pruner": "median", "startup_trials": 2,
                  "seed": 0, "final_max_steps": args.final_steps, "start_with_spec": True,
                  "space": {"prefix.num_virtual_tokens": [5, 10, 20],
                            "train.learning_rate": {"low": 2e-4, "high": 3e-3, "log": True},
                            "prefix.projection_hidden": [None, 512],
                            "prefix.init": ["random", "text"]}},
    }
    path = home / "e2e-sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_sweep(spec_path: Path, env: dict, home: Path) -> float:
    """``prefixflow sweep SPEC`` as a subprocess; its output goes to the terminal and to ``home/sweep.log``."""
    cmd = [str(Path(sys.executable).parent / "prefixflow"), "sweep", str(spec_path), "--run-key", RUN_KEY]
    log("running: " + " ".join(cmd))
    t0 = time.time()
    with open(home / "sweep.log", "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
        rc = proc.wait()
    if rc != 0:
        sys.exit(f"prefixflow sweep failed (exit {rc}); see {home / 'sweep.log'}")
    return time.time() - t0


def sweep_results(spec) -> dict:
    """Trials (optuna study), the registered version and the pipeline's evaluation metrics (MLflow)."""
    import optuna

    from prefixflow.services import registry, sweeps, tracking

    study = optuna.load_study(study_name=sweeps.study_name(spec, RUN_KEY), storage=sweeps.storage_url())
    trials = [t.model_dump() for t in sweeps.rows(study)]
    [mv] = registry.versions_for_run(spec.registered_model, RUN_KEY)
    run = tracking.client().get_run(mv.run_id)
    return {"trials": trials, "version": str(mv.version), "tags": dict(mv.tags), "run_id": mv.run_id,
            "metrics": dict(run.data.metrics), "mv": mv}


def fold_peft(peft_model, out: Path) -> Path:
    """PEFT's trained prefix as an adapter without projection: its encoder run once over the P virtual tokens."""
    import torch
    from peft import PrefixTuningConfig
    from safetensors.torch import save_file

    cfg = peft_model.peft_config["default"]
    with torch.no_grad():
        tokens = torch.arange(cfg.num_virtual_tokens)
        table = peft_model.prompt_encoder["default"](tokens[None])[0].float().contiguous()
    plain = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                               token_dim=cfg.token_dim, num_attention_heads=cfg.num_attention_heads,
                               num_layers=cfg.num_layers, num_transformer_submodules=1,
                               encoder_hidden_size=cfg.token_dim, prefix_projection=False, inference_mode=True,
                               base_model_name_or_path=cfg.base_model_name_or_path)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out))
    save_file({"prompt_embeddings": table}, out / "adapter_model.safetensors")
    return out


def decode(base, tok, artifact, sources: list[str], decoding: dict, batch: int, max_new_tokens: int) -> list[str]:
    """The pipeline evaluation's decoding of one system: the same generator, kwargs, stop ids and answer cut."""
    from prefix_core import MultiPrefixGenerator
    from prefixflow.services.evaluation import _clean

    gen = MultiPrefixGenerator(base, tok, {"p": artifact})
    out: list[str] = []
    for i in range(0, len(sources), batch):
        prompts = [("p", gen.render("p", s)) for s in sources[i : i + batch]]
        texts = gen.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False, **decoding)
        out += [_clean(t, True) for t in texts]
        if (i // batch) % 10 == 0:
            log(f"peft decode {i + len(prompts)}/{len(sources)}")
    return out


def run_peft(spec, best: dict, args, home: Path) -> dict:
    import torch
    from bench_e2e_quality import decode_new, greedy_loop, train_peft
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prefix_core import Example, PrefixArtifact, load_base_model
    from prefix_core.base_model import resolve_model_path
    from prefix_core.data import encode
    from prefixflow.services.evaluation import newline_stop_ids, test_set
    from prefixflow.services.metrics import score_all
    from prefixflow.services.preparation import prepare, read_split

    if args.threads:
        torch.set_num_threads(args.threads)
    setting = spec.with_params(best["params"]).with_params({"train.max_steps": args.final_steps})
    data = prepare(setting)  # the sweep's prepared data (same cache key): reused, not prepared again
    assert data.reused, "the sweep's prepared data should be reused"
    cfg = setting.train.train_config(setting.data.max_length)
    base, tok = load_base_model(MODEL)
    peft_base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
    peft_base.requires_grad_(False)
    hidden = setting.prefix.projection_hidden
    pcfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=setting.prefix.num_virtual_tokens,
                              prefix_projection=hidden is not None, encoder_hidden_size=hidden or 576)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(peft_base, pcfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    train = [Example(str(r["source"]), str(r["target"])) for r in read_split(data.uri, "train")]
    enc = encode(tok, train, setting.data.template, cfg.max_length)
    log(f"peft: {trainable:,} trainable parameters, {len(enc)} training rows, {cfg.max_steps} steps, lr "
        f"{cfg.learning_rate:g}, warmup {cfg.warmup_steps}, P={pcfg.num_virtual_tokens}, projection {hidden}")
    trained = train_peft(peft_model, enc, cfg, tok.pad_token_id, log_every=25, autocast=False)
    peft_model.eval()
    artifact = PrefixArtifact.from_peft(fold_peft(peft_model, home / "peft-folded"), base,
                                        prompt_template=setting.data.template)

    sources, refs = test_set(data.uri, setting.evaluate.max_examples)
    stops = newline_stop_ids(tok)
    check = sources[: args.check_n]
    prompts = [TEMPLATE.format(source=s) for s in check]
    t = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        theirs = decode_new(tok, greedy_loop(peft_model.get_base_model(), t["input_ids"], t["attention_mask"],
                                             peft_model.get_prompt(len(check)), pcfg.num_virtual_tokens, 64,
                                             stops, tok.pad_token_id))
    ours = decode(base, tok, artifact, check, {"eos_token_id": stops}, 8, 64)
    same = sum(a.split("\n", 1)[0].strip() == b for a, b in zip(theirs, ours, strict=True))
    log(f"check: PEFT's greedy loop vs our generator on PEFT's folded prefix: {same}/{len(check)} identical")

    decoding = {**setting.evaluate.decoding(), "eos_token_id": stops}
    per_system = max(1, setting.evaluate.batch_size // 2)  # the pipeline's batches hold candidate + baseline rows
    t0 = time.time()
    hyps = decode(base, tok, artifact, sources, decoding, per_system, setting.evaluate.max_new_tokens)
    seconds = time.time() - t0
    metrics = score_all(setting.evaluate.metrics, hyps, refs)
    log(f"peft: {metrics} on {len(sources)} test MRs ({seconds:.0f} s decoding)")
    return {"setting": best["params"], "config": {"num_virtual_tokens": pcfg.num_virtual_tokens,
                                                   "prefix_projection": pcfg.prefix_projection,
                                                   "encoder_hidden_size": pcfg.encoder_hidden_size,
                                                   "init": "peft random (no text init in PEFT prefix tuning)"},
            "trainable_params": trainable, "train_seconds": trained["seconds"],
            "final_train_loss": trained["final_train_loss"], "decode_seconds": seconds, "metrics": metrics,
            "greedy_check": {"prompts": len(check), "identical": same},
            "samples": [{"source": s, "peft": h} for s, h in zip(sources[:5], hyps[:5], strict=False)],
            "outputs": hyps}


def save(result: dict, args, home: Path) -> None:
    """The results as JSON, with this machine's paths out (the data dir as the docs name it, the state folder)."""
    text = json.dumps(result, indent=1, default=str)
    text = text.replace(str(args.data.resolve()), "../shared/data/e2e").replace(str(home), "STATE")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def machine() -> dict:
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--trial-steps", type=int, default=60, help="steps of each sweep trial")
    ap.add_argument("--eval-every", type=int, default=30, help="validation (and pruning) every N steps")
    ap.add_argument("--eval-max-examples", type=int, default=100, help="validation examples (a fixed subset)")
    ap.add_argument("--final-steps", type=int, default=600, help="the best setting's full training budget")
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--limit-test", type=int, default=0, help="score the first N test MRs only (0: all 630)")
    ap.add_argument("--check-n", type=int, default=16, help="test prompts of the PEFT decoding check")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the PEFT part (0: torch's default)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--peft-only", action="store_true",
                    help="the sweep already ran in --home: only train and score PEFT (sweep_seconds from the JSON "
                         "at --out, or --sweep-seconds)")
    ap.add_argument("--sweep-seconds", type=float, default=None, help="with --peft-only: the sweep's wall time")
    ap.add_argument("--home", type=Path, default=None, help="state folder (default: a new temporary one)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "e2e",
                    help="folder with devset.csv and testset_w_refs.csv (default: ../shared/data/e2e)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "e2e_sweep.json")
    args = ap.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="e2e-sweep-"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(PREFIXFLOW_HOME=str(home), PREFECT_HOME=str(home / ".prefect"))
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        os.environ.pop(var, None)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_e2e_sweep.py " + " ".join(sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    log(f"{command} (commit {commit}); state folder {home}")

    if args.peft_only:
        spec_path = home / "e2e-sweep.yaml"
        sweep_seconds = args.sweep_seconds or (json.loads(args.out.read_text())["sweep_seconds"]
                                               if args.out.is_file() else None)
    else:
        spec_path = write_spec(args, home)
        sweep_seconds = run_sweep(spec_path, dict(os.environ), home)
    if sweep_seconds:
        log(f"prefixflow sweep took {sweep_seconds / 60:.1f} min")

    from prefixflow.services.spec import load_spec

    spec = load_spec(spec_path)
    found = sweep_results(spec)
    best = next(t for t in found["trials"] if str(t["number"]) == found["tags"]["sweep.trial"])
    m = found["metrics"]
    log(f"registered v{found['version']} from trial {best['number']} {best['params']}: BLEU {m.get('test_bleu')}, "
        f"baseline {m.get('baseline_bleu')}")
    result = {"benchmark": "e2e_sweep", "command": command, "started": started, "commit": commit,
              "machine": machine(), "spec": spec.model_dump(mode="json"), "sweep_seconds": sweep_seconds,
              "trials": found["trials"], "best_trial": best["number"], "registered_version": found["version"],
              "version_tags": found["tags"], "pipeline_metrics": m}
    save(result, args, home)  # the sweep's results stay if the PEFT part is stopped
    if not args.skip_peft:
        t0 = time.time()
        result["peft"] = run_peft(spec, best, args, home)
        result["peft"]["seconds"] = time.time() - t0
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save(result, args, home)
    log(f"results in {args.out}")


if __name__ == "__main__":
    main()
