"""evaluate_prefix: generate on the test split with the candidate prefix, the bare base model (the
baseline: same template, no prefix) and the current champion if there is one, all in one mixed-prefix
batch per step (with the rows of the other evaluations running in this process: eval_batching); score them;
decide the gate; log metrics, a sample table and the loss curve to MLflow. A warm-started candidate is also
scored, beside the version it started from, on that version's own test set (logged with its run), so forgetting
shows (``warm_start_test`` in the report, the gate's reason, metrics and version tags).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from pydantic import BaseModel

from prefixflow.services import lineage, registry, tracking
from prefixflow.services.eval_batching import POOL
from prefixflow.services.metrics import score_all
from prefixflow.services.preparation import PreparedData, read_split
from prefixflow.services.spec import GateSpec, PipelineSpec
from prefixflow.services.trained import TrainOutcome

# Deferred imports: prefix_core (torch), transformers, matplotlib and services.warm_start (prefix_core) are deferred
# to the functions that use them.

SYSTEMS = ("candidate", "baseline", "champion")
SHARED_BASES = 2  # base models kept loaded for the evaluations of one process (the most recently used)
log = logging.getLogger(__name__)
_bases: OrderedDict[tuple, tuple] = OrderedDict()
_bases_lock = threading.Lock()


def _stamp(name: str) -> float | None:
    """When a local model folder last changed (None for a name that is not a folder)."""
    folder = Path(name)
    return max((f.stat().st_mtime for f in folder.iterdir()), default=None) if folder.is_dir() else None


def shared_base(name: str, dtype) -> tuple:
    """``(base, tokenizer)`` for evaluation, loaded once per process and shared by the evaluations that run in it
    at once (a fleet's pipelines are threads of one process): one copy of the weights, not one per client. Safe to
    share: the base is frozen and in eval mode, and evaluation never changes it (prefixes travel as forward
    arguments). The ``SHARED_BASES`` most recently used stay loaded; a local folder changed since it was loaded is
    loaded again."""
    from prefix_core import load_base_model

    key = (name, str(dtype), _stamp(name))
    with _bases_lock:
        if key in _bases:
            _bases.move_to_end(key)
        else:
            _bases[key] = load_base_model(name, dtype=dtype)
            while len(_bases) > SHARED_BASES:
                _bases.popitem(last=False)
        return _bases[key]


class GateDecision(BaseModel):
    metric: str
    passed: bool
    reason: str


class EvalReport(BaseModel):
    """Scores per system (``candidate``, ``baseline``, ``champion`` when one exists), the gate, samples."""

    metrics: dict[str, dict[str, float]]
    champion_version: str | None
    champion_note: str | None
    gate: GateDecision
    samples: list[dict]
    test_sources: int
    seconds: float
    precision: dict | None = None  # prefix_core.precision.Precision.to_dict(): the base's dtype for generation
    # a warm-started candidate on the test set of the version it started from: {"version": "NAME vN",
    # "test_sources": N, "metrics": {"candidate": {...}, "started_from": {...}}}
    warm_start_test: dict | None = None


def decide_gate(gate: GateSpec, metrics: dict[str, dict[str, float]]) -> GateDecision:
    """Pass when the candidate beats the baseline and the champion (if any) by the required margins."""
    m = gate.metric
    cand, base = metrics["candidate"][m], metrics["baseline"][m]
    reasons, passed = [f"{m} {cand:.2f} vs baseline {base:.2f} (needs +{gate.min_gain_over_baseline:g})"], True
    if cand - base < gate.min_gain_over_baseline:
        passed = False
    if "champion" in metrics:
        champ = metrics["champion"][m]
        reasons.append(f"vs champion {champ:.2f} (needs +{gate.min_gain_over_champion:g})")
        if cand - champ < gate.min_gain_over_champion:
            passed = False
    return GateDecision(metric=m, passed=passed, reason=", ".join(reasons))


def test_set(data_uri: str, limit: int | None) -> tuple[list[str], list[list[str]]]:
    """Distinct test sources (in order) and all references of each, of the prepared data's test split."""
    return references(read_split(data_uri, "test"), limit)


def references(rows: list[dict], limit: int | None) -> tuple[list[str], list[list[str]]]:
    """Distinct sources of ``rows`` (in order, the first ``limit``) and all references of each."""
    refs: dict[str, list[str]] = {}
    for row in rows:
        refs.setdefault(row["source"], []).append(row["target"])
    sources = list(refs)[:limit] if limit else list(refs)
    return sources, [refs[s] for s in sources]


def _clean(text: str, single_line: bool) -> str:
    """The system's answer: for single-line tasks the text before its first newline, stripped (decoding stops
    there, see :func:`newline_stop_ids`); else the whole text, stripped."""
    return text.split("\n", 1)[0].strip() if single_line else text.strip()


def newline_stop_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains a newline. Decoding a single-line task stops at either: greedy
    gives the same answer as decoding on and cutting at the first newline, only sooner (the bare model
    rarely emits EOS), and beam search ranks finished one-line answers instead of runs past the line."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = {i for i, text in enumerate(texts) if "\n" in text}
    return sorted(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def generate_all(base, tokenizer, prefixes: dict, template: str, sources: list[str], batch_size: int,
                 max_new_tokens: int, single_line: bool, decoding: dict | None = None,
                 systems: tuple[str, ...] = SYSTEMS) -> dict[str, list[str]]:
    """Generations of each system for every source: ``{system: [text, ...]}``, greedy or with the beam search
    of ``decoding`` (HF generate kwargs: ``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``), the same
    decoding for every system. Systems are mixed in one batch (the baseline is the ``None`` prefix), and with the
    requests of other evaluations running in this process at the same time (``eval_batching.POOL``); each row
    computes what it would alone. ``single_line``: answers end at the first newline (decoding stops there)."""
    systems = [n for n in systems if n == "baseline" or n in prefixes]
    requests = [(name, s) for s in sources for name in systems]
    prompts = [(None if n == "baseline" else n, _render(prefixes[n] if n != "baseline" else None, template, s))
               for n, s in requests]
    decoding = dict(decoding or {})
    if single_line:
        decoding.setdefault("eos_token_id", newline_stop_ids(tokenizer))
    texts = POOL.generate(base, tokenizer, prefixes, prompts, batch_size, max_new_tokens, decoding)
    out = {n: [] for n in systems}
    for (name, _), text in zip(requests, texts, strict=True):
        out[name].append(_clean(text, single_line))
    return out


def _render(artifact, template: str, source: str) -> str:
    """A prompt as its system sees it: the baseline (``artifact`` None) through the spec's template, a prefix
    through its own (the one it was trained with; none: the bare source), as ``MultiPrefixGenerator.render``."""
    if artifact is None:
        return template.format(source=source)
    return artifact.prompt_template.format(source=source) if artifact.prompt_template else source


def loss_curve(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], label="train")
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="prefix training")
    ax.legend()
    fig.tight_layout()
    return fig


