"""Hold GPU memory so that only --free-mib MiB stay free: a big GPU emulates a smaller card for every contender.

Run in the background; prints one JSON line when the memory is held, then sleeps until killed (SIGTERM).
Plain cudaMalloc through PyTorch's allocator (no managed memory)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

MIB = 1024**2


def hold(free_mib: int) -> tuple[list, int, int]:
    """Allocate until the device's free memory is within 2 MiB of `free_mib`; returns the blocks and free/total."""
    import torch

    torch.cuda.init()
    blocks = []
    free, total = torch.cuda.mem_get_info()
    for step in (1024 * MIB, 64 * MIB, 2 * MIB):
        while free - free_mib * MIB >= step:
            blocks.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
            blocks[-1].fill_(1)
            free, total = torch.cuda.mem_get_info()
    return blocks, free // MIB, total // MIB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--free-mib", type=int, required=True)
    a = p.parse_args()
    blocks, free, total = hold(a.free_mib)
    print(json.dumps({"held_mib": len(blocks) and sum(b.numel() for b in blocks) // MIB, "free_mib": free,
                      "total_mib": total}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
