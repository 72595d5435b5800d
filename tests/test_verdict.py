"""The regression gate's statistics (ccmoe_runtime.bench.verdict): exact distributions and intervals checked against
values worked by hand, decisions on tables of cases, and the gate's error rates on simulated drifting machines
(fixed seeds, real computations on generated data; no llama.cpp)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ccmoe_runtime.bench import verdict as V

# ---------------------------------------------------------------- distributions

@pytest.mark.parametrize("p, df, want", [
    (0.975, 4, 2.776445),     # why: the textbook 95 % two-sided t at n = 5
    (0.95, 29, 1.699127),     # why: one-sided 5 % at n = 30
    (0.995, 1, 63.65674),     # why: the heaviest tail, df = 1 (Cauchy): tan(pi * 0.495)
    (0.5, 3, 0.0),            # why: the median of a symmetric distribution
    (0.025, 10, -2.228139),   # why: lower tail by symmetry
])
def test_t_quantile(p, df, want):
    assert V.t_quantile(p, df) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("n, want", [
    (1, [1, 1]),                          # why: T+ is 0 or 1, each half the time
    (3, [1, 1, 1, 2, 1, 1, 1]),           # why: sums of subsets of {1, 2, 3}: 3 is reached as 3 and as 1 + 2
    (4, [1, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1]),  # why: 16 subsets of {1..4}, symmetric about 5
])
def test_signed_rank_pmf(n, want):
    assert V.signed_rank_pmf(n) * 2 ** n == pytest.approx(want)


@pytest.mark.parametrize("m, n, want", [
    (1, 1, [1, 1]),               # why: one of each: U is 0 or 1
    (2, 2, [1, 1, 2, 1, 1]),      # why: the 6 orders of xxyy; U = 2 for xyyx and yxxy
    (1, 3, [1, 1, 1, 1]),         # why: the lone x can sit in any of 4 places
])
def test_rank_sum_pmf(m, n, want):
    assert V.rank_sum_pmf(m, n) * math.comb(m + n, m) == pytest.approx(want)


def test_rank_sum_pmf_is_the_gaussian_binomial():
    pmf = V.rank_sum_pmf(5, 5) * 252
    assert pmf[0] == pytest.approx(1) and pmf.sum() == pytest.approx(252)     # C(10, 5) orders, one with U = 0
    assert pmf == pytest.approx(pmf[::-1])                                     # symmetric about mn / 2
    assert V.rank_sum_pmf(3, 7) * 120 == pytest.approx(V.rank_sum_pmf(7, 3) * 120)   # symmetric in m and n


@pytest.mark.parametrize("n, alpha, k", [
    (5, 0.05, 1),     # why: P(all 5 one sign) = 1/32 <= 5 %, P(<= 1) = 6/32 is not
    (10, 0.025, 2),   # why: P(Bin(10, 1/2) <= 1) = 11/1024 = 1.1 %, P(<= 2) = 5.5 %
    (3, 0.05, 0),     # why: 1/8 > 5 %: no bound from 3 values
])
def test_sign_rank_k(n, alpha, k):
    assert V.sign_rank_k(n, alpha) == k


# ---------------------------------------------------------------- intervals

@pytest.mark.parametrize("d, conf, want", [
    ([1, 2, 3, 4, 5], 0.90, (3.0, 1.0, 5.0, 0.9375)),       # why: n = 5 reaches 1 - 2/32 at most: [min, max]
    ([-1, 2, 3, 4, 5, 6, 7], 0.95, (4.0, 1.0, 6.0, 1 - 6 / 128)),  # why: P(T+ <= 2) = 3/128: 3rd Walsh averages
    ([1, 2, 3], 0.90, (2.0, -math.inf, math.inf, 1.0)),      # why: 1/8 > 5 %: 3 rounds cannot bound at 90 %
])
def test_signed_rank_interval(d, conf, want):
    assert V.signed_rank_interval(d, conf) == pytest.approx(want)


@pytest.mark.parametrize("x, y, conf, want", [
    ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], 0.95, (5.0, 2.0, 8.0, 1 - 2 * 4 / 252)),  # why: P(U <= 2) = 4/252: 3rd
    ([1, 2], [3, 4], 0.90, (2.0, -math.inf, math.inf, 1.0)),                       # why: 1/6 > 5 %: no bound
])
def test_rank_sum_interval(x, y, conf, want):
    assert V.rank_sum_interval(x, y, conf) == pytest.approx(want)


def test_t_and_bca_intervals_centre_on_the_mean():
    d = [0.1, -0.05, 0.02, 0.07, -0.01, 0.04]
    est, lo, hi, conf = V.t_interval(d, 0.9)
    assert est == pytest.approx(np.mean(d)) and lo < est < hi and conf == 0.9
    half = V.t_quantile(0.95, 5) * np.std(d, ddof=1) / math.sqrt(6)
    assert hi - est == pytest.approx(half)
    est_b, lo_b, hi_b, _ = V.bca_mean_interval(d, 0.9, rng=np.random.default_rng(1))
    assert est_b == pytest.approx(np.mean(d)) and lo_b < est_b < hi_b


# ---------------------------------------------------------------- verdicts on tables of cases

A = [4000, 3100, 4400, 3600, 2900, 4200, 3900, 3300, 4100, 3000]       # a machine moving by about 40 %
WOBBLE = [1.01, 0.99, 1.02, 0.98, 1.00, 1.015, 0.985, 1.005, 0.995, 1.0]


@pytest.mark.parametrize("factor, decision", [
    (0.70, "regression"),    # why: 30 % slower in every round: the whole interval lies below 0.90
    (1.00, "ok"),            # why: the machine moved 40 % but B followed A: the pairing removes it
    (1.30, "ok"),            # why: faster is never a regression
    (0.90, "inconclusive"),  # why: exactly at the limit: the interval straddles it
])
def test_paired_decision(factor, decision):
    v = V.paired_verdict(A, [x * factor * w for x, w in zip(A, WOBBLE)], max_regression=0.10)
    assert v.decision == decision
    assert v.low <= v.ratio <= v.high and v.ratio == pytest.approx(factor, rel=0.02)
    assert v.rounds == 10 and v.paired and v.machine_moved == pytest.approx(0.40, abs=0.05)


def test_inconclusive_says_how_far_the_machine_moved():
    v = V.paired_verdict(A, [x * 0.9 * w for x, w in zip(A, WOBBLE)], max_regression=0.10)
    assert v.reason.startswith("inconclusive: the machine moved by 4") and "10 rounds" in v.reason
    line = V.summary_line(v)
    assert line.startswith("inconclusive: B/A 0.9") and "limit 0.900" in line
    assert line.endswith(" - the machine moved by 42% over 10 rounds; more rounds or a quieter machine would settle it")


@pytest.mark.parametrize("a, b, match", [
    ([100, 100], [100], "paired rounds"),        # why: a round yields one sample of each
    ([100, -1], [100, 100], "positive"),         # why: tokens/s are positive
    ([100, float("nan")], [1, 1], "positive"),   # why: a failed run is not a sample
])
def test_paired_verdict_refuses_bad_samples(a, b, match):
    with pytest.raises(ValueError, match=match):
        V.paired_verdict(a, b)


@pytest.mark.parametrize("max_regression, confidence", [
    (10, 0.9),      # why: percent where a fraction is meant (10 % is 0.10)
    (0.1, 95),      # why: percent again
    (0.0, 0.9),     # why: no room at all
])
def test_verdict_refuses_bad_levels(max_regression, confidence):
    with pytest.raises(ValueError):
        V.paired_verdict(A, A, max_regression=max_regression, confidence=confidence)


def test_one_round_is_too_few():
    v = V.paired_verdict([100.0], [50.0])
    assert v.decision == "inconclusive" and "too few" in v.reason and v.ratio == 0.5


QUIET = [4000 * w for w in WOBBLE]                                    # a machine holding one speed


@pytest.mark.parametrize("base, factor, decision", [
    (QUIET, 0.80, "regression"),   # why: 20 % below, runs that scatter 3 %: the interval lies below 0.90
    (QUIET, 0.95, "ok"),           # why: 5 % slower is within the limit, and the runs are quiet enough to say so
    (A, 0.60, "regression"),       # why: far below the limit even against a 40 % scatter
    (A, 1.00, "inconclusive"),     # why: the same samples, but a 40 % scatter without pairs hides 10 %
])
def test_unpaired_decision(base, factor, decision):
    v = V.unpaired_verdict(base, [x * factor for x in reversed(base)], max_regression=0.10)
    assert v.decision == decision and not v.paired and v.method == "mann-whitney"
    assert "machine" in v.reason and "between" in v.reason       # it says what it cannot see
    assert "unpaired" in V.summary_line(v)


@pytest.mark.parametrize("lo, hi, looks, want", [
    (5, 30, 3, [5, 12, 30]),       # why: geometric: each look has about 2.4x the rounds of the last
    (5, 30, 4, [5, 9, 17, 30]),    # why: four looks
    (5, 5, 3, [5]),                # why: one possible look
    (5, 30, 1, [30]),              # why: a single look at the end: a fixed-n test
    (5, 6, 4, [5, 6]),             # why: duplicates dropped
])
def test_look_schedule(lo, hi, looks, want):
    assert V.look_schedule(lo, hi, looks) == want


@pytest.mark.parametrize("method, alpha, want", [
    ("wilcoxon", 0.05 / 3, 6),     # why: 2^-6 = 1.6 % <= 1.67 % (the default split), 2^-5 is not
    ("wilcoxon", 0.0125, 7),       # why: 2^-7 = 0.8 %
    ("wilcoxon", 1 / 32, 5),       # why: exactly reached at 5
    ("t", 0.001, 2),               # why: t bounds at any level from 2 rounds
])
def test_first_bounded_rounds(method, alpha, want):
    assert V.first_bounded_rounds(method, alpha) == want


# ---------------------------------------------------------------- the sequential driver

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def scripted(pairs, clock, round_s=2.0):
    """next_round over a fixed list of (a, b), each round taking round_s on the fake clock."""
    it = iter(pairs)

    def next_round():
        clock.now += round_s
        return next(it)
    return next_round


def rounds_of(factor, n=30):
    return [(a, a * factor * w) for a, w in zip((A * 3)[:n], (WOBBLE * 3)[:n])]


def test_decide_stops_at_the_first_look_that_can_decide():
    clock, seen = FakeClock(), []
    v = V.decide(scripted(rounds_of(0.7), clock), max_regression=0.10, min_rounds=5, max_rounds=30,
                 time_limit_s=1000, clock=clock, progress=seen.append)
    # 3 looks share 5 % one-sided: 1.67 % each; the signed-rank bound needs 6 rounds for that, so looks at 6, 13, 30
    assert v.decision == "regression" and v.rounds == 6 and v.looks == 1 and v.stopped_by == "conclusive"
    assert v.confidence == pytest.approx(1 - 2 / 64) and v.overall_confidence == 0.90
    assert v.elapsed_s == pytest.approx(12.0) and len(seen) == 1


def test_decide_inconclusive_at_the_limit_uses_every_look():
    clock, seen = FakeClock(), []
    v = V.decide(scripted(rounds_of(0.9), clock), max_regression=0.10, max_rounds=30, time_limit_s=1000,
                 clock=clock, progress=seen.append)
    assert v.decision == "inconclusive" and v.rounds == 30 and v.looks == 3 and v.stopped_by == "max_rounds"
    assert [s.rounds for s in seen] == [6, 13, 30]
    spent = sum((1 - s.confidence) / 2 for s in seen)
    assert spent <= 0.05 + 1e-12                      # the looks together never spend more than asked


def test_decide_time_limit_spends_what_is_left():
    clock = FakeClock()
    v = V.decide(scripted(rounds_of(0.7), clock), max_regression=0.10, min_rounds=5, max_rounds=30,
                 time_limit_s=11.0, clock=clock)
    # 5 rounds of 2 s; a 6th would end at 12 s > 11 s: the last look, at 5 rounds, may spend the whole 5 %
    assert v.stopped_by == "time_limit" and v.rounds == 5 and v.decision == "regression"
    assert v.confidence == pytest.approx(1 - 2 / 32)


def test_decide_time_limit_inconclusive_says_so():
    clock = FakeClock()
    v = V.decide(scripted(rounds_of(0.9), clock, round_s=5.0), max_regression=0.10, time_limit_s=20.0,
                 clock=clock)
    assert v.decision == "inconclusive" and v.stopped_by == "time_limit" and "time limit" in v.reason


# ---------------------------------------------------------------- error rates on simulated drifting machines

def machine(kind: str, rounds: int, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paired rounds on a simulated shared VM: log speed an AR(1) (0.9 from one sample to the next, sd 0.10) or
    two speeds 1.3x apart switching with probability 0.1 at each sample; 3-8 % per-sample noise that only slows
    a run down; A then B, B then A, ... one sample each; B truly `ratio` times A."""
    t = 2 * rounds
    if kind == "ar1":
        x = np.empty(t)
        x[0] = rng.normal(0, 0.10)
        for i in range(1, t):
            x[i] = 0.9 * x[i - 1] + rng.normal(0, 0.10 * math.sqrt(1 - 0.81))
    else:
        fast = np.empty(t, dtype=bool)
        fast[0] = rng.random() < 0.5
        for i in range(1, t):
            fast[i] = fast[i - 1] ^ (rng.random() < 0.1)
        x = np.where(fast, 0.0, -math.log(1.3))
    speed = 4000.0 * np.exp(x - np.abs(rng.normal(0, rng.uniform(0.03, 0.08), t)))
    swap = np.arange(rounds) % 2 == 1
    a = np.where(swap, speed[1::2], speed[0::2])
    b = np.where(swap, speed[0::2], speed[1::2]) * ratio
    return a, b


