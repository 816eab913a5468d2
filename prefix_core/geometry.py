"""Where a prefix attaches in a model: its attention *sites* and their shapes.

A site is one attention module that receives prefix keys/values: decoder self-attention in a
decoder-only model; encoder self-attention, decoder self-attention and cross-attention in an
encoder-decoder model (the three prefixes of Li & Liang). Head counts and head sizes are read
from the model config (standard attribute names, so GPT-2's ``n_head`` or BART's
``encoder_attention_heads`` work through transformers' attribute maps), never from model names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn
from transformers import PretrainedConfig

from .errors import UnsupportedModelError

SITE_KINDS = ("decoder", "encoder", "cross")
_CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attn", "cross_attention")


@dataclass(frozen=True)
class Site:
    """One prefixed attention module. ``kind`` is decoder|encoder|cross; keys/values are
    ``[kv_heads, P, head_dim]`` per site."""

    kind: str
    layer: int
    kv_heads: int
    head_dim: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def width(self) -> int:
        """Number of prefix values per virtual token at this site (keys and values)."""
        return 2 * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Geometry:
    """All sites of a model, in table order: decoder sites first (layer order), then encoder,
    then cross. ``hidden_size`` is the model width."""

    model_type: str
    is_encoder_decoder: bool
    hidden_size: int
    sites: tuple[Site, ...]

    @property
    def width(self) -> int:
        return sum(s.width for s in self.sites)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sites"] = [asdict(s) for s in self.sites]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            model_type=d["model_type"],
            is_encoder_decoder=d["is_encoder_decoder"],
            hidden_size=d["hidden_size"],
            sites=tuple(Site(**s) for s in d["sites"]),
        )

    def describe(self) -> str:
        kinds = {k: [s for s in self.sites if s.kind == k] for k in SITE_KINDS}
        parts = [
            f"{len(v)} {k} layers x {v[0].kv_heads} kv heads x {v[0].head_dim} dims"
            for k, v in kinds.items()
            if v
        ]
        return f"{self.model_type} ({'; '.join(parts)})"


def _need(config: PretrainedConfig, *names: str) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    raise UnsupportedModelError(
        f"{type(config).__name__} has none of the attributes {names}; prefix_core needs them to "
        "size the prefix. Pass a model whose config defines its layer count and attention heads."
    )


def _heads(config: PretrainedConfig, heads_attr: tuple[str, ...]) -> tuple[int, int]:
    heads = _need(config, *heads_attr)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or _need(config, "hidden_size", "d_model") // heads
    return kv, head_dim


def geometry_from_config(config: PretrainedConfig) -> Geometry:
    """Read the site layout of a model from its config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _need(config, "hidden_size", "d_model", "n_embd")
    if getattr(config, "is_encoder_decoder", False):
        enc_layers = _need(config, "encoder_layers", "num_layers")
        dec_layers = _need(config, "decoder_layers", "num_decoder_layers", "num_layers")
        dec_kv, dec_dim = _heads(config, ("decoder_attention_heads", "num_attention_heads"))
        enc_kv, enc_dim = _heads(config, ("encoder_attention_heads", "num_attention_heads"))
        sites = (
            [Site("decoder", i, dec_kv, dec_dim) for i in range(dec_layers)]
            + [Site("encoder", i, enc_kv, enc_dim) for i in range(enc_layers)]
            + [Site("cross", i, dec_kv, dec_dim) for i in range(dec_layers)]
        )
    else:
        layers = _need(config, "num_hidden_layers")
        kv, dim = _heads(config, ("num_attention_heads",))
        sites = [Site("decoder", i, kv, dim) for i in range(layers)]
    return Geometry(config.model_type, bool(getattr(config, "is_encoder_decoder", False)), hidden, tuple(sites))


def _site_kind(module_name: str, module: nn.Module, is_encoder_decoder: bool) -> str:
    leaf = module_name.rsplit(".", 1)[-1]
    if getattr(module, "is_cross_attention", False) or leaf in _CROSS_NAMES:
        return "cross"
    if is_encoder_decoder and ".encoder." in f".{module_name}.":
        return "encoder"
    return "decoder"


def find_attention_modules(model: nn.Module, geometry: Geometry) -> dict[str, nn.Module]:
    """Map each site name (``decoder.3``) to its attention module.

    Attention modules are the modules whose class name ends in ``Attention`` and that carry a
    ``layer_idx``; raises UnsupportedModelError naming the sites it could not find.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Attention") or getattr(module, "layer_idx", None) is None:
            continue
        site = f"{_site_kind(name, module, geometry.is_encoder_decoder)}.{module.layer_idx}"
        found.setdefault(site, module)
    wanted = [s.name for s in geometry.sites]
    missing = [s for s in wanted if s not in found]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no attention module found for prefix sites {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}. prefix_core needs attention modules named "
            "*Attention with a `layer_idx` that call transformers' AttentionInterface "
            "(Llama, Qwen2, Mistral, GPT-2, BART and most current models do)."
        )
    return {s: found[s] for s in wanted}
