"""``python -m prefixflow.infra.stack up|down|status|env``: the same app as ``prefixflow stack``."""

from prefixflow.infra.stack.cli import app

app(prog_name="python -m prefixflow.infra.stack")