def gate_decisions(kind: str, ratio: float, runs: int, seed: int) -> tuple[dict, list[V.Verdict]]:
    rng = np.random.default_rng(seed)
    verdicts = []
    for _ in range(runs):
        a, b = machine(kind, 30, ratio, rng)
        clock = FakeClock()
        verdicts.append(V.decide(scripted(list(zip(a, b)), clock, round_s=1.5), max_regression=0.10,
                                 min_rounds=5, max_rounds=30, time_limit_s=60.0, clock=clock))
    share = {d: np.mean([v.decision == d for v in verdicts]) for d in ("regression", "ok", "inconclusive")}
    return share, verdicts


@pytest.mark.parametrize("kind", ["ar1", "regime"])
def test_simulated_machine_moves_15_to_35_percent(kind):
    rng = np.random.default_rng(11)
    moved = [V.machine_movement(*machine(kind, 12, 1.0, rng)) for _ in range(300)]
    assert 0.15 <= np.median(moved) <= 0.35      # the premise of the rate tests: a machine as restless as ours


@pytest.mark.parametrize("kind", ["ar1", "regime"])
def test_no_false_alarm_without_a_change(kind):
    share, verdicts = gate_decisions(kind, 1.0, runs=400, seed=21)
    assert share["regression"] <= 0.10          # the requirement; in fact none
    assert share["regression"] == 0.0
    assert share["ok"] >= 0.85                   # and the gate mostly clears an unchanged build
    assert np.median([v.machine_moved for v in verdicts]) >= 0.12


