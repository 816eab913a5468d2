"""Precision by hardware: bf16 only where the device computes it natively, fp32 elsewhere.

``auto`` (the default everywhere) picks bf16 on a CUDA GPU with native bf16 and on a CPU whose oneDNN
reports bf16 support (AVX512-BF16 / AMX), and fp32 otherwise: on an AVX2-only CPU, bf16 autocast runs
a training step about 30x slower than fp32 (forward alone about 5x). ``bf16`` is honoured where it is
not native, with a warning that says what it costs; ``fp32`` (``no`` for training, as accelerate
spells it) always gives fp32.

The decision is a pure function of (request, device); training decides once per job on the device it
trains on, evaluation and generation once per base model they load.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import normalize_precision as normalize

SLOWDOWN_NOTE = "about 30x slower to train and 5x slower to run than fp32 on such CPUs"


@dataclass(frozen=True)
class Precision:
    """What a job computes in. ``mode``: "bf16" or "fp32"; ``requested``: what was asked for;
    ``native``: whether the device has native bf16; ``reason``: one line for logs and manifests;
    ``warning``: set when bf16 was forced where it is not native."""

    requested: str
    mode: str
    native: bool
    device: str
    reason: str
    warning: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mode == "bf16" else torch.float32

    @property
    def autocast(self) -> bool:
        """Whether training runs its forward pass under bf16 autocast (weights and optimizer stay fp32)."""
        return self.mode == "bf16"

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_capability() -> str:
    """ATen's CPU kernel level, e.g. ``AVX2``, ``AVX512`` (what torch dispatches to on this CPU)."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_native() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def bf16_support(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """(native, description of the device) for ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        return bool(torch.cuda.is_bf16_supported(including_emulation=False)), f"GPU {name}"
    if device.type == "cpu":
        return cpu_bf16_native(), f"CPU ({cpu_capability()})"
    return False, device.type


def decide(requested: str = "auto", device: str | torch.device = "cpu") -> Precision:
    """The precision a job on ``device`` uses for ``requested`` (see the module docstring)."""
    req = normalize(requested)
    native, where = bf16_support(device)
    dev = torch.device(device).type
    if req == "fp32":
        return Precision(req, "fp32", native, dev, f"fp32 as requested on this {where}")
    if req == "bf16" and not native:
        warning = (f"bf16 was requested but this {where} has no native bf16 kernels: expect {SLOWDOWN_NOTE}. "
                   "Set mixed_precision (training) or precision (evaluation) to auto, or fp32, to use fp32 here.")
        return Precision(req, "bf16", native, dev, f"bf16 as requested (not native on this {where})", warning)
    if native:
        return Precision(req, "bf16", native, dev, f"bf16 is native on this {where}: bf16")
    return Precision(req, "fp32", native, dev, f"bf16 is not native on this {where}: fp32")
