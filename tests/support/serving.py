"""Helpers for server tests: a tiny base with a chat template, prefixes registered through the product's own
registration code (random tables: every prefix changes the output), and ``prefixflow serve`` as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from support.harness import wait_until
from support.pipeline import save_tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
TEMPLATE = "in: {source}\nout:"


def served_model_dir(path: Path) -> Path:
    """The tiny llama of the pipeline tests, with a chat template on its tokenizer."""
    from transformers import AutoTokenizer

    save_tiny_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(path)
    return path


def register_random_prefix(model_dir: Path, client: str, task: str, seed: int, p: int = 4,
                           alias: str | None = "champion", scale: float = 2.0) -> str:
    """Register a random prefix for ``model_dir`` as a new version of ``CLIENT-TASK`` (embedded or configured
    MLflow), point ``alias`` at it, return the version."""
    from prefix_core import PrefixArtifact, load_base_model
    from prefix_core.geometry import geometry_from_config
    from prefixflow.services import registration, tracking

    base, _ = load_base_model(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    width = geometry_from_config(base.config).width
    table = torch.randn(p, width, generator=g) * scale
    art = PrefixArtifact.from_table(table, base, {"num_virtual_tokens": p}, prompt_template=TEMPLATE)
    name = f"{client}-{task}"
    registration.ensure_model(name, client, task, f"test prefixes of {client}/{task}")
    run_id = tracking.open_run(f"prefixflow/{client}", f"test-{name}-{seed}", f"{name}-{seed}", {}, {})
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"prefixflow-test-prefix-{os.getpid()}-{seed}"
    art.save(folder)
    mv = registration.publish(name, folder, run_id, {"client": client, "task": task, "seed": str(seed)})
    if alias:
        tracking.client().set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(model_dir: Path, env: dict[str, str], *args: str, timeout: float = 120) -> Iterator[str]:
    """``prefixflow serve --base MODEL_DIR ARGS`` on a free loopback port until /health is ready; yields the
    base URL (``http://127.0.0.1:PORT``). Stopped with SIGTERM (then SIGKILL) at the end."""
    port = free_port()
    cli = [sys.executable, "-m", "prefixflow.cli", "serve", "--base", str(model_dir), "--port", str(port), *args]
    log = Path(env.get("PREFIXFLOW_HOME", "/tmp")) / f"serve-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cli, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"prefixflow serve exited with {proc.returncode}:\n{log.read_text()}"
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout, 0.3, message=lambda: f"prefixflow serve is not ready:\n{log.read_text()}")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
