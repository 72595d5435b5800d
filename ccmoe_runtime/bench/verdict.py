"""Is B slower than A?  A statistical verdict on tokens/s with known false-alarm and miss rates (issue 19).

The old gate flagged a regression when a median fell more than P % below a recorded baseline. On a shared
2-vCPU VM the machine's own speed moves 12-37 % within one run (docs/bench.md), so that gate cried wolf. This
module is pure (numpy and the standard library): it takes numbers and returns a `Verdict`; running llama-bench
is the caller's business.

Paired rounds (`paired_verdict`, `decide`)
------------------------------------------
Each round yields one sample of A (the reference) and one of B (the candidate), taken seconds apart, their order
swapped every round. Both share the machine's phase, so the per-round log-ratio d_i = log(b_i / a_i) has the
machine's drift between rounds removed; what is left is per-sample noise and the machine's move within a round.
With A and B alike (no change), swapping the order makes d symmetric about 0 whatever the machine does
(A and B are exchangeable within a round), which is the one assumption of Wilcoxon's signed-rank test. So:

  estimate   the Hodges-Lehmann estimate exp(median of the Walsh averages (d_i + d_j) / 2), the ratio of
             medians B/A under the model "B = A times a constant on a shared machine";
  interval   the exact, distribution-free signed-rank interval (order statistics of the Walsh averages; the null
             distribution of T+ computed exactly, no normal approximation), its achieved level reported.

Why that one (`python benchmarks/verdict_methods.py` reproduces this table): four
simulated machines - AR(1) drift, two speeds 1.35x apart switching now and then, two speeds 1.45x apart
switching every few samples ("flicker", pairs often straddle a switch), AR(1) plus a 20 % trend - with 3-8 %
one-sided per-sample noise and 5 % of samples hit by a 30 % hiccup; 2000 runs a cell, 90 % intervals, so the
upper bound should fall below the true ratio in 5 % of runs:

  method            n = 5          n = 8          n = 12         n = 30      (upper bound below the truth)
  signed-rank/HL    3.4-3.9 %      3.7-4.6 %      4.5-5.4 %      4.4-5.3 %
  Student t         3.0-4.6 %      3.7-5.7 %      4.2-6.3 %      5.0-6.2 %
  sign test         3.4-3.9 %      3.5-4.0 %      2.0-2.2 %      4.5-5.3 %   (discrete, so less power)
  bootstrap mean    12.0-14.0 %    9.7-11.3 %     8.7-9.5 %      6.3-7.2 %   (percentile; BCa is worse)
  bootstrap median  5.1-9.2 %      6.2-6.5 %      5.7-6.5 %      5.4-6.1 %

The bootstraps undercover at the small n a gate can afford (12-16 % at 5 rounds against 5 %), so they are out.
t and signed-rank both hold their level; t is a little more powerful when the noise is near normal (25 %
slow-down flagged at 8 rounds: 94 % vs 87 % on the AR(1) machine, partly the signed-rank test's discreteness)
and runs over its level where pairs straddle speed switches (6.2 % at 30 rounds on "flicker"). The signed-rank
interval is exact under the symmetry the alternating design provides, a hiccup in one sample moves the HL
estimate by little, and its estimate is a median, as bench's other figures are. Pairing matters: the same data
treated as unpaired (Mann-Whitney) gives intervals 1.4-1.7x wider on the AR(1) machine from 12 rounds on.

Looking repeatedly (`decide`)
-----------------------------
Stopping at the first conclusive look inflates the error if every look uses the full level. `decide` looks only
at a few rounds (`look_schedule`: 3 looks, spaced geometrically from min_rounds to max_rounds) and splits the
one-sided error (1 - confidence) / 2 over them (Bonferroni: the chance that any look errs is at most the sum);
a look whose n is too small for the signed-rank bound at its share (2^-n > alpha) spends nothing, so the first
look is moved to the first n that can decide (6 rounds at the defaults), and a look stopped by the time limit
spends all that is left. Simulated with decide(max_regression=0.10, min_rounds=5, max_rounds=30,
confidence=0.90), 2000 runs each (false alarm = "regression" with B truly at the limit, 0.90; nominal 5 %):

  looks   false alarm at 0.90   at 1.00   "ok" at 1.00   25 % slow-down flagged   median rounds (1.0 / 0.75)
  1       5.0-5.9 %             0         70-100 %       96.5-100 %               30 / 30  (one look at 30)
  3       4.1-4.7 %             0         64-100 %       92.0-100 %               6-30 / 6-13
  4       3.7-4.3 %             0         63-100 %       91.8-100 %               11-30 / 7-18
  every   1.3-1.7 %             0         44-97 %        80.9-100 %               11-30 / 10-19

Three looks keep the error under its nominal level while stopping a clear case at 6 rounds; looking at every
round with Bonferroni is too conservative (81 % power on "flicker"). t with 4 looks: 2.4-3.5 %, 94.5-100 %.
With confidence 0.95 the hardest machine's power fell to 86 %, so the default is 0.90: a false alarm at most
5 % of the time with B exactly at the limit, and in none of 2000 simulated runs with no change.

Unpaired (`unpaired_verdict`)
-----------------------------
Samples of two separate runs have no pairs: the Hodges-Lehmann shift of the two log samples with the exact
Mann-Whitney interval. It covers the scatter within each run, but not a move of the machine between the runs;
simulated with baseline and current as separate runs of the same machine models, the false-alarm rate at the
limit was 7.7-26.7 % against the nominal 5 % (0-6.3 % with no change). The verdict says so (`paired=False`, and
in its reason). So no gate decides on it: a baseline file's configuration is re-run now and paired
(bench/baseline.py), and the unpaired interval only reports how far that configuration moved since recording.

Direction: tokens/s, higher is faster; B/A < 1 - max_regression is a regression. For times, pass 1/time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

DEFAULT_CONFIDENCE = 0.90
DEFAULT_LOOKS = 3
PAIRED_METHOD = "wilcoxon"


# ---------------------------------------------------------------- distributions (numpy and math only)

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (bisection on t_cdf; |t| up to 1e7)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability {p} is not in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1e7
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, mid):
            break
    return 0.5 * (lo + hi)


def _polynomial_pmf(coefficients: np.ndarray) -> np.ndarray:
    return coefficients / coefficients.sum()


@lru_cache(maxsize=512)
def signed_rank_pmf(n: int) -> np.ndarray:
    """Null distribution of Wilcoxon's signed-rank statistic T+ for n untied pairs: P(T+ = 0 .. n(n+1)/2), the
    coefficients of prod (1 + q^i), i = 1..n."""
    c = np.zeros(n * (n + 1) // 2 + 1)
    c[0] = 1.0
    top = 0
    for i in range(1, n + 1):
        c[i:top + i + 1] += c[:top + 1].copy()
        top += i
    return _polynomial_pmf(c)


@lru_cache(maxsize=512)
def rank_sum_pmf(m: int, n: int) -> np.ndarray:
    """Null distribution of the Mann-Whitney statistic U for samples of m and n: P(U = 0 .. mn), the coefficients
    of the Gaussian binomial [m + n choose m]_q = prod (1 - q^(n+i)) / (1 - q^i), i = 1..m."""
    c = np.zeros(m * n + 1)
    c[0] = 1.0
    for i in range(1, m + 1):
        c[n + i:] -= c[:m * n + 1 - (n + i)].copy()        # times (1 - q^(n+i)), truncated at degree mn
        for j in range(i, m * n + 1):                      # divided by (1 - q^i)
            c[j] += c[j - i]
    return _polynomial_pmf(np.maximum(c, 0.0))


def _k_from_pmf(pmf: np.ndarray, alpha: float) -> tuple[int, float]:
    """The largest k with P(S <= k - 1) <= alpha, and that probability (0 when k = 0)."""
    cdf = np.cumsum(pmf)
    k = int(np.searchsorted(cdf, alpha * (1 + 1e-12), side="right"))
    return k, (float(cdf[k - 1]) if k else 0.0)


def sign_rank_k(n: int, alpha: float) -> int:
    """The order statistic of n values whose sign-test bound is one-sided alpha: largest k with P(Bin(n, 1/2) <=
    k - 1) <= alpha (0: no bound at this n)."""
    pmf = np.array([math.comb(n, i) for i in range(n + 1)], dtype=float) / 2.0 ** n
    return _k_from_pmf(pmf, alpha)[0]


# ---------------------------------------------------------------- intervals on a location in log units

def signed_rank_interval(d: Sequence[float], confidence: float) -> tuple[float, float, float, float]:
    """Hodges-Lehmann estimate and the exact Wilcoxon signed-rank interval for the centre of symmetric d:
    (estimate, low, high, achieved two-sided confidence). Bounds are Walsh averages (d_i + d_j) / 2, i <= j;
    -inf / inf where n is too small for the level (n = 5 reaches 93.75 % at most)."""
    x = np.asarray(d, dtype=float)
    n = len(x)
    i, j = np.triu_indices(n)
    walsh = np.sort((x[i] + x[j]) / 2.0)
    k, tail = _k_from_pmf(signed_rank_pmf(n), (1.0 - confidence) / 2.0)
    est = float(np.median(walsh))
    if k == 0:
        return est, -math.inf, math.inf, 1.0
    return est, float(walsh[k - 1]), float(walsh[len(walsh) - k]), 1.0 - 2.0 * tail


def t_interval(d: Sequence[float], confidence: float) -> tuple[float, float, float, float]:
    """Mean and Student's t interval: (estimate, low, high, confidence)."""
    x = np.asarray(d, dtype=float)
    n = len(x)
    m, s = float(x.mean()), float(x.std(ddof=1))
    q = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1)
    return m, m - q * s / math.sqrt(n), m + q * s / math.sqrt(n), confidence


