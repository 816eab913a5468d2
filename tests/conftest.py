"""Shared fixtures: tiny random models of each supported family, and a character tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test process (pytest-xdist runs two) gets a Prefect home of its own: flows run without a harness start
# an ephemeral API on PREFECT_HOME/prefect.db, and two servers migrating one SQLite file would collide.
os.environ["PREFECT_HOME"] = __import__("tempfile").mkdtemp(prefix="prefixflow-tests-prefect-")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from flows.embedded import prefect_defaults

prefect_defaults()  # before any test module imports prefect (it reads its settings once, at import)

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 :\n[]=,.?!")
VOCAB = {c: i for i, c in enumerate(["<pad>", "<eos>", "<bos>", *CHARS])}


def pytest_collection_modifyitems(config, items):
    """Work units for pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): a test module stays on one
    worker, so its module-scoped fixtures (a Slurm cluster, a Prefect harness) start once; every test that uses
    the session-wide ``live_stack`` shares one worker, so one stack starts."""
    for item in items:
        group = "live_stack" if "live_stack" in getattr(item, "fixturenames", ()) else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's ephemeral API servers (started by flows run without a harness) while output is still
    captured; at interpreter exit their log line would hit a closed stream."""
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


def char_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


V = len(VOCAB)
COMMON = {"vocab_size": V, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512, **COMMON),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, max_position_embeddings=512, **COMMON),
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=24, max_position_embeddings=512, **COMMON),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **COMMON),
    "bart": lambda: BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                               max_position_embeddings=512, decoder_start_token_id=2, forced_eos_token_id=None,
                               **COMMON),
}
DECODER_ONLY = ["llama", "qwen2", "mistral", "gpt2"]
ALL_FAMILIES = [*DECODER_ONLY, "bart"]


def make_base(family: str, seed: int = 0, attn: str = "sdpa", dtype=torch.float32):
    """A tiny random model of ``family`` (a fresh config object each time)."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    cls = AutoModelForSeq2SeqLM if family == "bart" else AutoModelForCausalLM
    model = cls.from_config(config, attn_implementation=attn, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    model.prefixflow_name = f"tiny-{family}"
    return model


@pytest.fixture(scope="session")
def tok():
    return char_tokenizer()


@pytest.fixture(params=ALL_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=DECODER_ONLY)
def decoder_family(request):
    return request.param


def batch(tok, texts: list[str], side: str = "right"):
    return tok(texts, return_tensors="pt", padding=True, padding_side=side)


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory):
    """The real local stack (SeaweedFS S3, MLflow, Prefect) on free ports for the whole session.

    Yields the client env dict (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_*, ...); it does not touch os.environ:
    set it per test, e.g. ``for k, v in live_stack.items(): monkeypatch.setenv(k, v)``. Mark such tests slow.
    """
    from infra.stack import StackConfig, running_stack

    config = StackConfig.with_free_ports(tmp_path_factory.mktemp("stack"))
    with running_stack(config) as env:
        yield env
