"""Which interval on B/A should the regression gate use?  Candidates compared on simulated paired rounds.

Simulated machine (log speed per sample, samples A and B alternating, one round = one A and one B, the order
swapped every round as the gate's rounds do):

  ar1        AR(1) drift, 0.9 correlation from one sample to the next, stationary sd 0.10 (15-35 % over a run)
  regime     two speeds 1.35x apart, a switch with probability 0.15 at each sample (a round straddles one often)
  flicker    two speeds 1.45x apart switching with probability 0.35 per sample (this machine's restless day)
  trend      ar1 plus a steady 20 % slow-down over the run

plus per-sample noise that only slows a run down: |N(0, s)| with s in 3-8 %, and a 5 % chance per sample of a
30 % hiccup.  Every candidate sees the per-round log-ratios d = log(b / a) (t, wilcoxon, sign, boot-*), or, for
`unpaired`, the two samples as if from different runs.

    python benchmarks/verdict_methods.py fixed   [--runs 2000]   # each method at fixed n: coverage and power
    python benchmarks/verdict_methods.py looks   [--runs 2000]   # the sequential driver: error rates, rounds used

`fixed` prints, per machine model and n, for each method: the one-sided miss rate of the upper bound at the
true ratio (nominal 5 %: the false-alarm rate of a gate sitting exactly at its limit), the median width of the
90 % interval in log units, and the share of runs a 25 % slow-down is flagged at P = 10 %.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ccmoe_runtime.bench import verdict as V  # noqa: E402

MODELS = ("ar1", "regime", "flicker", "trend")


def simulate(model: str, n: int, ratio: float, runs: int, rng: np.random.Generator, noise: float | None = None):
    """(a, b): tokens/s arrays of shape (runs, n), B truly `ratio` times A, on a drifting machine (see above)."""
    t = 2 * n
    if model in ("ar1", "trend"):
        phi, sd = 0.9, 0.10
        x = np.empty((runs, t))
        x[:, 0] = rng.normal(0, sd, runs)
        eps = rng.normal(0, sd * math.sqrt(1 - phi * phi), (runs, t))
        for i in range(1, t):
            x[:, i] = phi * x[:, i - 1] + eps[:, i]
        if model == "trend":
            x += np.linspace(0, math.log(0.8), t)[None, :]
    else:
        gap, q = (math.log(1.35), 0.15) if model == "regime" else (math.log(1.45), 0.35)
        state = np.empty((runs, t), dtype=bool)
        state[:, 0] = rng.random(runs) < 0.5
        flips = rng.random((runs, t)) < q
        for i in range(1, t):
            state[:, i] = state[:, i - 1] ^ flips[:, i]
        x = np.where(state, 0.0, -gap)
    s = rng.uniform(0.03, 0.08, (runs, 1)) if noise is None else noise
    x = x - np.abs(rng.normal(0, 1, (runs, t))) * s
    x = x + np.where(rng.random((runs, t)) < 0.05, math.log(0.7), 0.0)
    speed = np.exp(x)
    first_a = (np.arange(n) % 2 == 0)[None, :]               # A B, B A, A B, ...
    s0, s1 = speed[:, 0::2], speed[:, 1::2]
    a = np.where(first_a, s0, s1) * 1000.0
    b = np.where(first_a, s1, s0) * 1000.0 * ratio
    return a, b


# ---------------------------------------------------------------- candidates: (estimate, low, high) in log units

def t_interval(d, conf):
    n = d.shape[1]
    m, s = d.mean(1), d.std(1, ddof=1)
    q = V.t_quantile(1 - (1 - conf) / 2, n - 1)
    return m, m - q * s / math.sqrt(n), m + q * s / math.sqrt(n)


def wilcoxon(d, conf):
    out = np.array([V.signed_rank_interval(row, conf) for row in d])
    return out[:, 0], out[:, 1], out[:, 2]


def sign(d, conf):
    n = d.shape[1]
    k = V.sign_rank_k(n, (1 - conf) / 2)
    s = np.sort(d, 1)
    lo = s[:, k - 1] if k >= 1 else np.full(len(d), -np.inf)
    hi = s[:, n - k] if k >= 1 else np.full(len(d), np.inf)
    return np.median(d, 1), lo, hi


def _boot(d, stat, rng, b=1000):
    n = d.shape[1]
    idx = rng.integers(0, n, (b, n))
    return np.stack([stat(row[idx], axis=1) for row in d])          # (runs, b)


def boot_percentile(stat):
    rng = np.random.default_rng(7)

    def f(d, conf):
        bs = _boot(d, stat, rng)
        a = (1 - conf) / 2
        return stat(d, axis=1), np.quantile(bs, a, axis=1), np.quantile(bs, 1 - a, axis=1)
    return f


BCA_RNG = np.random.default_rng(8)


def boot_bca(d, conf, rng=BCA_RNG):
    est, lo, hi = [], [], []
    for row in d:
        e, l, h, _ = V.bca_mean_interval(row, conf, rng=rng, resamples=1000)
        est.append(e), lo.append(l), hi.append(h)
    return np.array(est), np.array(lo), np.array(hi)


def unpaired(a, b, conf):
    out = np.array([V.rank_sum_interval(np.log(x), np.log(y), conf) for x, y in zip(a, b)])
    return out[:, 0], out[:, 1], out[:, 2]


METHODS = {"t": t_interval, "wilcoxon": wilcoxon, "sign": sign, "boot-mean": boot_percentile(np.mean),
           "boot-median": boot_percentile(np.median), "bca-mean": boot_bca}


def fixed(runs: int) -> None:
    conf, limit = 0.90, math.log(0.9)
    print(f"{runs} runs per cell; 90 % two-sided intervals (upper bound one-sided 5 %)")
    print(f"{'model':<8} {'n':>3} {'method':<12} {'hi<true':>7} {'lo>true':>7} {'width':>7} {'flag 25%':>8} "
          f"{'ok @1.0':>8}")
    for model in MODELS:
        for n in (5, 8, 12, 20, 30):
            rng = np.random.default_rng(1000 + n)
            a0, b0 = simulate(model, n, 1.0, runs, rng)
            a1, b1 = simulate(model, n, 0.75, runs, rng)
            d0, d1 = np.log(b0 / a0), np.log(b1 / a1)
            rows = {name: (f(d0, conf), f(d1, conf)) for name, f in METHODS.items()}
            rows["unpaired"] = (unpaired(a0, b0, conf), unpaired(a1, b1, conf))
            for name, ((e0, l0, h0), (e1, l1, h1)) in rows.items():
                hi_miss = np.mean(h0 < 0) * 0.5 + np.mean(h1 < math.log(0.75)) * 0.5   # upper bound below truth
                lo_miss = np.mean(l0 > 0) * 0.5 + np.mean(l1 > math.log(0.75)) * 0.5
                print(f"{model:<8} {n:>3} {name:<12} {hi_miss:7.3f} {lo_miss:7.3f} {np.median(h0 - l0):7.3f} "
                      f"{np.mean(h1 < limit):8.3f} {np.mean(l0 > limit):8.3f}", flush=True)


class FakeClock:
    """A clock the simulated rounds advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_decide(a, b, round_s: float = 1.5, **kw):
    """verdict.decide over one simulated run's rounds, each `round_s` seconds on a fake clock."""
    clock = FakeClock()
    rounds = iter(zip(a, b))

    def next_round():
        clock.now += round_s
        return next(rounds)
    return V.decide(next_round, clock=clock, **kw)