def bca_mean_interval(d: Sequence[float], confidence: float, rng: np.random.Generator | None = None,
                      resamples: int = 2000) -> tuple[float, float, float, float]:
    """Mean and its bias-corrected and accelerated bootstrap interval (Efron 1987)."""
    x = np.asarray(d, dtype=float)
    n = len(x)
    rng = rng or np.random.default_rng(0)
    est = float(x.mean())
    boots = x[rng.integers(0, n, (resamples, n))].mean(axis=1)
    nd = statistics.NormalDist()
    share = float(np.clip(np.mean(boots < est) + 0.5 * np.mean(boots == est), 1.0 / resamples, 1 - 1.0 / resamples))
    z0 = nd.inv_cdf(share)
    jack = (x.sum() - x) / (n - 1)
    u = jack.mean() - jack
    acc = float((u ** 3).sum() / (6.0 * (u ** 2).sum() ** 1.5)) if (u ** 2).sum() > 0 else 0.0
    bounds = []
    for p in ((1.0 - confidence) / 2.0, 1.0 - (1.0 - confidence) / 2.0):
        z = nd.inv_cdf(p)
        bounds.append(float(np.quantile(boots, nd.cdf(z0 + (z0 + z) / (1.0 - acc * (z0 + z))))))
    return est, bounds[0], bounds[1], confidence


