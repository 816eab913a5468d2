"""What a training job costs, measured inside the job and reported as its ``usage`` event (one per client).

The event, in seconds, tokens and MiB::

    {"event": "usage", "device": "cpu" | "cuda", "device_name": "AMD EPYC" | "NVIDIA H100 ...",
     "processes": 1, "wall_s": .., "cpu_s": .., "gpu_s": .., "tokens": .., "elapsed_s": ..,
     "peak_host_mb": .., "peak_device_mb": .. | None, "pack_members": 1}

- ``wall_s``: the job's wall time charged to this client (alone: the whole job, loading included; in a pack, its
  share: :class:`prefix_core.packed.Ledger`). ``elapsed_s``: from the job's start to this client's end.
- ``cpu_s``: process-seconds of CPU (user + system, all threads, summed over the ranks), charged the same way.
- ``gpu_s``: GPU-seconds (wall time times the GPUs the job held; 0 on the CPU), charged the same way.
- ``tokens``: tokens of the rows trained by this launch (a resumed launch counts its own steps only).
- ``peak_host_mb``: the largest resident memory of one process (for a pack, the pack's); ``peak_device_mb``: the
  most GPU memory torch allocated on one device, or None on the CPU.

Only a launch that reaches its end reports; the time of a launch that crashed and was retried is not counted.
"""

from __future__ import annotations

import platform
import resource
from functools import cache

from prefix_core.train_pace import clock

# Deferred imports: torch is deferred to the calls: the job reports a bad job file before it loads.


def peak_host_mb() -> float:
    """The peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_fields(device) -> dict:
    """``device``, ``device_name`` and ``peak_device_mb`` of a torch device."""
    import torch

    if device.type == "cuda":
        return {"device": "cuda", "device_name": torch.cuda.get_device_name(device),
                "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"device": device.type, "device_name": cpu_name() if device.type == "cpu" else device.type,
            "peak_device_mb": None}


def usage_event(device, processes: int, wall_s: float, cpu_s: float, tokens: int, elapsed_s: float,
                peak_mb: float, pack_members: int = 1, peak_device_mb: float | None = None) -> dict:
    fields = device_fields(device)
    if peak_device_mb is not None:
        fields["peak_device_mb"] = peak_device_mb
    gpus = processes if fields["device"] == "cuda" else 0
    return {"event": "usage", **fields, "processes": processes, "wall_s": wall_s, "cpu_s": cpu_s,
            "gpu_s": wall_s * gpus, "tokens": int(tokens), "elapsed_s": elapsed_s, "peak_host_mb": peak_mb,
            "pack_members": pack_members}


def job_usage(acc, started_at: tuple[float, float], tokens: int) -> dict:
    """The ``usage`` event of a training alone; a collective: every rank calls it (CPU seconds are summed over the
    ranks, peak memory is the largest of one rank)."""
    import torch

    wall, cpu = clock()
    wall, cpu = wall - started_at[0], cpu - started_at[1]
    device_mb = torch.cuda.max_memory_allocated(acc.device) / 2**20 if acc.device.type == "cuda" else 0.0
    mine = torch.tensor([[cpu, peak_host_mb(), device_mb]], dtype=torch.float64, device=acc.device)
    every = acc.gather(mine).reshape(-1, 3) if acc.num_processes > 1 else mine
    cpu_total = float(every[:, 0].sum())
    peak_host, peak_device = float(every[:, 1].max()), float(every[:, 2].max())
    return usage_event(acc.device, acc.num_processes, wall, cpu_total, tokens, wall, peak_host,
                       peak_device_mb=peak_device if acc.device.type == "cuda" else None)
