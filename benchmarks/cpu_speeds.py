"""Each CPU's own speed, now: the pure-Python loop of `ccmoe_runtime.bench.bench.host_speed` pinned to one CPU at a
time (sched_setaffinity), scanned --scans times, one line per scan in millions of iterations per second.
A virtual machine's vCPUs can run at different speeds at one moment (a busy hyperthread sibling on the host), and
a process whose launching thread sits on a slow one runs slow: this shows whether this machine does that."""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ccmoe_runtime.bench.bench import host_speed  # noqa: E402


def scan_cpus(cpus: list[int]) -> list[float]:
    """Millions of loop iterations per second on each CPU in turn (about 4 ms each)."""
    speeds = []
    for cpu in cpus:
        os.sched_setaffinity(0, {cpu})
        speeds.append(host_speed(loops=20_000, tries=3) / 1e6)
    os.sched_setaffinity(0, set(cpus))
    return speeds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scans", type=int, default=3)
    p.add_argument("--pause", type=float, default=1.0, help="seconds between scans")
    p.add_argument("--pick", choices=("fastest", "slowest"), help="after one scan, print only that CPU's number")
    a = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if a.pick:
        speeds = scan_cpus(cpus)
        pick = max if a.pick == "fastest" else min
        print(cpus[speeds.index(pick(speeds))])
        return 0
    for scan in range(a.scans):
        speeds = scan_cpus(cpus)
        print(f"{time.strftime('%H:%M:%S')} scan {scan + 1}: " + " ".join(f"{s:.1f}" for s in speeds)
              + f"  (min/max {min(speeds) / max(speeds):.2f})", flush=True)
        if scan + 1 < a.scans:
            time.sleep(a.pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
