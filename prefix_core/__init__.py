"""prefix_core: prefix tuning (Li & Liang 2021) on any frozen HF model.

Library only: depends on torch, transformers, accelerate and safetensors (peft for interop). The names
below load their module on first use, so ``prefix_core.config`` and ``prefix_core.template`` (no torch)
import without the ML stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "PrefixArtifact": "artifact",
    "DEFAULT_MODEL": "base_model", "EMBEDDED_MODELS": "base_model", "load_base_model": "base_model",
    "PrefixConfig": "config", "TrainConfig": "config",
    "Example": "data",
    "ArtifactError": "errors", "BaseModelMismatchError": "errors", "ModelNotFoundError": "errors",
    "PrefixError": "errors", "TrainingDiverged": "errors", "UnsupportedModelError": "errors",
    "Geometry": "geometry", "Site": "geometry", "geometry_from_config": "geometry",
    "PrefixModel": "model",
    "MultiPrefixGenerator": "multi",
    "DecodeEngine": "decode_engine", "EngineConfig": "decode_engine", "SamplingParams": "sampling",
    "PackedTraining": "packed",
    "TrainResult": "train", "train_prefix": "train",
}
__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ArtifactError",
    "BaseModelMismatchError",
    "DecodeEngine",
    "EngineConfig",
    "Example",
    "Geometry",
    "ModelNotFoundError",
    "MultiPrefixGenerator",
    "PackedTraining",
    "PrefixArtifact",
    "PrefixConfig",
    "PrefixError",
    "PrefixModel",
    "SamplingParams",
    "Site",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "UnsupportedModelError",
    "geometry_from_config",
    "load_base_model",
    "train_prefix",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'prefix_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .artifact import PrefixArtifact
    from .base_model import DEFAULT_MODEL, EMBEDDED_MODELS, load_base_model
    from .config import PrefixConfig, TrainConfig
    from .data import Example
    from .decode_engine import DecodeEngine, EngineConfig
    from .errors import (
        ArtifactError,
        BaseModelMismatchError,
        ModelNotFoundError,
        PrefixError,
        TrainingDiverged,
        UnsupportedModelError,
    )
    from .geometry import Geometry, Site, geometry_from_config
    from .model import PrefixModel
    from .multi import MultiPrefixGenerator
    from .packed import PackedTraining
    from .sampling import SamplingParams
    from .train import TrainResult, train_prefix
