"""Generation with one prefix, or none: the prefix fetched and loaded, its base model (or another) loaded, and
greedy completions of prompts. ``prefixflow generate`` is this plus its printing."""

from __future__ import annotations

import torch

from prefix_core import DEFAULT_MODEL, MultiPrefixGenerator, PrefixArtifact, load_base_model
from prefixflow.services import registry
from prefixflow.services.storage import fetch_dir


def load_prefix(prefix: str) -> PrefixArtifact:
    """The prefix at a registry reference (``CLIENT/TASK@ALIAS``, ``models:/...``), a local folder or an ``s3://``
    folder, checked as it loads (a ``PrefixError`` says what is wrong)."""
    return PrefixArtifact.load(registry.download(prefix) if registry.is_ref(prefix) else fetch_dir(prefix))


def generate_texts(prompts: list[str], prefix: str | None = None, model: str | None = None,
                   dtype: torch.dtype = torch.float32, max_new_tokens: int = 48, template: bool = True) -> list[str]:
    """One greedy completion per prompt, with ``prefix`` (see :func:`load_prefix`) or, when None, the bare base.
    ``model``: the base model (default: the one recorded in the prefix, else the embedded default); ``dtype``: the
    base's dtype; ``template``: render each prompt through the prefix's prompt template first."""
    art = load_prefix(prefix) if prefix else None
    name = model or (art.manifest["base_model"]["name"] if art else DEFAULT_MODEL)
    base, tok = load_base_model(name, dtype=dtype)
    gen = MultiPrefixGenerator(base, tok, {"p": art} if art else {})
    return gen.generate([("p" if art else None, p) for p in prompts], max_new_tokens=max_new_tokens,
                        apply_template=template and art is not None, do_sample=False)
