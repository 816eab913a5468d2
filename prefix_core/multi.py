"""MultiPrefixGenerator: many prefixes, one frozen base, one forward pass.

All prefixes are folded into one bank at construction (per site ``[N, kv_heads, P_max, head_dim]``
in the base's dtype and device), padded to the longest prefix with the padding masked out. Each
batch row picks its prefix by index; real tokens of a row sit at positions ``P_row..`` (its own
prefix length), so every row computes what its prefix alone would compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .artifact import PrefixArtifact
from .attention import PrefixKV
from .model import attach, ensure_prefix_attention, prefix_positions


class MultiPrefixGenerator:
    """Generate for ``(prefix_name, prompt)`` requests; ``None`` as a name means no prefix."""

    def __init__(self, base: nn.Module, tokenizer, prefixes: Mapping[str, PrefixArtifact]) -> None:
        self.base = base
        self.tokenizer = tokenizer
        self.geometry = attach(base)
        self.artifacts = dict(prefixes)
        for art in self.artifacts.values():
            art.check_base(base)
        self._build_bank()

    def _build_bank(self) -> None:
        names = list(self.artifacts)
        self.index = {None: 0, **{name: i + 1 for i, name in enumerate(names)}}
        p_max = max([a.num_virtual_tokens for a in self.artifacts.values()] + [1])
        n = len(names) + 1
        param = next(self.base.parameters())
        keys, values = [], []
        for s in self.geometry.sites:
            keys.append(torch.zeros(n, s.kv_heads, p_max, s.head_dim, dtype=param.dtype, device=param.device))
            values.append(torch.zeros_like(keys[-1]))
        valid = torch.zeros(n, p_max, dtype=torch.bool, device=param.device)
        for name in names:
            i, art = self.index[name], self.artifacts[name]
            p = art.num_virtual_tokens
            art_keys, art_values = art.keys_values()
            for site in range(len(self.geometry.sites)):
                keys[site][i, :, :p] = art_keys[site]
                values[site][i, :, :p] = art_values[site]
            valid[i, :p] = True
        self.bank = PrefixKV(keys, values, valid)
        self.lengths = valid.sum(-1)

    def add(self, name: str, artifact: PrefixArtifact) -> None:
        """Add or replace a prefix (rebuilds the bank once)."""
        artifact.check_base(self.base)
        self.artifacts[name] = artifact
        self._build_bank()

    def render(self, name: str | None, prompt: str) -> str:
        """Apply the artifact's prompt template (``{source}``) to ``prompt``."""
        template = self.artifacts[name].prompt_template if name is not None else None
        return template.format(source=prompt) if template else prompt

    def _rows(self, names: Sequence[str | None]) -> torch.Tensor:
        unknown = sorted({str(n) for n in names if n not in self.index})
        if unknown:
            raise KeyError(f"unknown prefix {unknown}; loaded prefixes: {sorted(k for k in self.index if k)}")
        return torch.tensor([self.index[n] for n in names], device=self.bank.valid.device)

    def _inputs(self, requests: Sequence[tuple[str | None, str]], apply_template: bool) -> dict:
        names = [n for n, _ in requests]
        prompts = [self.render(n, p) if apply_template else p for n, p in requests]
        # Decoder-only prompts are left padded (generation appends on the right); encoder inputs are
        # right padded (encoders with absolute positions expect it).
        side = "right" if self.base.config.is_encoder_decoder else "left"
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side=side)
        device = self.bank.valid.device
        rows = self._rows(names)
        inputs = {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
            "prefix_kv": self.bank,
            "prefix_rows": rows,
        }
        if not self.base.config.is_encoder_decoder:
            inputs["position_ids"] = prefix_positions(inputs["attention_mask"], self.lengths[rows])
        return inputs

    @torch.no_grad()
    def forward(self, requests: Sequence[tuple[str | None, str]], apply_template: bool = False, **kwargs):
        """One forward pass over mixed-prefix rows (padded as in ``generate``). Returns the HF output and the
        attention mask, so callers can read each row's real-token logits."""
        ensure_prefix_attention(self.base)
        inputs = self._inputs(requests, apply_template)
        return self.base(**inputs, use_cache=False, **kwargs), inputs["attention_mask"]

    @torch.no_grad()
    def generate(self, requests: Sequence[tuple[str | None, str]], max_new_tokens: int = 32,
                 apply_template: bool = False, **generate_kwargs) -> list[str]:
        """Generate for every request in one batch; returns the new text of each row. HF generate
        kwargs (``do_sample``, ``num_beams``, ``temperature`` ...) pass through."""
        ensure_prefix_attention(self.base)
        inputs = self._inputs(requests, apply_template)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = self.base.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        if not self.base.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
