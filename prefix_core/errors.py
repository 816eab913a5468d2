"""Errors raised by prefix_core. Each carries a message that says what is wrong and how to fix it."""


class PrefixError(Exception):
    """Base class: a user-facing error with an actionable message."""


class UnsupportedModelError(PrefixError):
    """The base model cannot carry a prefix (e.g. it does not route attention through transformers'
    AttentionInterface, or its layer geometry cannot be read from its config)."""


class BaseModelMismatchError(PrefixError):
    """A prefix was trained on a different base model than the one it is being applied to."""


class ArtifactError(PrefixError):
    """A prefix artifact is missing, corrupt, truncated or of an unknown format version."""


class ModelNotFoundError(PrefixError):
    """A base model name or path could not be resolved offline."""


class TrainingDiverged(PrefixError):
    """A training step's loss is not finite (NaN or infinite): retrying the same settings on the same data
    diverges again."""
