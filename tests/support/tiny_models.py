"""Tiny random models of each supported family built from configs (fast, no download), and a character
tokenizer for them."""

from __future__ import annotations

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

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 :\n[]=,.?!")
VOCAB = {c: i for i, c in enumerate(["<pad>", "<eos>", "<bos>", *CHARS])}


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


def batch(tok, texts: list[str], side: str = "right"):
    return tok(texts, return_tensors="pt", padding=True, padding_side=side)
