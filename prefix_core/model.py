"""PrefixModel: a frozen HF model plus one trainable prefix.

Contract: the base model's weights never change and are never trained (``requires_grad=False``,
kept in eval mode, so no dropout); only ``PrefixModel.prefix`` (a PrefixEncoder) is trainable.
In decoder-only models the real tokens sit at positions P..P+T-1 (PEFT's convention, so exports
are exact), derived from the attention mask so left and right padding are both exact.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from .artifact import PrefixArtifact
from .attention import PREFIX_IMPL, SITE_ATTR, PrefixKV
from .config import PrefixConfig
from .encoder import PrefixEncoder, kv_to_table, table_to_kv
from .errors import ArtifactError, UnsupportedModelError
from .geometry import Geometry, find_attention_modules, geometry_from_config


def attach(base: nn.Module) -> Geometry:
    """Prepare a HF model to take prefixes (idempotent): switch its attention to the prefix-aware
    version of its sdpa/eager attention, tag every site, and probe that each site is reached."""
    geometry = geometry_from_config(base.config)
    impl = base.config._attn_implementation
    if impl not in PREFIX_IMPL.values():
        if impl not in PREFIX_IMPL:
            raise UnsupportedModelError(
                f"attention implementation {impl!r} is not supported; load the base model with "
                "attn_implementation='sdpa' (or 'eager')."
            )
        try:
            base.set_attn_implementation(PREFIX_IMPL[impl])
        except (ValueError, KeyError) as err:
            raise UnsupportedModelError(
                f"{type(base).__name__} cannot switch attention implementation ({err}); prefix_core needs "
                "models that call transformers' AttentionInterface."
            ) from err
    for index, (_, module) in enumerate(find_attention_modules(base, geometry).items()):
        setattr(module, SITE_ATTR, index)
    _probe(base, geometry)
    return geometry


def ensure_prefix_attention(base: nn.Module) -> None:
    """Re-select the prefix-aware attention if something switched the model's implementation back
    (e.g. a second model built from the same config object); otherwise prefixes would be ignored."""
    impl = base.config._attn_implementation
    if impl not in PREFIX_IMPL.values():
        attach(base)


@torch.no_grad()
def run_capture(base: nn.Module, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run the frozen base on ``input_ids`` ``[1, T]`` and return each site's keys/values
    ``[1, H, T_site, D]`` as attention saw them (after rotary embedding)."""
    capture: dict = {}
    ids = input_ids.to(base.device)
    extra = {"decoder_input_ids": ids} if base.config.is_encoder_decoder else {}
    base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, prefix_capture=capture, **extra)
    return capture


def _probe(base: nn.Module, geometry: Geometry) -> None:
    capture = run_capture(base, torch.tensor([[1, 2]]))
    missing = [s.name for i, s in enumerate(geometry.sites) if i not in capture]
    if missing:
        raise UnsupportedModelError(
            f"{type(base).__name__}: attention at sites {missing[:6]} does not go through transformers' "
            "AttentionInterface, so a prefix would be silently ignored there. This architecture is not supported."
        )
    for i, site in enumerate(geometry.sites):
        k = capture[i][0]
        if k.shape[1] != site.kv_heads or k.shape[-1] != site.head_dim:
            raise UnsupportedModelError(
                f"{site.name}: the config says {site.kv_heads} kv heads x {site.head_dim} dims but attention "
                f"receives keys of shape {tuple(k.shape)}; this architecture is not supported."
            )


