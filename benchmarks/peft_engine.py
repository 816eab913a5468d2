"""Baseline (a) of bench_serving.py: PEFT serving one prefix at a time behind the same OpenAI API.

``PeftEngine`` has the interface of ``prefix_core.DecodeEngine`` that ``prefixflow.serving.engine_loop`` drives
(``add``, ``cancel``, ``step``, ``has_work``, ``num_active``, ``num_pending``, ``config.max_batch``), so the same
server (``prefixflow.serving.app.run``) runs over it: same HTTP layer, prefix bank, registry and streaming. It
serves one request at a time, FIFO, batch 1: a ``PeftModel`` holds every prefix as a PEFT prefix-tuning adapter
(exported with ``PrefixArtifact.to_peft``) and switches adapter per request. A request's prefill is one
``step()`` (its first token), then each ``step()`` gives it one more token, so streaming time to first token is
meaningful. Greedy only (temperature 0).

Decoding is bench_multi_prefix.py's manual loop (``PeftModel.generate()`` ignores the prefix with transformers
5.24): the prefix comes from PEFT's prompt cache ``peft_model.get_prompt(1)``, positions follow the cache length
(P.. after a prefix, as in prefix_core), an all-ones attention mask, ``logits_to_keep=1``, argmax.

The server hands ``add`` the bank's ``(keys, values)`` per layer; the engine finds the adapter holding the same
table (``kv_to_table`` compared with each adapter's ``prompt_embeddings``) once per bank tensor and remembers it
by ``keys[0].data_ptr()``.

Launcher (what bench_serving.py starts)::

    python benchmarks/peft_engine.py --adapters DIR --port N [--base smollm2-135m] [--max-queued Q]

``DIR`` holds one PEFT adapter folder per prefix. Registry settings come from the environment as for
``prefixflow serve`` (``PREFIXFLOW_HOME`` / ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class _Request:
    request_id: Hashable
    prompt: list[int]
    adapter: str | None  # None: the bare base
    max_new_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool = False
    generated: list[int] = field(default_factory=list)
    cache: object = None
    attn: torch.Tensor | None = None


class PeftEngine:
    """One request at a time through a PeftModel holding every adapter (see the module docstring)."""

    def __init__(self, base, tokenizer, adapters: Path) -> None:
        from peft import PeftModel
        from safetensors.torch import load_file

        dirs = sorted(d for d in Path(adapters).iterdir() if (d / "adapter_config.json").is_file())
        if not dirs:
            raise ValueError(f"{adapters} holds no PEFT adapter folder")
        self.config = SimpleNamespace(max_batch=1)  # read by the engine loop for Retry-After estimates
        self.tokenizer = tokenizer
        self.model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
        for d in dirs[1:]:
            self.model.load_adapter(str(d), adapter_name=d.name)
        self.model.eval()
        self.lm = self.model.get_base_model()
        param = next(self.lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tables = {d.name: load_file(d / "adapter_model.safetensors")["prompt_embeddings"].to(self.device)
                       for d in dirs}
        self._adapter_of: dict[tuple[int, tuple[int, ...]], str] = {}  # bank tensor -> adapter name
        gen = getattr(self.lm, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = self.lm.config.eos_token_id if self.lm.config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else list(eos or []))
        self._pending: deque[_Request] = deque()
        self._current: _Request | None = None

    # --- the DecodeEngine interface used by prefixflow.serving.engine_loop -----------------------------------
    def add(self, request_id, prompt_ids, prefix=None, params=None) -> None:
        from prefix_core.sampling import SamplingParams

        params = params or SamplingParams()
        max_new_tokens, temperature, stop, ignore_eos = (params.max_new_tokens, params.temperature, params.stop,
                                                         params.ignore_eos)
        if temperature != 0:
            raise ValueError("the PEFT baseline engine decodes greedily only: send temperature 0")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        adapter = None if prefix is None else self._adapter(prefix)
        stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
        self._pending.append(_Request(request_id, prompt, adapter, max_new_tokens, stop, bool(ignore_eos)))

    def cancel(self, request_id) -> bool:
        if self._current is not None and self._current.request_id == request_id:
            self._current = None
            return True
        for req in self._pending:
            if req.request_id == request_id:
                self._pending.remove(req)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return self._current is not None or bool(self._pending)

    @property
    def num_active(self) -> int:
        return int(self._current is not None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @torch.no_grad()
    def step(self):
        """The current request's next token (its prefill when it starts: the first request in FIFO order)."""
        from transformers import DynamicCache

        from prefix_core.decode_engine import StepOutput

        req = self._current
        if req is None:
            if not self._pending:
                return []
            req = self._current = self._pending.popleft()
            if req.adapter is None:
                req.cache = DynamicCache(config=self.lm.config)
            else:
                self.model.set_adapter(req.adapter)
                req.cache = self.model.get_prompt(batch_size=1)
            ids = torch.tensor([req.prompt], device=self.device)
            past = req.cache.get_seq_length()
            req.attn = torch.ones(1, past + ids.shape[1], dtype=torch.long, device=self.device)
        else:
            ids = torch.tensor([[req.generated[-1]]], device=self.device)
            req.attn = torch.cat([req.attn, torch.ones(1, 1, dtype=torch.long, device=self.device)], dim=-1)
        out = self.lm(input_ids=ids, attention_mask=req.attn, cache=req.cache, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].float().argmax())
        req.generated.append(token)
        reason = self._finish_reason(req, token)
        if reason is not None:
            self._current = None
        return [StepOutput(req.request_id, token, len(req.generated) - 1, reason is not None, reason)]

    # --- helpers ----------------------------------------------------------------------------------------------
    def _adapter(self, prefix) -> str:
        from prefix_core.encoder import kv_to_table

        keys, values = prefix
        tag = (keys[0].data_ptr(), tuple(keys[0].shape))
        name = self._adapter_of.get(tag)
        if name is None:
            table = kv_to_table(list(keys), list(values)).to(self.device, torch.float32)
            for candidate, t in self.tables.items():  # the bank holds the base's dtype (bf16 where native)
                if t.shape == table.shape and torch.allclose(t.to(keys[0].dtype).float(), table, rtol=0, atol=1e-6):
                    name = candidate
                    break
            if name is None:
                raise ValueError("this prefix is not among the PEFT adapters the baseline server loaded")
            self._adapter_of[tag] = name
        return name

    def _finish_reason(self, req: _Request, token: int) -> str | None:
        if token in self.eos and not req.ignore_eos:
            return "eos"
        if req.stop:
            text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
            if any(s in text for s in req.stop):
                return "stop"
        if len(req.generated) >= req.max_new_tokens:
            return "length"
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description="prefixflow's server over the PEFT one-prefix-at-a-time engine")
    ap.add_argument("--adapters", required=True, help="folder with one PEFT adapter folder per prefix")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--max-queued", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    from prefixflow import settings
    from prefixflow.serving import app
    from prefixflow.serving.server import ServeConfig

    settings.apply_process_defaults()
    config = ServeConfig(base=args.base, max_batch=1, max_queued=args.max_queued, max_tokens=args.max_tokens,
                         refresh_s=0, precision=args.precision)
    if "device" in ServeConfig.__dataclass_fields__:  # the baseline runs where it is measured: the CPU
        from dataclasses import replace

        config = replace(config, device="cpu")
    server = app.run(config, host=args.host, port=args.port,
                     engine_factory=lambda base, tokenizer, config: PeftEngine(base, tokenizer, args.adapters))
    if server.load_error:
        raise SystemExit(server.load_error)


if __name__ == "__main__":
    main()