def rank_sum_interval(x: Sequence[float], y: Sequence[float], confidence: float) -> tuple[float, float, float, float]:
    """Hodges-Lehmann shift y - x of two independent samples and the exact Mann-Whitney interval:
    (estimate, low, high, achieved two-sided confidence). Assumes y is x shifted (same shape of spread)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diffs = np.sort((b[None, :] - a[:, None]).ravel())
    k, tail = _k_from_pmf(rank_sum_pmf(len(a), len(b)), (1.0 - confidence) / 2.0)
    est = float(np.median(diffs))
    if k == 0:
        return est, -math.inf, math.inf, 1.0
    return est, float(diffs[k - 1]), float(diffs[len(diffs) - k]), 1.0 - 2.0 * tail


PAIRED_INTERVALS = {"wilcoxon": signed_rank_interval, "t": t_interval, "bca": bca_mean_interval}


# ---------------------------------------------------------------- the verdict

@dataclass
class Verdict:
    """B/A (tokens/s, higher is faster) with its interval and what that says against the limit 1 - max_regression.

    `confidence` is the two-sided level of [low, high] as computed (after the split over looks, at least the level
    asked for); `overall_confidence` is what the decision is guaranteed at over all looks: a regression is
    declared wrongly (B truly no slower than the limit) in at most (1 - overall_confidence) / 2 of runs, and "ok"
    wrongly (B truly slower than the limit) in at most as many."""

    ratio: float
    low: float
    high: float
    confidence: float
    overall_confidence: float
    rounds: int
    machine_moved: float
    max_regression: float
    decision: str                     # "regression" | "ok" | "inconclusive"
    reason: str
    paired: bool = True
    method: str = PAIRED_METHOD
    looks: int = 1
    elapsed_s: float | None = None
    stopped_by: str | None = None     # decide(): "conclusive" | "max_rounds" | "time_limit"
    samples: dict = field(default_factory=dict)

    @property
    def limit(self) -> float:
        return 1.0 - self.max_regression

    def to_dict(self) -> dict:
        return asdict(self)


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median; 0 for fewer than 2 values."""
    v = [float(x) for x in values]
    return (max(v) - min(v)) / statistics.median(v) if len(v) > 1 and statistics.median(v) else 0.0


