"""The pipeline run's summary as markdown: candidate, baseline and champion metrics, sample generations and a
link to the MLflow run (the ``publish_summary`` task publishes it as a Prefect artifact)."""

from __future__ import annotations

from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration, Unchanged
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.trained import TrainOutcome


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_markdown(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, report: EvalReport,
                     reg: Registration, link: str) -> str:
    systems = list(report.metrics)
    metrics = spec.evaluate.metrics
    lines = [
        f"# {spec.client}/{spec.task}: {reg.name} v{reg.version}",
        "",
        f"**Gate {'passed' if report.gate.passed else 'refused'}**: {report.gate.reason}. "
        f"Champion: v{reg.champion or '-'}, previous: v{reg.previous or '-'}.",
        "",
        "| system | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for s in systems:
        label = f"champion (v{report.champion_version})" if s == "champion" else s
        lines.append(f"| {label} | " + " | ".join(f"{report.metrics[s][m]:.2f}" for m in metrics) + " |")
    c = data.counts
    lines += [
        "",
        f"Data: {c['read']} rows read, {c['rejected']} rejected, {c['duplicates']} duplicates; train {c['train']}, "
        f"validation {c['validation']}, test {c['test']} ({report.test_sources} test sources scored); "
        f"fingerprint `{data.fingerprint[:12]}`{' (cached)' if data.reused else ''}.",
        f"Training: {trained.steps} steps, final loss {trained.final_train_loss or float('nan'):.4f}, best validation "
        f"loss {trained.best_eval_loss or float('nan'):.4f}, {trained.seconds:.0f} s"
        f"{f', resumed from step {trained.resumed_from}' if trained.resumed_from else ''}.",
        f"MLflow run: {link}",
    ]
    if report.champion_note:
        lines.append(f"Note: {report.champion_note}")
    lines += ["", "## Samples", "", "| source | reference | " + " | ".join(systems) + " |",
              "|---|---|" + "---|" * len(systems)]
    for s in report.samples[:8]:
        lines.append(f"| {_cell(s['source'])} | {_cell(s['reference'])} | "
                     + " | ".join(_cell(s[n]) for n in systems) + " |")
    return "\n".join(lines)


def unchanged_markdown(spec: PipelineSpec, data: PreparedData, unchanged: Unchanged) -> str:
    c = data.counts
    return "\n".join([
        f"# {spec.client}/{spec.task}: unchanged, champion v{unchanged.version} kept",
        "",
        f"Nothing was trained or registered: {unchanged.reason}.",
        "",
        f"Data: {c['read']} rows read; train {c['train']}, validation {c['validation']}, test {c['test']}; "
        f"fingerprint `{data.fingerprint[:12]}`{' (cached)' if data.reused else ''}.",
    ])
