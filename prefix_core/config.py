"""The two configs of prefix tuning, without torch: ``PrefixConfig`` (what a prefix is: length,
parameterization, initialization) and ``TrainConfig`` (how it is trained). Their defaults live here and only
here; the pipeline's spec takes its training defaults from ``TrainConfig``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

INIT_MODES = ("random", "zero", "text")
PRECISION_REQUESTS = ("auto", "fp32", "bf16")
PRECISION_ALIASES = {"no": "fp32"}  # training's historic spelling (accelerate's mixed_precision="no")


def normalize_precision(requested: str) -> str:
    """``auto`` / ``fp32`` / ``bf16`` (``no`` means fp32); anything else raises ValueError."""
    value = PRECISION_ALIASES.get(str(requested).lower(), str(requested).lower())
    if value not in PRECISION_REQUESTS:
        raise ValueError(f"precision must be one of auto, fp32 (or no), bf16; got {requested!r}")
    return value


@dataclass
class PrefixConfig:
    """Shape and parameterization of a prefix.

    num_virtual_tokens: P, the prefix length (virtual tokens at every attention site).
    projection_hidden: hidden width of the 2-layer reparameterization MLP used during training
        (Li & Liang); None trains the per-site K/V table directly. The MLP is folded away on export.
    projection_input: width of the MLP's input embedding; None uses the width of one layer's keys
        (kv_heads * head_dim), as PEFT does, so both train the same number of parameters.
    init: "random" (PEFT's defaults), "zero" (the prefix starts at zero keys/values) or "text"
        (keys/values of the first P tokens of ``init_text`` run through the frozen base: the paper's
        low-data trick).
    """

    num_virtual_tokens: int = 10
    projection_hidden: int | None = 512
    projection_input: int | None = None
    init: str = "random"
    init_text: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.projection_hidden is not None and self.projection_hidden < 1:
            raise ValueError(
                f"projection_hidden must be a positive integer or None (no MLP), got {self.projection_hidden!r}"
            )
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError('init="text" needs init_text: a sentence typical of the task, at least P tokens long')

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PrefixConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class TrainConfig:
    """Hyperparameters of one training run. ``batch_size`` is examples per optimizer step, over
    all processes and accumulation steps; it must divide by processes x grad_accum.

    ``mixed_precision``: ``auto`` (bf16 autocast only where the device has native bf16, else fp32;
    see :mod:`prefix_core.precision`), ``no``/``fp32`` or ``bf16``. Early stopping: after
    ``early_stopping_patience`` validations in a row that do not lower the best validation loss by
    more than ``early_stopping_min_delta`` (nats/token), training stops and the best prefix is kept.
    ``eval_max_examples``: validation uses at most this many examples (0: all), a fixed subset evenly spaced over
    the validation set, the same at every validation and in every run, so losses stay comparable."""

    max_steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_length: int = 256
    eval_every: int = 50
    eval_batch_size: int = 16
    eval_max_examples: int = 200
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    group_by_length: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.eval_max_examples < 0:
            raise ValueError(f"eval_max_examples must be >= 0 (0: all), got {self.eval_max_examples}")
        if self.early_stopping_min_delta < 0:
            raise ValueError(f"early_stopping_min_delta must be >= 0, got {self.early_stopping_min_delta}")
        try:
            normalize_precision(self.mixed_precision)
        except ValueError:
            raise ValueError(f"mixed_precision must be 'auto', 'no' (fp32) or 'bf16', got {self.mixed_precision!r}") \
                from None

    def to_dict(self) -> dict:
        return asdict(self)
