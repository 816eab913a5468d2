"""Generation with a prefix equals a manual greedy loop over full forwards; encoder-decoder prefixes."""

import pytest
import torch

from prefix_core import PrefixConfig, PrefixModel
from support.tiny_models import ALL_FAMILIES, batch, make_base

EOS = 1


def manual_greedy(model, enc, steps, encoder_decoder):
    """Greedy decoding by recomputing the whole sequence each step (no cache)."""
    if encoder_decoder:
        dec = torch.full((enc["input_ids"].shape[0], 1), model.base.config.decoder_start_token_id)
        for _ in range(steps):
            logits = model(**enc, decoder_input_ids=dec).logits[:, -1]
            logits[:, EOS] = -torch.inf  # generate() is run with min_new_tokens
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
        return dec[:, 1:]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        logits[:, EOS] = -torch.inf
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_matches_manual_greedy_with_left_padding(tok, family):
    model = PrefixModel(make_base(family), PrefixConfig(num_virtual_tokens=4, projection_hidden=8, seed=3))
    enc = batch(tok, ["hello world", "ab"], "left")
    enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    encoder_decoder = family == "bart"
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    new = out[:, 1:] if encoder_decoder else out[:, enc["input_ids"].shape[1]:]
    assert torch.equal(new, manual_greedy(model, enc, 6, encoder_decoder))


def test_generate_kwargs_pass_through(tok):
    model = PrefixModel(make_base("llama"), PrefixConfig(num_virtual_tokens=3))
    enc = batch(tok, ["abc"], "left")
    beams = model.generate(**enc, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2
    torch.manual_seed(0)
    a = model.generate(**enc, max_new_tokens=5, do_sample=True, top_k=5)
    torch.manual_seed(0)
    b = model.generate(**enc, max_new_tokens=5, do_sample=True, top_k=5)
    assert torch.equal(a, b)


def test_encoder_decoder_has_three_prefixes(tok):
    """Encoder self-attention, decoder self-attention and cross-attention each get a prefix that
    changes the output and receives gradients."""
    base = make_base("bart")
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=3, projection_hidden=None))
    enc = batch(tok, ["hello world"], "right")
    dec = batch(tok, ["xyz"], "right")["input_ids"]
    kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "decoder_input_ids": dec}
    full = model.prefix.fold()
    base_logits = base(**kw).logits
    starts, start = {}, 0
    for s in model.geometry.sites:
        starts.setdefault(s.kind, []).append((start, start + s.width))
        start += s.width
    for kind, spans in starts.items():
        only = torch.zeros_like(full)
        for a, b in spans:
            only[:, a:b] = full[:, a:b]
        model.prefix.set_table(only)
        assert (model(**kw).logits - base_logits).abs().max() > 1e-4, kind
    model.prefix.set_table(full)
    model(**kw, labels=dec).loss.backward()
    grad = model.prefix.table.grad
    for kind, spans in starts.items():
        assert all(grad[:, a:b].abs().sum() > 0 for a, b in spans), kind
