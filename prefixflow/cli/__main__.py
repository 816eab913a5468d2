"""``python -m prefixflow.cli``: the ``prefixflow`` command."""

from prefixflow.cli.app import app

app()
