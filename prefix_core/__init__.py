"""prefix_core: prefix tuning (Li & Liang 2021) on any frozen HF model.

Library only: depends on torch, transformers, accelerate and safetensors (peft for interop).
"""

from .artifact import PrefixArtifact
from .base_model import DEFAULT_MODEL, EMBEDDED_MODELS, load_base_model
from .config import PrefixConfig
from .data import Example
from .errors import ArtifactError, BaseModelMismatchError, ModelNotFoundError, PrefixError, UnsupportedModelError
from .geometry import Geometry, Site, geometry_from_config
from .model import PrefixModel
from .multi import MultiPrefixGenerator
from .train import TrainConfig, TrainResult, train_prefix

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ArtifactError",
    "BaseModelMismatchError",
    "Example",
    "Geometry",
    "ModelNotFoundError",
    "MultiPrefixGenerator",
    "PrefixArtifact",
    "PrefixConfig",
    "PrefixError",
    "PrefixModel",
    "Site",
    "TrainConfig",
    "TrainResult",
    "UnsupportedModelError",
    "geometry_from_config",
    "load_base_model",
    "train_prefix",
]