def machine_movement(a: Sequence[float], b: Sequence[float]) -> float:
    """How far the machine moved over paired rounds: the relative spread of each round's geometric mean of both
    contenders (a move both share is the machine's, not one contender's)."""
    return relative_spread([math.sqrt(x * y) for x, y in zip(a, b)])


def _decide(low: float, high: float, limit: float) -> str:
    if high < limit:
        return "regression"
    if low > limit:
        return "ok"
    return "inconclusive"


def _reason(decision: str, ratio: float, low: float, high: float, limit: float, rounds: int, moved: float,
            paired: bool) -> str:
    pct = f"{(1 - limit) * 100:g}%"
    span = f"B/A {ratio:.3f} [{low:.3f}, {high:.3f}]"
    if decision == "regression":
        return f"regression: {span} lies wholly below {limit:.3f} (more than {pct} slower)"
    if decision == "ok":
        return f"ok: {span} lies wholly above {limit:.3f} (not {pct} slower)"
    if not paired:
        return (f"inconclusive: the samples spread by {moved:.0%} and the machine can have changed between the two "
                f"runs; {span} straddles the {pct} limit ({limit:.3f})")
    return (f"inconclusive: the machine moved by {moved:.0%} over {rounds} rounds; {span} straddles the {pct} "
            f"limit ({limit:.3f}); more rounds or a quieter machine would settle it")


def _check(max_regression: float, confidence: float) -> None:
    if not 0.0 < max_regression < 1.0:
        raise ValueError(f"max_regression {max_regression} is not a fraction in (0, 1) (10% is 0.10)")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence {confidence} is not in [0.5, 1)")


def _positive(name: str, values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name} must be positive finite tokens/s, got {list(values)[:8]}")
    return x


def paired_verdict(a: Sequence[float], b: Sequence[float], max_regression: float = 0.10,
                   confidence: float = DEFAULT_CONFIDENCE, method: str = PAIRED_METHOD,
                   overall_confidence: float | None = None) -> Verdict:
    """The verdict from paired rounds: a[i] and b[i] taken seconds apart in round i (the order within a round
    best swapped every round). The interval is on exp(centre of log(b[i] / a[i])): the pairing removes the move
    the machine made between rounds, which is most of this machine's noise."""
    _check(max_regression, confidence)
    x, y = _positive("a", a), _positive("b", b)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} samples of A against {len(y)} of B: paired rounds give one of each")
    limit, moved = 1.0 - max_regression, machine_movement(x, y)
    if len(x) < 2:
        ratio = float(y[0] / x[0]) if len(x) else math.nan
        return Verdict(ratio, 0.0, math.inf, confidence, overall_confidence or confidence, len(x), moved,
                       max_regression, "inconclusive", f"inconclusive: {len(x)} round(s) are too few for an interval",
                       method=method, samples={"a": x.tolist(), "b": y.tolist()})
    est, lo, hi, achieved = PAIRED_INTERVALS[method](np.log(y / x), confidence)
    ratio, low, high = math.exp(est), math.exp(lo), math.exp(hi)
    decision = _decide(low, high, limit)
    return Verdict(ratio, low, high, achieved, overall_confidence or achieved, len(x), moved, max_regression,
                   decision, _reason(decision, ratio, low, high, limit, len(x), moved, True), method=method,
                   samples={"a": x.tolist(), "b": y.tolist()})