def evaluate(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, mlflow_run_id: str | None) -> EvalReport:
    """Evaluate the run's candidate against the baseline and the champion (see the module docstring); its
    generations are decoded together with those of the evaluations running beside it (``eval_batching``)."""
    with POOL.evaluating():
        return _evaluate(spec, data, trained, mlflow_run_id)


def _evaluate(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, mlflow_run_id: str | None) -> EvalReport:
    from transformers.utils import logging as hf_logging

    from prefix_core import BaseModelMismatchError, PrefixArtifact
    from prefix_core.precision import decide

    hf_logging.disable_progress_bar()
    t0 = time.time()
    sources, refs = test_set(data.uri, spec.evaluate.max_examples)
    precision = decide(spec.evaluate.precision, "cpu")
    if precision.warning:
        log.warning(precision.warning)
    log.info("evaluation precision: %s", precision.reason)
    base, tokenizer = shared_base(spec.base_model, precision.dtype)
    prefixes = {"candidate": PrefixArtifact.load(trained.artifact_uri)}
    champion, note = registry.aliased(spec.registered_model, "champion"), None
    champion_version = None if champion is None else str(champion.version)
    if champion is not None:
        champ = PrefixArtifact.load(registry.download_version(champion))
        try:
            champ.check_base(base)
            prefixes["champion"] = champ
        except BaseModelMismatchError as err:
            note = f"champion v{champion_version} not compared: {err}"
            log.warning(note)
    single_line = not any("\n" in r for rs in refs for r in rs)
    outputs = generate_all(base, tokenizer, prefixes, spec.data.template, sources, spec.evaluate.batch_size,
                           spec.evaluate.max_new_tokens, single_line, spec.evaluate.decoding())
    metrics = {name: score_all(spec.evaluate.metrics, hyps, refs) for name, hyps in outputs.items()}
    gate = decide_gate(spec.evaluate.gate, metrics)
    samples = [{"source": s, "reference": r[0], **{n: outputs[n][i] for n in outputs}}
               for i, (s, r) in enumerate(zip(sources, refs, strict=True))]
    compared = champion_version if "champion" in prefixes else None
    old_test = _on_started_from_test(spec, trained, base, tokenizer, prefixes["candidate"],
                                     (sources, metrics, compared))
    if old_test is not None:
        m, ms = spec.evaluate.gate.metric, old_test["metrics"]
        gate.reason += (f"; on {old_test['version']}'s own test set: {m} {ms['candidate'][m]:.2f} vs "
                        f"{ms['started_from'][m]:.2f} for {old_test['version']}")
    report = EvalReport(metrics=metrics, champion_version=compared, champion_note=note, gate=gate,
                        samples=samples[:20], test_sources=len(sources), seconds=time.time() - t0,
                        precision=precision.to_dict(), warm_start_test=old_test)
    if mlflow_run_id:
        _log(mlflow_run_id, report, samples, trained)
    return report