CONFIGS = [("wilcoxon", 1, 0.90), ("wilcoxon", 3, 0.90), ("wilcoxon", 4, 0.90), ("wilcoxon", 6, 0.90),
           ("wilcoxon", 26, 0.90), ("t", 4, 0.90), ("t", 26, 0.90), ("wilcoxon", 4, 0.95), ("t", 4, 0.95)]


def looks(runs: int) -> None:
    """The sequential driver (verdict.decide) on simulated rounds, for methods and numbers of looks."""
    print(f"{runs} runs per cell; decide(max_regression=0.10, min_rounds=5, max_rounds=30, confidence=0.90)")
    print("false alarm = 'regression' at a true B/A of 0.90 (the limit: nominal <= 5 %) and of 1.00; "
          "flagged = 'regression' at 0.75")
    print(f"{'model':<8} {'method':<9} {'looks':>5} {'conf':>5} {'FA@0.90':>7} {'FA@1.00':>7} {'ok@1.00':>7} {'flag@0.75':>9} "
          f"{'rounds@1.0':>10} {'rounds@0.75':>11}")
    for model in MODELS:
        data = {ratio: simulate(model, 30, ratio, runs, np.random.default_rng(int(ratio * 100)))
                for ratio in (1.0, 0.9, 0.75)}
        for method, k, conf in CONFIGS:
                got, used = {}, {}
                for ratio, (a, b) in data.items():
                    vs = [run_decide(a[i], b[i], max_regression=0.10, min_rounds=5, max_rounds=30,
                                     time_limit_s=1e9, looks=k, method=method, confidence=conf)
                          for i in range(runs)]
                    got[ratio] = {d: np.mean([v.decision == d for v in vs]) for d in ("regression", "ok")}
                    used[ratio] = np.median([v.rounds for v in vs])
                print(f"{model:<8} {method:<9} {k:>5} {conf:5.2f} {got[0.9]['regression']:7.3f} {got[1.0]['regression']:7.3f} "
                      f"{got[1.0]['ok']:7.3f} {got[0.75]['regression']:9.3f} {used[1.0]:10.0f} {used[0.75]:11.0f}",
                      flush=True)


