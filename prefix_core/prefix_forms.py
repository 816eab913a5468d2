"""Every form a caller may give a prefix in, folded to per-site keys/values ``[kv_heads, P, head_dim]``."""

from __future__ import annotations

import torch
from torch import nn

from .artifact import PrefixArtifact
from .attention import PrefixKV
from .encoder import table_to_kv
from .geometry import Geometry
from .model import PrefixModel


def fold_prefix(prefix, base: nn.Module, geometry: Geometry, dtype: torch.dtype, device: torch.device
                ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Any accepted prefix form -> per-layer keys/values ``[kv_heads, P, head_dim]`` in the base dtype/device."""
    if prefix is None:
        return None, None
    if isinstance(prefix, PrefixModel):
        prefix = prefix.prefix_kv()
    if isinstance(prefix, PrefixArtifact):
        prefix.check_base(base)
        keys, values = prefix.keys_values()
    elif isinstance(prefix, PrefixKV):
        if prefix.valid.shape[0] != 1:
            raise ValueError(f"a PrefixKV prefix must hold one prefix, this one holds {prefix.valid.shape[0]}")
        p = int(prefix.valid[0].sum())
        if not bool(prefix.valid[0, :p].all()):
            raise ValueError("a PrefixKV prefix must have its padding at the end")
        keys = [k[0, :, :p] for k in prefix.keys]
        values = [v[0, :, :p] for v in prefix.values]
    elif isinstance(prefix, torch.Tensor):
        if prefix.dim() != 2 or prefix.shape[1] != geometry.width:
            raise ValueError(f"a prefix table must be [P, {geometry.width}] for "
                             f"{geometry.describe()}, got {tuple(prefix.shape)}")
        kv = table_to_kv(prefix, geometry)
        keys, values = [k[0] for k in kv.keys], [v[0] for v in kv.values]
    elif isinstance(prefix, (tuple, list)) and len(prefix) == 2:
        keys, values = list(prefix[0]), list(prefix[1])
    else:
        raise TypeError(f"unsupported prefix {type(prefix).__name__}: give a PrefixArtifact, a PrefixKV, "
                        "(keys, values), a [P, W] table or a PrefixModel")
    sites = geometry.sites
    if len(keys) != len(sites) or len(values) != len(sites):
        raise ValueError(f"the prefix has {len(keys)} sites, {geometry.describe()} has {len(sites)}")
    p = keys[0].shape[-2]
    for site, k, v in zip(sites, keys, values, strict=True):
        want = (site.kv_heads, p, site.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"prefix site {site.name}: keys {tuple(k.shape)} / values {tuple(v.shape)}, "
                             f"expected {want}")
    if p == 0:
        return None, None
    cast = {"dtype": dtype, "device": device}
    return [k.detach().to(**cast) for k in keys], [v.detach().to(**cast) for v in values]
