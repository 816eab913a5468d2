"""Fake launchers and ranks for tests/test_launch.py (no torch: they start in milliseconds).

    gang.py launcher MODE -m MARKER     starts two ranks (``gang.py rank R MODE MARKER``) and waits
    gang.py rank R MODE MARKER          a rank; MARKER only makes its command line recognisable

Modes: ``die``: rank 1 exits with code 1 after 1.5 s while rank 0 and the launcher wait forever
(a launcher that misses the death). ``hang``: everyone prints once, then sleeps and ignores
SIGTERM. ``orphan``: the launcher exits 0 at once, leaving its ranks running.
"""

import os
import signal
import subprocess
import sys
import time


def main() -> None:
    role = sys.argv[1]
    if role == "launcher":
        mode, marker = sys.argv[2], sys.argv[4]
        ranks = [subprocess.Popen([sys.executable, __file__, "rank", str(r), mode, marker]) for r in range(2)]
        print("launcher pid", os.getpid(), "ranks", " ".join(str(p.pid) for p in ranks), flush=True)
        if mode == "orphan":
            return
        if mode == "hang":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    else:
        rank, mode = int(sys.argv[2]), sys.argv[3]
        print(f"rank {rank} pid {os.getpid()}", flush=True)
        if mode == "hang":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if mode == "die" and rank == 1:
            time.sleep(1.5)
            print("rank 1: RuntimeError: simulated crash", flush=True)
            sys.exit(1)
        time.sleep(600)


if __name__ == "__main__":
    main()