@pytest.mark.parametrize("kind", ["ar1", "regime"])
def test_false_alarms_at_the_limit_stay_near_nominal(kind):
    # B truly 10 % slower, exactly the limit: the worst case; nominal (1 - 0.90) / 2 = 5 % over all looks
    share, _ = gate_decisions(kind, 0.90, runs=2000, seed=22)
    assert share["regression"] <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 2000)


@pytest.mark.parametrize("kind", ["ar1", "regime"])
def test_a_25_percent_slowdown_is_flagged(kind):
    share, verdicts = gate_decisions(kind, 0.75, runs=400, seed=23)
    assert share["regression"] >= 0.90
    assert share["ok"] == 0.0                    # never cleared
    assert np.median([v.rounds for v in verdicts]) <= 13


def test_unpaired_misses_what_pairing_sees():
    """The same data: pairing flags a 16 % slowdown that the unpaired interval (machine drift inside) often cannot."""
    rng = np.random.default_rng(31)
    paired = unpaired = 0
    for _ in range(200):
        a, b = machine("ar1", 12, 0.84, rng)
        paired += V.paired_verdict(a, b, 0.10).decision == "regression"
        unpaired += V.unpaired_verdict(a, b, 0.10).decision == "regression"
    assert paired >= 170 and unpaired <= paired - 40     # here 186 and 131 of 200


def test_decide_time_limit_allows_for_the_longest_round():
    clock = FakeClock()
    lengths = iter([1.0, 10.0, 1.0, 1.0])

    def next_round():
        clock.now += next(lengths)
        return 100.0, 100.0

    v = V.decide(next_round, time_limit_s=15.0, clock=clock)
    # after 11 s a third round might last 10 s again and end at 21 s: not started
    assert v.rounds == 2 and v.stopped_by == "time_limit" and v.elapsed_s == pytest.approx(11.0)


def test_gate_worst_decision_and_measure_flags():
    from ccmoe_runtime.bench.gate import measure_args, worst
    # why: one regressed measure fails the whole gate; inconclusive never hides a regression
    assert worst(["ok", "inconclusive", "regression"]) == "regression"
    assert worst(["ok", "inconclusive"]) == "inconclusive"
    assert worst(["ok"]) == "ok"
    # why: decode at a depth is llama-bench -d with no prompt test
    assert measure_args("tg@d512")[-2:] == ["-d", "512"] and measure_args("pp")[1] == "64"
