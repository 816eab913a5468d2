"""Errors raised by the pipeline's tasks. Like prefix_core's, each message says what is wrong and how
to fix it; the CLI prints it without a traceback and the flow does not retry it."""

from prefix_core.errors import PrefixError


class DataError(PrefixError):
    """The task's data cannot be used: missing, unreadable, wrong columns or types, empty."""


class RegistryError(PrefixError):
    """A registry reference (models:/NAME@ALIAS, CLIENT/TASK@ALIAS, a version) does not resolve."""


class TrainingError(PrefixError):
    """The training launch failed because of its input (not worth retrying)."""


def is_user_error(exc: BaseException) -> bool:
    """True for errors caused by the input (retrying cannot help)."""
    from prefixflow.services.spec import SpecError

    return isinstance(exc, PrefixError | SpecError)

