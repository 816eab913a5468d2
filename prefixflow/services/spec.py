"""The pipeline spec: one YAML file per (client, task), and the flow's parameter model.

The same pydantic model is the Prefect flow's parameter, so the Prefect UI renders it as a form.
Names (client, task) end up in paths, bucket keys and registry names, so they are restricted to
lowercase letters, digits and inner hyphens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prefix_core.config import TrainConfig
from prefix_core.template import check_template
from prefixflow.services.errors import InputError

# Deferred imports: prefixflow.services.registry (prefix_core, torch) is deferred to a spec with prefix.init_from.

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lowercase letters, digits and inner hyphens; 1-40")]
Metric = Literal["bleu", "chrf", "rougeL", "exact_match", "accuracy"]
STRATEGIES = ("single", "ddp", "deepspeed-zero2", "deepspeed-zero3")  # how a training is launched (launch.command)
Strategy = Literal[STRATEGIES]
HANG_TIMEOUT_S = 900.0  # no output from a training for this long: it hung (train.hang_timeout_s)


def registered_model_name(client: str, task: str) -> str:
    """The MLflow registered model of (client, task): ``CLIENT-TASK``."""
    return f"{client}-{task}"


def experiment_name(client: str) -> str:
    """The MLflow experiment of a client: ``prefixflow-CLIENT``."""
    return f"prefixflow-{client}"


class SpecError(InputError, ValueError):
    """A pipeline spec is invalid; the message lists every problem and where it is. (A ValueError too, so that
    pydantic reports one raised inside a validator.)"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no unknown fields, no inf/nan numbers


class DataSpec(_Strict):
    source: str = Field(description="local path or s3:// URI (csv, jsonl, parquet), or a saved datasets folder")
    source_column: str = "source"
    target_column: str = "target"
    group_column: str | None = Field(None, description="split by this column: no group in two splits")
    template: str = Field("{source}", description="prompt template with a {source} placeholder")
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    test_source: str | None = Field(None, description="held-out test data; else split off with test_fraction")
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(256, ge=8)
    seed: int = 0

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)


class PrefixSpec(_Strict):
    num_virtual_tokens: int = Field(10, ge=1, le=512)
    projection_hidden: int | None = Field(512, ge=1)
    init: Literal["random", "zero", "text", "champion"] = Field("random", description=(
        "random; zero; text: the prefix starts as the keys/values of init_text run through the frozen base; "
        "champion: a warm start from a registered version's trainable state (init_from; random when there is none "
        "yet, or when rows it was trained on were removed from the data)"))
    init_text: str | None = Field(None, description=(
        "for init: text; default: the task's first training targets (enough for num_virtual_tokens tokens)"))
    init_from: str | None = Field(None, description=(
        "for init: champion: the version to start from, a registry reference (CLIENT/TASK@ALIAS, "
        "CLIENT/TASK/VERSION, models:/NAME@ALIAS); default: this client/task's @champion"))

    @model_validator(mode="after")
    def _init_options_match_init(self) -> PrefixSpec:
        if self.init_text and self.init != "text":
            raise ValueError(f"prefix.init_text is set but prefix.init is {self.init!r}, so it would be ignored; "
                             "set prefix.init: text or remove init_text")
        if self.init_from and self.init != "champion":
            raise ValueError(f"prefix.init_from is set but prefix.init is {self.init!r}, so it would be ignored; "
                             "set prefix.init: champion or remove init_from")
        if self.init_from:
            from prefixflow.services.registry import parse_ref  # loads prefix_core: only when a reference is given

            try:
                parse_ref(self.init_from)
            except InputError as err:
                raise ValueError(f"prefix.init_from: {err}") from None
        return self


