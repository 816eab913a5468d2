"""PrefixEncoder: the trainable parameters of a prefix, and the flat K/V table layout.

The table is ``[P, W]`` with ``W = sum over sites of 2 * kv_heads * head_dim``; along W the order
is (site, key/value, head, dim), the same as PEFT's ``prompt_embeddings`` for decoder-only models,
so a folded table *is* a PEFT prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import PrefixKV
from .config import PrefixConfig
from .geometry import Geometry


class PrefixEncoder(nn.Module):
    """Produces the prefix table ``[P, W]``.

    Direct mode (``projection_hidden=None``): the table is the parameter. MLP mode: an embedding
    ``[P, d_in]`` through Linear(d_in, hidden) -> tanh -> Linear(hidden, W), run once over the P
    rows per step (not once per batch row). All parameters here are trainable; nothing else is.
    """

    def __init__(self, config: PrefixConfig, geometry: Geometry) -> None:
        super().__init__()
        self.config = config
        self.geometry = geometry
        p, width = config.num_virtual_tokens, geometry.width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.projection_hidden is None:
                self.table = nn.Parameter(torch.randn(p, width))
            else:
                site = geometry.sites[0]
                d_in = config.projection_input or site.kv_heads * site.head_dim
                self.embedding = nn.Parameter(torch.randn(p, d_in))
                self.mlp = nn.Sequential(
                    nn.Linear(d_in, config.projection_hidden), nn.Tanh(), nn.Linear(config.projection_hidden, width)
                )
        if config.init == "zero":
            self.set_table(torch.zeros(p, width))

    @property
    def uses_mlp(self) -> bool:
        return self.config.projection_hidden is not None

    def forward(self) -> torch.Tensor:
        if self.uses_mlp:
            return self.mlp(self.embedding)
        return self.table

    @torch.no_grad()
    def fold(self) -> torch.Tensor:
        """The table with the MLP folded away: ``[P, W]`` float32, detached."""
        return self.forward().detach().float().clone()

    @torch.no_grad()
    def set_table(self, table: torch.Tensor) -> None:
        """Make the encoder produce ``table`` ``[P, W]``. In MLP mode the last layer is solved for
        by least squares on the hidden activations (exact when projection_hidden >= P)."""
        table = table.to(torch.float32)
        if not self.uses_mlp:
            self.table.copy_(table)
            return
        hidden = torch.tanh(self.mlp[0](self.embedding)).double()  # [P, hidden]
        weight_t = torch.linalg.pinv(hidden) @ table.double()  # [hidden, W]
        self.mlp[2].weight.copy_(weight_t.T.to(self.mlp[2].weight.dtype))
        self.mlp[2].bias.zero_()


def table_to_kv(table: torch.Tensor, geometry: Geometry) -> PrefixKV:
    """Split a ``[P, W]`` table (or ``[N, P, W]`` bank) into per-site keys/values ``[N, H, P, D]``."""
    bank = table if table.dim() == 3 else table.unsqueeze(0)
    n, p, _ = bank.shape
    valid = torch.ones(n, p, dtype=torch.bool, device=bank.device)
    first = geometry.sites[0]
    if all((s.kv_heads, s.head_dim) == (first.kv_heads, first.head_dim) for s in geometry.sites):
        # One view for all sites: backward is a single stack instead of one scatter per site.
        kv = bank.view(n, p, len(geometry.sites), 2, first.kv_heads, first.head_dim).permute(2, 3, 0, 4, 1, 5)
        return PrefixKV(list(kv[:, 0].unbind(0)), list(kv[:, 1].unbind(0)), valid)
    keys, values, start = [], [], 0
    for site in geometry.sites:
        chunk = bank[..., start : start + site.width].reshape(n, p, 2, site.kv_heads, site.head_dim)
        keys.append(chunk[:, :, 0].permute(0, 2, 1, 3))
        values.append(chunk[:, :, 1].permute(0, 2, 1, 3))
        start += site.width
    return PrefixKV(keys, values, valid)


def kv_to_table(keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of table_to_kv for one prefix: per-site ``[H, P, D]`` keys/values -> ``[P, W]``."""
    cols = []
    for k, v in zip(keys, values, strict=True):
        h, p, d = k.shape
        cols.append(torch.stack([k, v], dim=0).permute(2, 0, 1, 3).reshape(p, 2 * h * d))
    return torch.cat(cols, dim=-1)