def prefix_positions(attention_mask: torch.Tensor, offset: torch.Tensor | int) -> torch.Tensor:
    """Position ids ``[B, T]`` for real tokens after a prefix: offset + (index among unpadded tokens)."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(pos.device)[:, None]
    return pos + offset


class CheckpointedLayers:
    """Activation checkpointing of every transformer layer that works with the base in eval mode
    (HF's own switch only acts in train mode, which would turn dropout on). Non-reentrant, so
    gradients reach the prefix that arrives through kwargs."""

    def __init__(self, base: nn.Module) -> None:
        self.layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not self.layers:
            raise UnsupportedModelError(f"{type(base).__name__} has no checkpointable layers")

    def enable(self) -> None:
        for layer in self.layers:
            if "forward" not in layer.__dict__:
                layer.forward = _checkpointed(type(layer).forward.__get__(layer))

    def disable(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class PrefixModel(nn.Module):
    """A frozen base model and a trainable prefix. ``forward`` and ``generate`` take the usual HF
    arguments; the prefix is supplied to every attention site."""

    def __init__(self, base: nn.Module, config: PrefixConfig, tokenizer=None) -> None:
        super().__init__()
        self.base = base
        self.config = config
        base.requires_grad_(False)
        base.eval()
        self.geometry = attach(base)
        first = next(base.parameters())
        self.base_dtype, self.prefix_device = first.dtype, first.device
        self.prefix = PrefixEncoder(config, self.geometry).to(first.device)
        self._checkpointing = CheckpointedLayers(base)
        if config.init == "text":
            if tokenizer is None:
                raise ValueError('init="text" needs the tokenizer: PrefixModel(base, cfg, tokenizer=tok)')
            self.prefix.set_table(text_table(base, tokenizer, config.init_text, config.num_virtual_tokens))

    # --- modes -----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PrefixModel:
        self.training = mode
        self.prefix.train(mode)
        self.base.eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        self._checkpointing.enable()

    def gradient_checkpointing_disable(self) -> None:
        self._checkpointing.disable()

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.prefix.parameters() if p.requires_grad)

    # --- prefix ---------------------------------------------------------------------------------
    def prefix_kv(self) -> PrefixKV:
        """Current prefix as per-site K/V (runs the MLP once, over P rows), cast once to the dtype
        attention computes in (the base dtype, or the autocast dtype)."""
        device = self.prefix_device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.base_dtype
        return table_to_kv(self.prefix().to(dtype), self.geometry)

    def _prefix_kwargs(self, kv: PrefixKV, input_ids, attention_mask, position_ids, kwargs) -> dict:
        ensure_prefix_attention(self.base)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        out = dict(kwargs, attention_mask=attention_mask, prefix_kv=kv)
        if not self.base.config.is_encoder_decoder and position_ids is None:
            position_ids = prefix_positions(attention_mask, self.num_virtual_tokens)
        if position_ids is not None:
            out["position_ids"] = position_ids
        return out

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, **kwargs):
        """HF forward with the prefix. Returns the base model's output (``.loss`` when labels are
        given, ``.logits [B, T, V]``)."""
        kwargs.setdefault("use_cache", False)
        kw = self._prefix_kwargs(self.prefix_kv(), input_ids, attention_mask, position_ids, kwargs)
        return self.base(input_ids=input_ids, labels=labels, **kw)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        """HF ``generate`` with the prefix; all generation kwargs pass through."""
        kw = self._prefix_kwargs(self.prefix_kv(), input_ids, attention_mask, position_ids, kwargs)
        return self.base.generate(input_ids=input_ids, **kw)

    # --- artifacts ------------------------------------------------------------------------------
    def export(self, **manifest_fields):
        """Fold the prefix into a PrefixArtifact (per-site K/V + trainable state + manifest)."""
        return PrefixArtifact.from_model(self, **manifest_fields)

    @torch.no_grad()
    def warm_start(self, artifact) -> None:
        """Continue from ``artifact``'s prefix: its full trainable state (embedding and MLP) when this model's
        prefix has an MLP, else its folded table. Call before training starts; the parameters are overwritten in
        place. Raises BaseModelMismatchError for another base and ArtifactError when the prefixes do not match
        (:func:`warm_start_mismatch`)."""
        artifact.check_base(self.base)
        problem = warm_start_mismatch(artifact, self.config)
        if problem is None and self.config.projection_hidden is not None:
            own, state = self.prefix.state_dict(), artifact.trainable_state
            if {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in own.items()}:
                problem = (f"its trainable state has other parameter shapes ({sorted(state)}) than this training's "
                           f"prefix ({sorted(own)})")
        if problem is not None:
            raise ArtifactError(f"cannot start from this prefix: {problem}")
        if self.config.projection_hidden is None:
            self.prefix.set_table(artifact.table())
            return
        for key, value in self.prefix.state_dict().items():
            value.copy_(artifact.trainable_state[key].to(value.dtype))

    @classmethod
    def from_artifact(cls, base: nn.Module, artifact, trainable: bool = False) -> PrefixModel:
        """Rebuild a PrefixModel from an artifact. The base model is checked against the one the
        prefix was trained on. ``trainable=True`` restores the MLP (to continue training);
        otherwise the folded table is loaded into a direct-mode prefix (identical outputs)."""
        artifact.check_base(base)
        cfg = replace(PrefixConfig.from_dict(artifact.manifest["prefix_config"]), init="random", init_text=None)
        if not trainable or not artifact.trainable_state:
            cfg = replace(cfg, projection_hidden=None, projection_input=None)
        model = cls(base, cfg)
        if cfg.projection_hidden is None:
            model.prefix.set_table(artifact.table())
        else:
            model.prefix.load_state_dict(artifact.trainable_state)
        return model.to(next(base.parameters()).device)


def warm_start_mismatch(artifact, config: PrefixConfig) -> str | None:
    """Why a training with prefix ``config`` cannot start from ``artifact`` (None when it can): the number of
    virtual tokens must match, and an MLP prefix continues only an MLP of the same width (a direct prefix starts
    from any artifact's folded table). The base model is checked apart (``PrefixArtifact.check_base``)."""
    theirs = artifact.manifest.get("prefix_config", {}).get("projection_hidden")
    if artifact.num_virtual_tokens != config.num_virtual_tokens:
        return (f"it has {artifact.num_virtual_tokens} virtual tokens and this training {config.num_virtual_tokens}; "
                "use the same prefix.num_virtual_tokens, or start cold (another prefix.init)")
    if config.projection_hidden is None:
        return None
    if theirs != config.projection_hidden or not artifact.trainable_state:
        kept = f"an MLP of width {theirs}" if theirs and artifact.trainable_state else "no MLP (only its table)"
        return (f"it keeps {kept} and this training has prefix.projection_hidden {config.projection_hidden}; use "
                f"the same width, set prefix.projection_hidden: null to start from its table, or start cold")
    return None


@torch.no_grad()
def text_table(base: nn.Module, tokenizer, text: str, num_tokens: int) -> torch.Tensor:
    """The paper's initialization: keys/values of the first P tokens of ``text`` at every site."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < num_tokens:
        raise ValueError(
            f"init_text has {ids.shape[1]} tokens but the prefix needs {num_tokens}: "
            "use a longer text or a shorter prefix"
        )
    capture = run_capture(base, ids[:, :num_tokens])
    geometry = geometry_from_config(base.config)
    keys = [capture[i][0][0, :, :num_tokens].float().cpu() for i in range(len(geometry.sites))]
    values = [capture[i][1][0, :, :num_tokens].float().cpu() for i in range(len(geometry.sites))]
    return kv_to_table(keys, values)
