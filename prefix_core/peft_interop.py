"""PEFT interop: write our folded prefix as a PEFT prefix-tuning adapter, and read one back.

PEFT stores a prefix as ``prompt_embeddings [P, layers * 2 * kv_heads * head_dim]`` (MLP folded
away) and puts real tokens at positions P..P+T-1, the same as prefix_core, so the conversion is
a copy of the table. Only decoder-only models: PEFT prefixes the decoder alone.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftConfig, PrefixTuningConfig
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ArtifactError
from .geometry import geometry_from_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_peft_adapter(artifact, path: Path) -> Path:
    geometry = artifact.geometry
    if geometry.is_encoder_decoder:
        raise ArtifactError(
            "PEFT's prefix tuning only prefixes the decoder of an encoder-decoder model, so this prefix "
            "(encoder, decoder and cross-attention) cannot be expressed as a PEFT adapter."
        )
    site = geometry.sites[0]
    if any((s.kv_heads, s.head_dim) != (site.kv_heads, site.head_dim) for s in geometry.sites):
        raise ArtifactError("PEFT adapters need the same head layout in every layer; this model varies it.")
    base = artifact.manifest["base_model"]
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=artifact.num_virtual_tokens,
        token_dim=site.kv_heads * site.head_dim,
        num_attention_heads=site.kv_heads,
        num_layers=len(geometry.sites),
        num_transformer_submodules=1,
        encoder_hidden_size=site.kv_heads * site.head_dim,
        prefix_projection=False,
        inference_mode=True,
        base_model_name_or_path=base["name"],
        revision=base.get("revision"),
    )
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file({"prompt_embeddings": artifact.table().contiguous()}, path / ADAPTER_WEIGHTS)
    return path


def read_peft_adapter(cls, path: Path, base: nn.Module, **fields):
    if not (path / "adapter_config.json").is_file():
        raise ArtifactError(f"{path} is not a PEFT adapter: it has no adapter_config.json")
    config = PeftConfig.from_pretrained(str(path))
    if str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type) != "PREFIX_TUNING":
        raise ArtifactError(f"{path} is a {config.peft_type} adapter, not prefix tuning")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path} has no {ADAPTER_WEIGHTS} (pickled .bin adapters are not read, for safety)")
    state = load_file(weights)
    table = state.get("prompt_embeddings")
    if table is None:
        raise ArtifactError(f"{weights} has no 'prompt_embeddings' tensor (found {sorted(state)})")
    geometry = geometry_from_config(base.config)
    if tuple(table.shape) != (config.num_virtual_tokens, geometry.width):
        raise ArtifactError(
            f"{weights}: prompt_embeddings is {tuple(table.shape)}, but {geometry.describe()} with "
            f"{config.num_virtual_tokens} virtual tokens needs {(config.num_virtual_tokens, geometry.width)}"
        )
    prefix_config = {"num_virtual_tokens": config.num_virtual_tokens, "projection_hidden": None}
    return cls.from_table(table.float(), base, prefix_config, None, **fields)