def unpaired_runs(runs: int) -> None:
    """A baseline from one run against this run, each its own machine history: the between-run change."""
    print(f"{runs} runs per cell; unpaired_verdict(confidence=0.90, max_regression=0.10): baseline and current are "
          "separate simulated runs of n rounds each")
    print(f"{'model':<8} {'n':>3} {'moved':>6} {'FA@0.90':>7} {'FA@1.00':>7} {'ok@1.00':>7} {'flag@0.75':>9}")
    for model in MODELS:
        for n in (5, 10, 20):
            rng = np.random.default_rng(500 + n)
            got = {}
            moved = []
            for ratio in (0.9, 1.0, 0.75):
                base, _ = simulate(model, n, 1.0, runs, rng)
                _, now = simulate(model, n, ratio, runs, rng)
                vs = [V.unpaired_verdict(base[i], now[i], 0.10, 0.90) for i in range(runs)]
                got[ratio] = {d: np.mean([v.decision == d for v in vs]) for d in ("regression", "ok")}
                moved += [v.machine_moved for v in vs]
            print(f"{model:<8} {n:>3} {np.median(moved):6.0%} {got[0.9]['regression']:7.3f} "
                  f"{got[1.0]['regression']:7.3f} {got[1.0]['ok']:7.3f} {got[0.75]['regression']:9.3f}", flush=True)


def movement(runs: int) -> None:
    """How much each simulated machine moves over a run: verdict.machine_movement of 10 and 30 rounds."""
    for model in MODELS:
        rng = np.random.default_rng(3)
        cells = []
        for n in (10, 30):
            a, b = simulate(model, n, 1.0, runs, rng)
            m = [V.machine_movement(a[i], b[i]) for i in range(runs)]
            cells.append(f"{n} rounds: median {np.median(m):.0%} (p10 {np.percentile(m, 10):.0%}, "
                         f"p90 {np.percentile(m, 90):.0%})")
        print(f"{model:<8} " + "; ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("fixed", "looks", "unpaired", "movement"))
    p.add_argument("--runs", type=int, default=2000)
    args = p.parse_args()
    started = time.monotonic()
    {"fixed": fixed, "looks": looks, "unpaired": unpaired_runs, "movement": movement}[args.what](args.runs)
    print(f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