def _on_started_from_test(spec: PipelineSpec, trained: TrainOutcome, base, tokenizer, candidate, main: tuple
                          ) -> dict | None:
    """A warm-started candidate and the version it started from, scored on that version's own test set (None for
    a cold start, or a version that logged no test set). ``main``: (sources, metrics, champion version compared)
    of the main evaluation, reused when it already was this comparison."""
    from prefix_core import PrefixArtifact
    from prefixflow.services.warm_start import FOLDER

    warm = trained.warm_start or {}
    folder = Path(trained.run_dir) / FOLDER
    if not warm.get("version") or warm.get("cold") or not warm.get("run_id") or not (folder / "manifest.json").exists():
        return None
    rows = lineage.logged_test_split(warm["run_id"])
    if not rows:
        log.warning("%s v%s logged no test set: the candidate is not scored on it", warm["name"], warm["version"])
        return None
    label = f"{warm['name']} v{warm['version']}"
    sources, refs = references(rows, spec.evaluate.max_examples)
    main_sources, main_metrics, compared = main
    if sources == main_sources and compared == warm["version"]:  # the main comparison already is this one
        metrics = {"candidate": main_metrics["candidate"], "started_from": main_metrics["champion"]}
    else:
        single_line = not any("\n" in r for rs in refs for r in rs)
        outputs = generate_all(base, tokenizer, {"candidate": candidate, "champion": PrefixArtifact.load(folder)},
                               spec.data.template, sources, spec.evaluate.batch_size, spec.evaluate.max_new_tokens,
                               single_line, spec.evaluate.decoding(), systems=("candidate", "champion"))
        metrics = {"candidate": score_all(spec.evaluate.metrics, outputs["candidate"], refs),
                   "started_from": score_all(spec.evaluate.metrics, outputs["champion"], refs)}
    return {"version": label, "test_sources": len(sources), "metrics": metrics}


def _log(run_id: str, report: EvalReport, samples: list[dict], trained: TrainOutcome) -> None:
    import matplotlib.pyplot as plt

    c = tracking.client()
    if report.precision:
        tracking.log_params(run_id, {"evaluate.precision_used": report.precision["mode"],
                                     "evaluate.precision_reason": report.precision["reason"]})
    tracking.log_metrics(run_id, {f"{'test' if n == 'candidate' else n}_{m}": v
                                  for n, ms in report.metrics.items() for m, v in ms.items()})
    if report.warm_start_test:
        tracking.log_metrics(run_id, {f"warm_start_test_{n}_{m}": v
                                      for n, ms in report.warm_start_test["metrics"].items() for m, v in ms.items()})
    c.log_table(run_id, data={k: [s[k] for s in samples] for k in samples[0]}, artifact_file="eval/samples.json")
    c.log_dict(run_id, report.model_dump(mode="json", exclude={"samples"}), "eval/report.json")
    history = json.loads(Path(trained.history_uri).read_text()) if trained.history_uri else []
    if history:
        fig = loss_curve(history)
        c.log_figure(run_id, fig, "eval/loss_curve.png")
        plt.close(fig)
    c.set_tag(run_id, "gate", "passed" if report.gate.passed else "refused")
