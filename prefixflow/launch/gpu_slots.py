"""GPU slots: concurrent trainings on one machine never share a GPU.

Each visible GPU has a lock file under ``$PREFIXFLOW_HOME/locks/HOSTNAME``; a training takes as many free GPUs
as it runs processes on this machine (waiting until they are free) and sees only those through
``CUDA_VISIBLE_DEVICES``. With no GPU it yields an empty environment and takes no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefixflow.services.errors import TrainingError
from prefixflow.services.storage import home

# Deferred imports: torch (to list GPUs) is deferred to the call that needs it.


def visible_gpus() -> list[str]:
    """GPU ids this process may use (honours an existing CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


@contextmanager
def gpu_slots(count: int, poll_s: float = 2.0, timeout_s: float | None = None) -> Iterator[dict[str, str]]:
    """Hold ``count`` free GPUs for the block; yields the env to launch with."""
    gpus = visible_gpus()
    if not gpus:
        yield {}
        return
    if count > len(gpus):
        raise TrainingError(f"the training needs {count} GPUs on this machine but only {len(gpus)} are visible "
                         f"({','.join(gpus)}); lower train.processes_per_machine")
    folder = home() / "locks" / socket.gethostname()  # per host: the state folder may be shared
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with ExitStack() as stack:
        while True:
            held = []
            for gpu in gpus:
                fh = open(folder / f"gpu-{gpu}.lock", "w")  # noqa: SIM115 - kept open while held
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fh.close()
                    continue
                held.append((gpu, fh))
                if len(held) == count:
                    break
            if len(held) == count:
                for _, fh in held:
                    stack.callback(fh.close)
                yield {"CUDA_VISIBLE_DEVICES": ",".join(g for g, _ in held)}
                return
            for _, fh in held:
                fh.close()
            if timeout_s is not None and time.time() - start > timeout_s:
                raise TimeoutError(f"no {count} free GPUs after {timeout_s:.0f} s")
            time.sleep(poll_s)
