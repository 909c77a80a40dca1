"""Rank 1 hangs (never joins the collective); rank 0 must fail after the collective timeout, not wait.

Usage (under torchrun, 2 processes): python hung_peer_worker.py TIMEOUT_S
"""

from __future__ import annotations

import sys
import time

from rloop.train.distributed import init_world

if __name__ == "__main__":
    world = init_world(int(sys.argv[1]))
    if world.rank == 1:
        time.sleep(600)  # hung: alive, but never reaching the next collective
    t0 = time.monotonic()
    try:
        world.sum([1.0])
    except Exception as err:  # gloo raises on the timeout; the stage would exit non-zero here
        print(f"rank 0: collective failed after {time.monotonic() - t0:.1f} s: {type(err).__name__}", flush=True)
        sys.exit(3)
    sys.exit(0)
