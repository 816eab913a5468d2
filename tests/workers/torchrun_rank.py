"""A rank for a real ``accelerate launch --multi_gpu`` (torchrun) gang test: no torch.distributed,
so it starts fast. Rank 1 exits with code 1 after a moment; rank 0 would sleep for 10 minutes."""

import os
import sys
import time

rank = int(os.environ.get("RANK", "0"))
print(f"rank {rank} pid {os.getpid()}", flush=True)
if rank == 1:
    time.sleep(1.0)
    print("RuntimeError: rank 1 simulated crash", flush=True)
    sys.exit(1)
time.sleep(600)
