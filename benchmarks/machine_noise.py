"""Two questions about a noisy machine, asked of the bundled model with the real llama-bench (docs/bench.md):

  estimators  would another per-round estimator than the best repetition spread less?  TRIALS times: 5 rounds of
              2 contenders (-t 2, llama-bench's default threads), 8 processes of 10 repetitions each taken in turn;
              the spread over the rounds when a round is scored by its best, 90th and 75th percentile and median
              repetition.
  gate        could bench wait for a fast phase?  N processes of tg128 x 10, each with the host loop
              (bench.host_speed) read just before and just after; the correlation of those with the process's best.

    python benchmarks/machine_noise.py estimators --trials 3
    python benchmarks/machine_noise.py gate --processes 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ccmoe_runtime.bench import host_speed  # noqa: E402
from ccmoe_runtime.engine import find_engine  # noqa: E402
from ccmoe_runtime.sources import bundled_model_path  # noqa: E402

ESTIMATORS = {"best": np.max, "p90": lambda x: np.percentile(x, 90), "p75": lambda x: np.percentile(x, 75),
              "median": np.median}


def repetitions(args: list[str], n_prompt: int = 512, reps: int = 10) -> dict[str, list[float]]:
    """One llama-bench process on the bundled model: tokens/s of each repetition, by measure."""
    cmd = [str(find_engine().tool("llama-bench")), "-m", str(bundled_model_path()), "-p", str(n_prompt), "-n", "128",
           "-r", str(reps), "-o", "json", *args]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {("pp" if r["n_prompt"] else "tg"): r["samples_ts"] for r in rows}


def estimators(trials: int) -> None:
    contenders = {"-t 2": ["-t", "2"], "default": []}
    for trial in range(trials):
        rounds = {n: {"pp": [], "tg": []} for n in contenders}
        for _ in range(5):
            pooled = {n: {"pp": [], "tg": []} for n in contenders}
            for _slot in range(8):
                for name, args in contenders.items():
                    for key, values in repetitions(args).items():
                        pooled[name][key] += values
            for name in contenders:
                for key in ("pp", "tg"):
                    rounds[name][key].append(pooled[name][key])
        for name in contenders:
            for key in ("pp", "tg"):
                cells = []
                for est, f in ESTIMATORS.items():
                    scores = [f(r) for r in rounds[name][key]]
                    cells.append(f"{est} {(max(scores) - min(scores)) / np.median(scores):6.1%}")
                print(f"trial {trial + 1} {name:<8} {key}: " + "  ".join(cells), flush=True)


def gate(processes: int) -> None:
    rows = []
    for _ in range(processes):
        before = host_speed()
        best = max(repetitions([], n_prompt=0)["tg"])
        rows.append((before, host_speed(), best))
    a = np.array(rows)
    print(f"{processes} processes, best tg {a[:, 2].min():.0f}-{a[:, 2].max():.0f} tok/s; host loop "
          f"{a[:, 0].min() / 1e6:.1f}-{a[:, 0].max() / 1e6:.1f} M/s")
    print(f"correlation with the best tg: loop before {np.corrcoef(a[:, 0], a[:, 2])[0, 1]:.2f}, "
          f"after {np.corrcoef(a[:, 1], a[:, 2])[0, 1]:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="question", required=True)
    sub.add_parser("estimators").add_argument("--trials", type=int, default=3)
    sub.add_parser("gate").add_argument("--processes", type=int, default=60)
    a = p.parse_args()
    estimators(a.trials) if a.question == "estimators" else gate(a.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