class SlurmSpec(_Strict):
    """Where ``launcher: slurm`` runs: one ``srun`` task per machine (the flow waits on it)."""

    partition: str | None = None
    account: str | None = None
    time_limit: str | None = Field(None, description="srun --time, e.g. '24:00:00'")
    gpus_per_node: int | None = Field(None, ge=1, description="GPUs per machine; normally processes_per_machine")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for each machine's launcher and its ranks")
    extra_args: list[str] = Field(default_factory=list, description="more srun options, e.g. ['--exclusive']")

    @field_validator("extra_args")
    @classmethod
    def _options_only(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if not a.startswith("-")]
        if bad:
            raise ValueError(f"extra_args must be srun options starting with '-' (use --opt=value): {bad}")
        return value


_T = TrainConfig  # the training defaults live there, and only there


# Fields of the train section that say how a training is launched, not what it learns.
LAUNCH_FIELDS = {"strategy", "processes_per_machine", "machines", "main_address", "main_port", "hang_timeout_s",
                 "launcher", "slurm", "checkpoint_every"}


class TrainSpec(_Strict):
    """The spec's ``train`` section: the hyperparameters of ``prefix_core.TrainConfig`` that a spec may set
    (defaults from it; :meth:`train_config` maps them) and how the training is launched."""

    max_steps: int = Field(_T.max_steps, ge=1)
    batch_size: int = Field(_T.batch_size, ge=1)
    grad_accum: int = Field(_T.grad_accum, ge=1)
    learning_rate: float = Field(_T.learning_rate, gt=0)
    warmup_steps: int = Field(_T.warmup_steps, ge=0)
    mixed_precision: Literal["auto", "no", "fp32", "bf16"] = Field(
        _T.mixed_precision, description="auto: bf16 autocast only where the hardware computes bf16 natively, else "
                                        "fp32; no/fp32: always fp32; bf16: always bf16 (slow where not native)")
    gradient_checkpointing: bool = _T.gradient_checkpointing
    eval_every: int = Field(_T.eval_every, ge=0)
    eval_max_examples: int = Field(_T.eval_max_examples, ge=0, description=(
        "validate on at most this many examples (0: all): a fixed subset, the same at every validation"))
    early_stopping_patience: int = Field(_T.early_stopping_patience, ge=0, description=(
        "stop after this many validations without a significant improvement (0: never)"))
    early_stopping_min_delta: float = Field(_T.early_stopping_min_delta, ge=0, description=(
        "a validation loss must beat the best by more than this (nats/token) to count as improvement"))
    checkpoint_every: int = Field(_T.checkpoint_every, ge=0)
    seed: int = _T.seed
    strategy: Strategy = "single"
    processes_per_machine: int = Field(1, ge=1)
    machines: int = Field(1, ge=1)
    main_address: str = "127.0.0.1"
    main_port: int | None = None
    hang_timeout_s: float = HANG_TIMEOUT_S
    launcher: Literal["local", "slurm"] = Field(
        "local", description="local: on the machine running the flow; slurm: srun over train.machines nodes")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)

    def train_config(self, max_length: int) -> TrainConfig:
        """The job's ``TrainConfig``: every field of this section that TrainConfig has, the data's
        ``max_length``, and a log line about every 1/30 of the run (at most every 25 steps)."""
        shared = {name: getattr(self, name) for name in _T.__dataclass_fields__ if name in type(self).model_fields}
        return TrainConfig(**shared, max_length=max_length, log_every=max(1, min(25, self.max_steps // 30)))

    @model_validator(mode="after")
    def _slurm_options_need_slurm(self) -> TrainSpec:
        if self.launcher != "slurm" and self.slurm != SlurmSpec():
            raise ValueError("train.slurm is set but train.launcher is local, so it would be ignored; "
                             "set train.launcher: slurm or remove train.slurm")
        return self

    @model_validator(mode="after")
    def _single_is_one_process(self) -> TrainSpec:
        if self.strategy == "single" and (self.processes_per_machine != 1 or self.machines != 1):
            raise ValueError(
                f"strategy single runs one process, but processes_per_machine={self.processes_per_machine} and "
                f"machines={self.machines}; use ddp or a deepspeed strategy for several processes")
        return self


class CanaryGate(_Strict):
    share: float = Field(10.0, gt=0, lt=100, description="percent of the requests naming @champion it serves first")
    min_requests: int = Field(200, ge=1, description="canary requests after which a server makes it @champion "
                                                     "if it fails no more often (docs/serving.md)")


class GateSpec(_Strict):
    metric: Metric = "bleu"
    min_gain_over_baseline: float = 0.0
    min_gain_over_champion: float = 0.0
    canary: CanaryGate | None = Field(None, description="a passing version starts as @canary, not @champion")


class EvaluateSpec(_Strict):
    metrics: list[Metric] = Field(default_factory=lambda: ["bleu", "rougeL"], min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1, description="evaluate on the first N test sources only")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype the base is loaded in for generation: auto = bf16 only where native")
    num_beams: int = Field(1, ge=1, le=32, description="beam search width (1: greedy); the paper uses 5")
    length_penalty: float = Field(1.0, description="beam search: exponent on length (> 1 favours longer outputs)")
    no_repeat_ngram_size: int = Field(0, ge=0, description="never repeat an n-gram of this size (0: allowed)")
    gate: GateSpec = Field(default_factory=GateSpec)

    def decoding(self) -> dict:
        """HF generate kwargs of this decoding, the same for candidate, baseline and champion."""
        out: dict = {}
        if self.num_beams > 1:
            out.update(num_beams=self.num_beams, length_penalty=self.length_penalty, early_stopping=True)
        if self.no_repeat_ngram_size:
            out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return out

    @model_validator(mode="after")
    def _gate_metric_is_computed(self) -> EvaluateSpec:
        if self.gate.metric not in self.metrics:
            raise ValueError(f"gate.metric {self.gate.metric!r} must be one of the computed metrics {self.metrics}")
        return self


SEARCHABLE = {  # what a sweep may search over: "section.field" -> kind of value
    "prefix.num_virtual_tokens": "int", "prefix.projection_hidden": "int_or_none", "prefix.init": "init",
    "train.learning_rate": "float", "train.max_steps": "int", "train.warmup_steps": "int",
    "train.batch_size": "int", "train.weight_decay": "float",
}


class SearchRange(_Strict):
    """A numeric range: ``low``..``high`` (inclusive), sampled on a log scale with ``log: true``, in steps of
    ``step`` (ints only)."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a range is either log or stepped, not both")
        return self


class SweepSpec(_Strict):
    """``sweep:``: search ``space`` with ``trials`` trainings (``concurrent`` at a time) and keep the best by
    validation loss. Each key of ``space`` is one of SEARCHABLE; its value a list of choices (``null`` allowed for
    ``prefix.projection_hidden``) or a range ``{low, high, log, step}``. ``final_max_steps``: train the best
    setting again for this many steps before evaluation (shorter trials, then the full budget); unset: evaluate
    the best trial's own prefix."""

    trials: int = Field(8, ge=1, le=1000)
    concurrent: int = Field(1, ge=1, le=64, description="trials training at once (the fleet's limit applies too)")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(2, ge=0, description="trials run to the end before the pruner may stop any")
    seed: int = 0
    space: dict[str, list | SearchRange] = Field(min_length=1)
    start_with_spec: bool = Field(True, description=(
        "trial 0 uses the spec's own settings (where they lie in the space): the sweep can only improve on them"))
    final_max_steps: int | None = Field(None, ge=1)

    @field_validator("space")
    @classmethod
    def _known(cls, space: dict) -> dict:
        for key, value in space.items():
            if key not in SEARCHABLE:
                raise ValueError(f"{key!r} cannot be searched; use one of {', '.join(sorted(SEARCHABLE))}")
            kind = SEARCHABLE[key]
            if isinstance(value, list):
                if not value:
                    raise ValueError(f"{key}: give at least one choice")
                if None in value and kind != "int_or_none":
                    raise ValueError(f"{key}: null is only a choice for prefix.projection_hidden")
                if kind == "init" and set(value) - {"random", "zero", "text"}:
                    raise ValueError(f"{key}: choices are random, zero, text")
            elif kind in ("init", "int_or_none"):
                raise ValueError(f"{key}: give a list of choices, not a range")
        return space

    @model_validator(mode="after")
    def _grid_is_finite(self) -> SweepSpec:
        if self.sampler == "grid" and any(not isinstance(v, list) for v in self.space.values()):
            raise ValueError("sampler: grid needs a list of choices for every searched field")
        return self


class PipelineSpec(_Strict):
    """Everything one pipeline run needs, for one (client, task)."""

    client: Name
    task: Name
    base_model: str = "smollm2-135m"
    data: DataSpec
    prefix: PrefixSpec = Field(default_factory=PrefixSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    schedule: str | None = Field(None, description="cron schedule used by `prefixflow deploy`")
    trigger: Literal["on_new_data"] | None = Field(None, description=(
        "on_new_data: `prefixflow deploy` also runs it when new data settles in data.source or data.test_source"))
    sweep: SweepSpec | None = Field(None, description="search hyperparameters (`prefixflow sweep`)")
    retrain: Literal["always", "on_change"] | None = Field(None, description=(
        "on_change: end early (no training, no new version) when data, base model and training settings equal the "
        "champion's; always: train anyway. Default: always for `prefixflow run`, on_change for scheduled and fleet"))

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) != 5:
            raise ValueError(f"schedule {value!r} is not a 5-field cron expression, e.g. '0 3 * * 1'")
        return value

    @property
    def registered_model(self) -> str:
        """MLflow registered-model name: one per (client, task)."""
        return registered_model_name(self.client, self.task)

    @property
    def experiment(self) -> str:
        """MLflow experiment name: one per client."""
        return experiment_name(self.client)

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def with_params(self, params: dict) -> PipelineSpec:
        """This spec with ``{"section.field": value}`` set (validated again), without its sweep section."""
        data = self.model_dump(mode="json", exclude={"sweep"})
        for key, value in params.items():
            section, name = key.split(".", 1)
            data[section][name] = value
        try:
            return PipelineSpec.model_validate(data)
        except ValidationError as err:
            raise SpecError(f"the setting {params} is not a valid spec:\n{format_errors(err)}") from None

    def training_hash(self) -> str:
        """A hash of what decides the trained prefix: the base model, the data section, the prefix section and
        the training hyperparameters (not how the training is launched, nor evaluation or schedule)."""
        train = self.train.model_dump(mode="json", exclude=LAUNCH_FIELDS)
        relevant = {"base_model": self.base_model, "data": self.data.model_dump(mode="json"),
                    "prefix": self.prefix.model_dump(mode="json"), "train": train}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs for the fields)"
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{e['input']!r} is not a valid name: use lowercase letters, digits and inner hyphens (1-40)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_spec(data: dict, origin: str = "spec") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{origin} is invalid:\n{format_errors(err)}") from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read a YAML spec; relative data paths are resolved against the spec's folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping with at least client, task and data")
    return parse_spec(resolve_data_paths(data, path.parent), str(path))


def resolve_data_paths(spec: dict, folder: Path) -> dict:
    """``spec`` (a raw mapping) with its relative local data paths made absolute against ``folder``."""
    section = spec.get("data")
    for key in ("source", "test_source") if isinstance(section, dict) else ():
        value = section.get(key)
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            section[key] = str((folder / value).resolve())
    return spec


def check_fleet(specs: list[PipelineSpec]) -> None:
    """SpecError unless each (client, task) appears once: two runs of one task would race for its aliases."""
    names = [f"{s.client}/{s.task}" for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"each (client, task) may have one spec in a fleet, but {', '.join(twice)} has more "
                        "than one: give each spec its own client/task, or keep one of them")
