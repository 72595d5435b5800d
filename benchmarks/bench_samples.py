"""Summarize llama-bench's JSON output (stdin) in one line per test: the wall time now, a label, and the best and
median tokens/s of its repetitions; with --chunks N, the best/median of every N repetitions in order (does one
process change speed while it runs?). Used by gpu_common.sh's spread probe."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("label")
    p.add_argument("--chunks", type=int, default=0)
    a = p.parse_args()
    text = sys.stdin.read()
    if not text.strip():
        print(f"{time.strftime('%H:%M:%S')} {a.label}: llama-bench printed nothing (failed)")
        return 1
    for row in json.loads(text):
        ts = row["samples_ts"]
        line = (f"{time.strftime('%H:%M:%S')} {a.label} pp{row['n_prompt']} tg{row['n_gen']} t{row['n_threads']}: "
                f"best {max(ts):.0f} median {statistics.median(ts):.0f} n={len(ts)}")
        if a.chunks:
            line += "\n  chunks best/median: " + " ".join(
                f"{max(ts[i:i + a.chunks]):.0f}/{statistics.median(ts[i:i + a.chunks]):.0f}"
                for i in range(0, len(ts), a.chunks))
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
