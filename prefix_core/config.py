"""PrefixConfig: what a prefix is (length, parameterization, initialization)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

INIT_MODES = ("random", "zero", "text")


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