def unpaired_verdict(a: Sequence[float], b: Sequence[float], max_regression: float = 0.10,
                     confidence: float = DEFAULT_CONFIDENCE) -> Verdict:
    """The verdict from two independent samples, e.g. a baseline file's round samples (a) and this run's (b):
    the Hodges-Lehmann ratio exp(median of log b_j - log a_i) with the exact Mann-Whitney interval. It is weaker
    than a paired verdict and says so: it covers the scatter within each run but not a change of the machine's
    speed between the runs, which a shared VM makes often (12-37% within one run here)."""
    _check(max_regression, confidence)
    x, y = _positive("a", a), _positive("b", b)
    limit = 1.0 - max_regression
    moved = max(relative_spread(x), relative_spread(y))
    if len(x) < 2 or len(y) < 2:
        return Verdict(float(np.median(y) / np.median(x)) if len(x) and len(y) else math.nan, 0.0, math.inf,
                       confidence, confidence, min(len(x), len(y)), moved, max_regression, "inconclusive",
                       "inconclusive: too few samples for an interval", paired=False, method="mann-whitney",
                       samples={"a": x.tolist(), "b": y.tolist()})
    est, lo, hi, achieved = rank_sum_interval(np.log(x), np.log(y), confidence)
    ratio, low, high = math.exp(est), math.exp(lo), math.exp(hi)
    decision = _decide(low, high, limit)
    reason = _reason(decision, ratio, low, high, limit, min(len(x), len(y)), moved, False)
    if decision != "inconclusive":
        reason += "; unpaired: a change of the machine between the runs is not in the interval"
    return Verdict(ratio, low, high, achieved, achieved, min(len(x), len(y)), moved, max_regression, decision,
                   reason, paired=False, method="mann-whitney", samples={"a": x.tolist(), "b": y.tolist()})


# ---------------------------------------------------------------- sequential: looking repeatedly at growing data

def look_schedule(min_rounds: int, max_rounds: int, looks: int = DEFAULT_LOOKS) -> list[int]:
    """Rounds after which the driver looks: `looks` counts from min_rounds to max_rounds, spaced geometrically
    (each look has about as much more information as the last), duplicates dropped."""
    if min_rounds < 2 or max_rounds < min_rounds:
        raise ValueError(f"rounds {min_rounds}..{max_rounds}: need 2 <= min_rounds <= max_rounds")
    if looks <= 1 or max_rounds == min_rounds:
        return [max_rounds]
    ratio = (max_rounds / min_rounds) ** (1.0 / (looks - 1))
    return sorted({min(max_rounds, round(min_rounds * ratio ** k)) for k in range(looks)})


def first_bounded_rounds(method: str, alpha: float) -> int:
    """The fewest rounds at which `method` can bound the ratio at one-sided level alpha: the signed-rank bound
    needs 2^-n <= alpha (7 rounds for 1.25 %); the t and bootstrap bounds exist from 2 rounds."""
    return max(2, math.ceil(math.log2(1.0 / alpha) - 1e-9)) if method == "wilcoxon" else 2


