"""Evaluations running at once in one process decode together (services.eval_batching): each client's generations
equal its evaluation alone, batches hold rows of several clients, and one client's bad prefix fails only its own
evaluation."""

from __future__ import annotations

import threading

import pytest
import torch

from prefix_core import BaseModelMismatchError, PrefixArtifact
from prefix_core.geometry import geometry_from_config
from prefixflow.services import evaluation
from prefixflow.services.eval_batching import POOL
from support.tiny_models import make_base

TEMPLATE = "in: {source}\nout:"
SOURCES = [f"word {i} {'ab' * (i % 4)}" for i in range(10)]


def prefix(base, seed: int, p: int) -> PrefixArtifact:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(p, geometry_from_config(base.config).width, generator=g) * 2.0
    return PrefixArtifact.from_table(table, base, {"num_virtual_tokens": p}, prompt_template=TEMPLATE)


def evaluate(base, tok, prefixes: dict, batch_size: int = 8) -> dict[str, list[str]]:
    with POOL.evaluating():
        return evaluation.generate_all(base, tok, prefixes, TEMPLATE, SOURCES, batch_size, 8, single_line=True)


def concurrently(calls: dict) -> dict:
    """name -> what ``calls[name]()`` returned or raised, all started at once."""
    out: dict = {}
    start = threading.Barrier(len(calls))

    def run(name):
        start.wait()
        try:
            out[name] = calls[name]()
        except Exception as err:
            out[name] = err

    threads = [threading.Thread(target=run, args=(n,)) for n in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_evaluations_decode_together_and_each_equals_alone(tok):
    base = make_base("llama")
    clients = {"a": {"candidate": prefix(base, 1, 3), "champion": prefix(base, 2, 5)},
               "b": {"candidate": prefix(base, 3, 4)},
               "c": {"candidate": prefix(base, 4, 2), "champion": prefix(base, 5, 2)}}
    alone = {name: evaluate(base, tok, p) for name, p in clients.items()}  # one at a time: nothing to share
    assert len({tuple(o["candidate"]) for o in alone.values()}) == 3  # the prefixes change the output
    before = POOL.batches
    together = concurrently({name: (lambda p=p: evaluate(base, tok, p, batch_size=16)) for name, p in
                             clients.items()})
    assert together == alone
    assert POOL.batches > before  # some batch held rows of more than one evaluation


def test_a_bad_prefix_fails_its_own_evaluation_only(tok):
    base = make_base("llama")
    other = make_base("llama", seed=7)
    clients = {"good": {"candidate": prefix(base, 1, 3)}, "bad": {"candidate": prefix(other, 2, 3)},
               "also-good": {"candidate": prefix(base, 3, 3)}}
    alone = {name: evaluate(base, tok, clients[name]) for name in ("good", "also-good")}
    out = concurrently({name: (lambda p=p: evaluate(base, tok, p)) for name, p in clients.items()})
    assert isinstance(out["bad"], BaseModelMismatchError)
    assert out["good"] == alone["good"] and out["also-good"] == alone["also-good"]
    with pytest.raises(BaseModelMismatchError):
        evaluate(base, tok, clients["bad"])
