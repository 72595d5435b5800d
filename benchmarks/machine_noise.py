"""Two questions about a noisy machine, asked of the bundled model with the real llama-bench (docs/bench.md, "Why the rounds look like this"):

  estimators  would another per-round estimator than the best repetition spread less?  TRIALS times: 5 rounds of
              2 contenders (-t 2, llama-bench's default threads), 8 processes of 10 repetitions each taken in turn;
              the spread over the rounds when a round is scored by its best, 90th and 75th percentile and median
              repetition.
  gate        could bench wait for a fast phase?  N processes of tg128 x 10, each with the host loop
              (bench.host_speed) read just before and just after; the correlation of those with the process's best.
  drift       does the machine's speed move over minutes, which no round of seconds can average out?  N processes
              of tg128 x REPS back to back (about 5 s each here): each one's median and best tok/s, and the share
              of CPU time the hypervisor reports as stolen (/proc/stat) while it ran.

    python benchmarks/machine_noise.py estimators --trials 3
    python benchmarks/machine_noise.py gate --processes 60
    python benchmarks/machine_noise.py drift --processes 20 --reps 150
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ccmoe_runtime.bench.bench import host_speed
from ccmoe_runtime.engine.build import find_engine  # noqa: E402
from ccmoe_runtime.engine.tools import llama_bench  # noqa: E402
from ccmoe_runtime.model.sources import bundled_model_path  # noqa: E402

ESTIMATORS = {"best": np.max, "p90": lambda x: np.percentile(x, 90), "p75": lambda x: np.percentile(x, 75),
              "median": np.median}


def repetitions(args: list[str], n_prompt: int = 512, reps: int = 10) -> dict[str, list[float]]:
    """One llama-bench process on the bundled model (bench.llama_bench): tokens/s of each repetition, by measure."""
    r = llama_bench(find_engine(), bundled_model_path(), args, reps=reps, n_prompt=n_prompt)
    if not r["ok"]:
        raise SystemExit(f"llama-bench failed: {r['error']}")
    return {key: r[key] for key in ("pp", "tg") if key in r}


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


def cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat's first line: user, nice, system, idle, iowait, irq, softirq,
    steal, ...)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def drift(processes: int, reps: int) -> None:
    medians = []
    for i in range(processes):
        before, started = cpu_times(), time.monotonic()
        tg = repetitions([], n_prompt=0, reps=reps)["tg"]
        delta = [b - a for a, b in zip(before, cpu_times())]
        medians.append(float(np.median(tg)))
        print(f"process {i + 1:2d}: median {medians[-1]:7.0f}  best {max(tg):7.0f} tok/s  "
              f"{time.monotonic() - started:4.1f} s  stolen {delta[7] / max(sum(delta), 1):.1%}", flush=True)
    m = np.array(medians)
    window = min(5, len(m))                 # as many as a bench's rounds
    print(f"{processes} processes of tg128 x {reps}: medians {m.min():.0f}-{m.max():.0f} tok/s, slowest/fastest "
          f"{m.min() / m.max():.2f}, spread of any {window} back to back up to "
          f"{max((w.max() - w.min()) / np.median(w) for w in np.lib.stride_tricks.sliding_window_view(m, window)):.0%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="question", required=True)
    sub.add_parser("estimators").add_argument("--trials", type=int, default=3)
    sub.add_parser("gate").add_argument("--processes", type=int, default=60)
    d = sub.add_parser("drift")
    d.add_argument("--processes", type=int, default=20)
    d.add_argument("--reps", type=int, default=150)
    a = p.parse_args()
    if a.question == "estimators":
        estimators(a.trials)
    elif a.question == "gate":
        gate(a.processes)
    else:
        drift(a.processes, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
