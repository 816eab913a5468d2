"""The ``prefixflow`` command line (the console script ``prefixflow = prefixflow.cli:app``); see
:mod:`prefixflow.cli.app`."""

from prefixflow.cli.app import app

__all__ = ["app"]
