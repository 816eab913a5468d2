"""A rank for a real ``accelerate launch --multi_gpu`` (torchrun) gang test: no torch.distributed,
so it starts fast. Rank 0 announces itself (stdout and a ready file in $GANG_TEST_DIR) and would sleep
for 10 minutes; rank 1 waits until rank 0 is up (a loaded machine may start it late), then exits 1."""

import os
import sys
import time
from pathlib import Path

rank = int(os.environ.get("RANK", "0"))
ready = Path(os.environ.get("GANG_TEST_DIR", ".")) / "rank0-ready"
print(f"rank {rank} pid {os.getpid()}", flush=True)
if rank == 1:
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    print("RuntimeError: rank 1 simulated crash", flush=True)
    sys.exit(1)
ready.touch()
time.sleep(600)