def decide(next_round: Callable[[], tuple[float, float]], max_regression: float = 0.10, min_rounds: int = 5,
           max_rounds: int = 30, time_limit_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
           confidence: float = DEFAULT_CONFIDENCE, looks: int = DEFAULT_LOOKS, method: str = PAIRED_METHOD,
           progress: Callable[[Verdict], None] | None = None) -> Verdict:
    """Run rounds until the verdict is conclusive, or the round or time limit is reached.

    `next_round()` runs one round and returns (a, b), tokens/s of A (the reference) and B (the candidate), taken
    seconds apart (swap their order every round). The data is looked at only at `look_schedule(min_rounds,
    max_rounds, looks)`, and the one-sided error (1 - confidence) / 2 is split evenly over those looks
    (Bonferroni: whatever the correlation of the looks, the chance that any look errs is at most the sum of
    their levels). A look spends only the error its interval can make: the exact signed-rank bound at n rounds
    reaches only certain levels (at 5 rounds none beyond 93.75 %), and what a look leaves is shared by the later
    ones. A round that would end past `time_limit_s` is not started (its length taken as the longest so far: on a
    shared VM one round can last ten times another); the driver then looks once more at what it has and spends all the error not yet spent there.
    An exception from `next_round` propagates. `method`: "wilcoxon" (the default, see the module docstring),
    "t" or "bca" (undercovers at small n; kept for comparison)."""
    _check(max_regression, confidence)
    first = max(min_rounds, first_bounded_rounds(method, (1.0 - confidence) / 2.0 / max(looks, 1)))
    schedule = look_schedule(min(first, max_rounds), max_rounds, looks)
    remaining = (1.0 - confidence) / 2.0             # one-sided error left to spend
    started = clock()
    a: list[float] = []
    b: list[float] = []
    taken, stopped = 0, "max_rounds"
    v: Verdict | None = None

    def look(alpha: float) -> Verdict:
        nonlocal remaining, taken
        taken += 1
        got = paired_verdict(a, b, max_regression, 1.0 - 2.0 * alpha, method, overall_confidence=confidence)
        remaining -= (1.0 - got.confidence) / 2.0    # what this look can err by: no more than planned, 0 if unbounded
        if progress:
            progress(got)
        return got

    longest = 0.0
    while len(a) < max_rounds:
        before = clock()
        if a and before - started + longest > time_limit_s:
            stopped = "time_limit"
            break
        x, y = next_round()
        longest = max(longest, clock() - before)
        a.append(float(x))
        b.append(float(y))
        if len(a) in schedule and len(a) < max_rounds:
            v = look(remaining / sum(1 for n in schedule if n >= len(a)))
            if v.decision != "inconclusive":
                stopped = "conclusive"
                break
    if stopped != "conclusive":                  # the last look: all the error not spent yet
        if not a:
            raise ValueError("no round finished within the time limit")
        v = look(max(remaining, 1e-12))
    v.looks, v.elapsed_s, v.stopped_by = taken, round(clock() - started, 3), stopped
    if stopped == "time_limit" and v.decision == "inconclusive":
        v.reason += f" (stopped by the {time_limit_s:g} s time limit)"
    return v


def summary_line(v: Verdict) -> str:
    """One line for a terminal or a log."""
    how = (f"{v.rounds} paired rounds" if v.paired else f"unpaired, {v.rounds}+ samples each")
    extra = f", {v.looks} looks" if v.paired and v.looks > 1 else ""
    took = f", {v.elapsed_s:.0f} s" if v.elapsed_s is not None else ""
    return (f"{v.decision}: B/A {v.ratio:.3f} [{v.low:.3f}, {v.high:.3f}] ({v.confidence:.1%} interval, "
            f"{v.overall_confidence:.0%} overall; {how}{extra}{took}; limit {v.limit:.3f}; machine moved "
            f"{v.machine_moved:.0%})" + ("" if v.decision != "inconclusive" else " - " + _why(v.reason)))


def _why(reason: str) -> str:
    """An inconclusive reason without its prefix and the interval the line has already given."""
    parts = reason.removeprefix("inconclusive: ").split("; ")
    return "; ".join(p for p in parts if not p.startswith("B/A "))
