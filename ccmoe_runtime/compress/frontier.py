"""The speed/quality frontier of a device: every tensor's type and memory pool chosen together.

Each tensor has options (type, pool): bytes, a predicted KLD (the planner's quality model: error x measured impact
or class prior) and a decode time per token (bytes read per token / (pool bandwidth x the cost model's efficiency);
routed experts read by activation frequency, the rest every token). For a sequence of prices lambda the optimizer
minimises KLD + lambda x time with every pool's capacity enforced by a price mu per pool (bisection), then fills
what is left greedily. Unified-memory devices (Strix Halo, Apple) and the CPU have one pool; a CUDA device has the
GPU (fast, small) and host memory (slow, large). The points that no other point beats on both predicted decode
tok/s (placement.costmodel.predict) and predicted KLD form the frontier.

Default choice, the knee: the point with the most predicted tok/s per unit of predicted KLD. Along the frontier
that is where 1% more speed starts to cost more than 1% more KLD.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.units import GB, gb_text
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from ..model.inventory import ModelInventory, kv_bytes_per_token, require_moe, summarize
from ..placement.costmodel import (
    Factors,
    Prediction,
    TensorLoad,
    load_factors,
    main_pool,
    pool_bandwidth,
    predict,
    tensor_loads,
)
from ..placement.layout import Settings
from ..placement.memory import SearchContext, pool_capacities, pool_use
from .measure import Measurements
from .plan import Budget, Plan, PlannedTensor, adjusted_experts_used, bits, device_budget, tensor_weights
from .sensitivity import prior_sensitivity

FRONTIER_VERSION = 1
FRONTIER_KIND = "frontier"
SWEEP = np.concatenate([[0.0], np.logspace(-3, 3, 37)])   # lambda in units of (KLD / time) at the quality end
MAX_POINTS = 16
KNEE_RULE = ("the knee: the most predicted tok/s per unit of predicted KLD (faster points lose more KLD, in per "
             "cent, than they gain speed)")


@dataclass
class ClassUse:
    """One tensor class at one point: bytes in each pool, bits per weight and the types used."""

    bytes: dict[str, int]
    bpw: float
    types: dict[str, int]

    def where(self) -> str:
        """`gpu`, `cpu` or `gpu 40% cpu 60%` (by bytes)."""
        total = sum(self.bytes.values()) or 1
        parts = [(p, b) for p, b in sorted(self.bytes.items()) if b]
        if len(parts) == 1:
            return parts[0][0]
        return " ".join(f"{p} {round(100 * b / total)}%" for p, b in parts)


@dataclass
class FrontierPoint:
    """One assignment of a type and a pool to every tensor, with its predicted size, speed and quality."""

    lam: float                       # the price of a second of decode time in KLD
    total_bytes: int                 # weights: planned and fixed tensors
    file_bytes: int
    pool_bytes: dict[str, int]       # weights per placement pool (gpu / cpu)
    decode_tps: float                # predicted, one stream at an empty context
    prompt_tps: float
    kld: float                       # predicted (the planner's objective)
    classes: dict[str, ClassUse]
    types: dict[str, str]            # planned tensor -> type
    where: dict[str, str]            # every tensor -> gpu | cpu

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "FrontierPoint":
        return FrontierPoint(**{**d, "classes": {c: ClassUse(**u) for c, u in d["classes"].items()}})


@dataclass
class Frontier:
    """The frontier of a model on a device (artifact kind `frontier`): its points, quality end first."""

    model: str
    arch: str
    device: str
    backend: str
    unified: bool                    # one memory pool for every tensor (unified memory or the CPU)
    capacities: dict[str, int]       # bytes for weights per optimizer pool ("all", or "gpu" and "cpu")
    budget: Budget
    objective: str                   # what `kld` means: "predicted KLD" or "usage-weighted relative error"
    factors_source: str
    n_expert: int
    n_expert_used: int
    experts_used_override: int | None
    points: list[FrontierPoint]
    knee: int                        # index of the default point
    chosen: int                      # index of the point chosen (knee, --min-tps or --max-kld)
    chosen_why: str
    ctx: int | None = None
    parallel: int | None = None
    engine: str | None = None
    imatrix: str | None = None
    sensitivity_source: str | None = None
    metadata_bytes: int = 0
    fixed: dict[str, dict] = field(default_factory=dict)   # tensors the plan leaves as they are: bytes, class, layer

    @property
    def point(self) -> FrontierPoint:
        return self.points[self.chosen]

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("budget", "points")}
        return {**d, "budget": self.budget.to_dict(), "points": [p.to_dict() for p in self.points]}

    @staticmethod
    def from_dict(d: dict) -> "Frontier":
        fields = {k: d[k] for k in Frontier.__dataclass_fields__ if k in d and k not in ("budget", "points")}
        return Frontier(**fields, budget=Budget(**d["budget"]), points=[FrontierPoint.from_dict(p) for p in d["points"]])


# ---------------------------------------------------------------- the optimizer

@dataclass
class Problem:
    """The options of every planned tensor as arrays: N tensors x T types x P optimizer pools."""

    names: list[str]
    types: list[str]
    pools: list[str]                 # optimizer pools: ["all"] or ["gpu", "cpu"]
    capacity: np.ndarray             # (P,) bytes for planned tensors (fixed ones already taken off)
    nbytes: np.ndarray               # (N, T) bytes of each type (0 where not allowed)
    kld: np.ndarray                  # (N, T) predicted KLD (inf where not allowed)
    time: np.ndarray                 # (N, T, P) decode seconds per token (0 where not allowed)
    allowed: np.ndarray              # (N, T, P) bool: the type is allowed for the tensor and the pool may hold it


def _cost(pr: Problem, lam: float, mu: np.ndarray) -> np.ndarray:
    cost = np.where(np.isfinite(pr.kld), pr.kld, 0.0)[:, :, None] + lam * pr.time \
        + mu[None, None, :] * pr.nbytes[:, :, None]
    return np.where(pr.allowed, cost, np.inf)


def _chooser(pr: Problem, lam: float):
    """choose(mu) -> (type index, pool index, bytes per pool): per tensor the option of least
    KLD + lam x time + mu x bytes."""
    base = _cost(pr, lam, np.zeros(len(pr.pools)))
    nb = pr.nbytes[:, :, None]
    n = np.arange(len(pr.names))

    def choose(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flat = (base + mu[None, None, :] * nb).reshape(len(pr.names), -1).argmin(axis=1)
        t, p = flat // len(pr.pools), flat % len(pr.pools)
        return t, p, np.bincount(p, weights=pr.nbytes[n, t], minlength=len(pr.pools))
    return choose


def _usage(pr: Problem, t: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.bincount(p, weights=pr.nbytes[np.arange(len(t)), t], minlength=len(pr.pools))


def _price(fits, hi: float = 1e-15, steps: int = 40) -> float | None:
    """The least price at which `fits(price)` holds (bisection on a log scale); None when none does."""
    if fits(0.0):
        return 0.0
    while not fits(hi):
        hi *= 4
        if hi > 1e6:
            return None
    lo = hi / 4
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _solve(pr: Problem, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The choice for one lambda with every pool within capacity (a price per pool), then a greedy fill."""
    cap = pr.capacity
    choose = _chooser(pr, lam)
    if len(pr.pools) == 1:
        mu0 = _price(lambda m: choose(np.array([m]))[2][0] <= cap[0])
        if mu0 is None:
            return _fail(pr)
        mu = np.array([mu0])
    else:                            # gpu price for a given cpu price, the cpu price outside
        def inner(mc: float) -> float | None:
            return _price(lambda mg: choose(np.array([mg, mc]))[2][0] <= cap[0], steps=20)

        def fits_cpu(mc: float) -> bool:
            mg = inner(mc)
            return mg is not None and choose(np.array([mg, mc]))[2][1] <= cap[1]

        mc = _price(fits_cpu, steps=16)
        mg = inner(mc) if mc is not None else None
        if mg is None:
            return _fail(pr)
        mu = np.array([mg, mc])
    t, p, _ = choose(mu)
    return _fill(pr, lam, t, p)


def _fail(pr: Problem):
    smallest = pr.nbytes.copy().astype(float)
    smallest[~pr.allowed.any(axis=2)] = np.inf
    need = smallest.min(axis=1).sum()
    raise CcmoeError(f"even the smallest plan needs {gb_text(need)} of weights but the device holds "
                     f"{gb_text(pr.capacity.sum())} for them", "raise --budget-gb, shorten --ctx/--parallel, or "
                     "prune more experts", EXIT_RESOURCE)


def _fill(pr: Problem, lam: float, t: np.ndarray, p: np.ndarray, rounds: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Spend what the prices left free: each tensor's move of best objective gain per byte added, best first, each
    taken while it still fits; again until no move is taken."""
    n = np.arange(len(t))
    cost = _cost(pr, lam, np.zeros(len(pr.pools)))                      # (N, T, P)
    pools = np.arange(len(pr.pools))[None, None, :]
    t, p = t.copy(), p.copy()
    for _ in range(rounds):
        free = pr.capacity - _usage(pr, t, p)
        gain = cost[n, t, p][:, None, None] - cost                      # > 0: better
        added = pr.nbytes[:, :, None] - np.where(pools == p[:, None, None], pr.nbytes[n, t][:, None, None], 0)
        ok = (gain > 1e-18) & pr.allowed & (added <= free[None, None, :])
        if not ok.any():
            break
        score = np.where(ok, gain / np.maximum(added, 1.0), -np.inf).reshape(len(t), -1)
        best = score.argmax(axis=1)
        moved = False
        for i in np.argsort(-score[n, best]):
            if not np.isfinite(score[i, best[i]]):
                break
            j, k = divmod(int(best[i]), len(pr.pools))
            take = np.zeros(len(pr.pools))
            take[k] += pr.nbytes[i, j]
            take[p[i]] -= pr.nbytes[i, t[i]]
            if np.all(take <= free):
                free = free - take
                t[i], p[i] = j, k
                moved = True
        if not moved:
            break
    return t, p


# ---------------------------------------------------------------- the problem of a model on a device

def pool_budgets(inv: ModelInventory, device: DeviceProfile, factors: Factors, budget: Budget, loads,
                 ctx: int, parallel: int) -> dict[str, int]:
    """Bytes for weights per optimizer pool: the plan's budget on one-pool devices; on a GPU with host memory
    each pool's capacity less its KV cache, compute buffers, process overhead and margin (placement.memory)."""
    main = main_pool(device)
    if _unified(device):
        return {"all": budget.weights_bytes}
    cx = SearchContext(inv, device, factors, Settings(ctx=ctx, parallel=parallel), loads, main,
                       summarize(inv).n_layers)
    use = pool_use(cx, {ld.name: "cpu" for ld in loads}, "f16", None, pool_capacities(device))
    caps = {p: max(use[p].capacity - (use[p].total - use[p].weights), 0) for p in ("gpu", "cpu")}
    if budget.weights_bytes < budget.memory_bytes - budget.os_reserve_bytes - budget.kv_cache_bytes - budget.compute_bytes:
        caps["cpu"] = min(caps["cpu"], max(budget.weights_bytes - caps["gpu"], 0))     # --budget-gb: the total
    return caps


def _unified(device: DeviceProfile) -> bool:
    return main_pool(device) == "cpu" or device.pool("gpu") is None or device.pool("cpu") is None


def _placed_pool(name: str, opt_pool: str, main: str) -> str:
    """Where a tensor really lives: the optimizer pool, `main` on one-pool devices; token_embd stays on the CPU."""
    if name.startswith("token_embd.") and main == "gpu":
        return "cpu"
    return main if opt_pool == "all" else opt_pool


def build_problem(sens: dict, weights: dict[str, float], loads: dict[str, TensorLoad], device: DeviceProfile,
                  factors: Factors, capacities: dict[str, int], fixed_pool_bytes: dict[str, int],
                  excluded: tuple[str, ...], share_scale: float) -> Problem:
    """The options of every planned tensor: bytes, predicted KLD and decode time per (type, pool)."""
    names = list(sens["tensors"])
    types = sorted({k for t in sens["tensors"].values() for k in t["error"] if k.lower() not in excluded})
    pools = list(capacities)
    main = main_pool(device)
    nbytes = np.zeros((len(names), len(types)))
    kld = np.full((len(names), len(types)), np.inf)
    time = np.zeros((len(names), len(types), len(pools)))
    allowed = np.zeros((len(names), len(types), len(pools)), dtype=bool)
    for i, name in enumerate(names):
        t = sens["tensors"][name]
        ld = loads.get(name)
        share = (ld.read_share if ld else 1.0) * (share_scale if t["class"] == "routed_expert" else 1.0)
        for j, k in enumerate(types):
            if k not in t["error"]:
                continue
            nbytes[i, j] = t["bytes"][k]
            kld[i, j] = t["error"][k] * weights[name]
            for q, pool in enumerate(pools):
                if name.startswith("token_embd.") and pool == "gpu":
                    continue                 # llama.cpp keeps the embedding table in host memory
                where = _placed_pool(name, pool, main)
                rate = pool_bandwidth(device, where) * factors.eff(where, k, device.slow_types)
                time[i, j, q] = t["bytes"][k] * share / rate
                allowed[i, j, q] = True
    if not np.isfinite(kld).any(axis=1).all():
        bad = names[int(np.argmin(np.isfinite(kld).any(axis=1)))]
        raise CcmoeError(f"no allowed type for {bad}", "allow more types on this device")
    cap = np.array([capacities[p] - fixed_pool_bytes.get(p, 0) for p in pools], dtype=float)
    return Problem(names, types, pools, cap, nbytes, kld, time, allowed)


def _point(pr: Problem, lam: float, t: np.ndarray, p: np.ndarray, sens: dict, inv: ModelInventory,
           loads: list[TensorLoad], device: DeviceProfile, factors: Factors, share_scale: float,
           metadata_bytes: int) -> FrontierPoint:
    """A frontier point from a choice: types and pools, predicted speed (cost model) and KLD, per-class use."""
    main = main_pool(device)
    types = {n: pr.types[t[i]] for i, n in enumerate(pr.names)}
    where = {ld.name: _placed_pool(ld.name, "all", main) for ld in loads}
    where.update({n: _placed_pool(n, pr.pools[p[i]], main) for i, n in enumerate(pr.names)})
    placed = []
    for ld in loads:
        if ld.name in types:
            k = types[ld.name]
            ld = replace(ld, ggml_type=k, n_bytes=sens["tensors"][ld.name]["bytes"][k])
        if ld.cls == "routed_expert" and share_scale != 1.0:
            ld = replace(ld, read_share=ld.read_share * share_scale,
                         expert_freq=[f * share_scale for f in ld.expert_freq] if ld.expert_freq else None)
        placed.append(ld)
    pred: Prediction = predict(placed, where, device, factors, summarize(inv).n_layers,
                               kv_bytes_per_token(inv), 0, main=main)
    pool_bytes: dict[str, int] = {}
    classes: dict[str, dict] = {}
    for ld in placed:
        pool_bytes[where[ld.name]] = pool_bytes.get(where[ld.name], 0) + ld.n_bytes
        if ld.name not in types:
            continue
        c = classes.setdefault(ld.cls, {"bytes": {}, "elements": 0, "types": {}})
        c["bytes"][where[ld.name]] = c["bytes"].get(where[ld.name], 0) + ld.n_bytes
        c["elements"] += ld.n_elements
        c["types"][ld.ggml_type] = c["types"].get(ld.ggml_type, 0) + 1
    uses = {cls: ClassUse(c["bytes"], round(bits(sum(c["bytes"].values()), c["elements"]), 3), c["types"])
            for cls, c in classes.items()}
    total = sum(pool_bytes.values())
    kld = float(pr.kld[np.arange(len(t)), t].sum())
    return FrontierPoint(lam, total, total + metadata_bytes, pool_bytes, pred.decode_tps, round(pred.prompt_tps, 1),
                         kld, uses, types, where)


def pareto(points: list[FrontierPoint]) -> list[FrontierPoint]:
    """The points no other point beats on both decode tok/s and KLD, slowest (best quality) first."""
    best: list[FrontierPoint] = []
    for q in sorted(points, key=lambda q: (-q.decode_tps, q.kld)):
        if not best or q.kld < best[-1].kld - 1e-12:
            best.append(q)
    return best[::-1]


def thin(points: list[FrontierPoint], n: int = MAX_POINTS) -> list[FrontierPoint]:
    """At most n points, both ends kept, the rest evenly spread by index."""
    if len(points) <= n:
        return points
    keep = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in keep]


def knee_index(points: list[FrontierPoint]) -> int:
    """The knee (see KNEE_RULE): the most predicted tok/s per unit of predicted KLD."""
    return int(np.argmax([q.decode_tps / max(q.kld, 1e-12) for q in points])) if points else 0


def check_targets(min_tps: float | None, max_kld: float | None) -> None:
    """At most one of --min-tps and --max-kld."""
    if min_tps is not None and max_kld is not None:
        raise CcmoeError("--min-tps and --max-kld both given", "pass one of them (or neither for the knee)")


def select(points: list[FrontierPoint], knee: int, min_tps: float | None = None,
           max_kld: float | None = None) -> tuple[int, str]:
    """The point the user asked for: the best KLD at --min-tps, the fastest at --max-kld, else the knee."""
    check_targets(min_tps, max_kld)
    if min_tps is not None:
        ok = [i for i, q in enumerate(points) if q.decode_tps >= min_tps]
        if not ok:
            top = max(q.decode_tps for q in points)
            raise CcmoeError(f"no point reaches {min_tps:g} tok/s on this device (the fastest predicts {top:.1f})",
                             f"ask for --min-tps {top:.1f} or less, or use a faster device")
        i = min(ok, key=lambda i: points[i].kld)
        return i, f"--min-tps {min_tps:g}: the lowest predicted KLD at {min_tps:g} tok/s or more"
    if max_kld is not None:
        ok = [i for i, q in enumerate(points) if q.kld <= max_kld]
        if not ok:
            low = min(q.kld for q in points)
            raise CcmoeError(f"no point predicts a KLD of {max_kld:g} or less on this device (the best predicts "
                             f"{low:.4g})", f"ask for --max-kld {low:.4g} or more, or use a larger device")
        i = max(ok, key=lambda i: points[i].decode_tps)
        return i, f"--max-kld {max_kld:g}: the fastest point predicting a KLD of {max_kld:g} or less"
    return knee, KNEE_RULE


def frontier(inv: ModelInventory, sens: dict, device: DeviceProfile, factors: Factors, budget: Budget,
             ctx: int, parallel: int, excluded: tuple[str, ...] = (), impact: dict | None = None,
             expert_stats: dict | None = None, experts_used: int | None = None, min_tps: float | None = None,
             max_kld: float | None = None) -> Frontier:
    """Trace the frontier by a sweep of lambda and pick the point asked for (knee by default)."""
    check_targets(min_tps, max_kld)
    summary = summarize(inv)
    loads = tensor_loads(inv, expert_stats)
    by_name = {ld.name: ld for ld in loads}
    share_scale = experts_used / summary.n_expert_used if experts_used and summary.n_expert_used else 1.0
    planned = set(sens["tensors"])
    main = main_pool(device)
    capacities = pool_budgets(inv, device, factors, budget, loads, ctx, parallel)
    fixed_pool: dict[str, int] = {}
    fixed = {}
    for t in inv.tensors:
        if t.name not in planned:
            pool = "all" if "all" in capacities else _placed_pool(t.name, main, main)
            fixed_pool[pool] = fixed_pool.get(pool, 0) + t.n_bytes
            fixed[t.name] = {"bytes": t.n_bytes, "class": t.tensor_class, "layer": t.layer, "type": t.ggml_type}
    weights = tensor_weights(sens, impact)
    pr = build_problem(sens, weights, by_name, device, factors, capacities, fixed_pool, excluded, share_scale)
    metadata = max(inv.file_bytes - sum(t.n_bytes for t in inv.tensors), 0)
    t0, p0 = _solve(pr, 0.0)
    k0 = float(pr.kld[np.arange(len(t0)), t0].sum())
    s0 = float(pr.time[np.arange(len(t0)), t0, p0].sum())
    scale = k0 / max(s0, 1e-30)
    points, seen = [], set()
    for x in SWEEP:
        t, p = (t0, p0) if x == 0 else _solve(pr, float(x) * scale)
        key = (t.tobytes(), p.tobytes())
        if key not in seen:
            seen.add(key)
            points.append(_point(pr, float(x) * scale, t, p, sens, inv, loads, device, factors, share_scale, metadata))
    points = thin(pareto(points))
    knee = knee_index(points)
    chosen, why = select(points, knee, min_tps, max_kld)
    return Frontier(model=inv.source, arch=inv.arch, device=device.name, backend=device.backend,
                    unified="all" in capacities, capacities=capacities, budget=budget,
                    objective="predicted KLD" if impact or _kld_priors(sens) else "usage-weighted relative error",
                    factors_source=factors.source, n_expert=summary.n_expert, n_expert_used=summary.n_expert_used,
                    experts_used_override=experts_used, points=points, knee=knee, chosen=chosen, chosen_why=why,
                    ctx=ctx, parallel=parallel, metadata_bytes=metadata, fixed=fixed)


def _kld_priors(sens: dict) -> bool:
    """The weight-less prior is in KLD units when it came from measured class priors (not the kind table)."""
    prior = sens.get("prior") or ""
    return bool(prior) and "impact by tensor kind" not in prior


def frontier_model(engine: Engine, inv: ModelInventory, device: DeviceProfile, ctx: int, parallel: int,
                   budget_gb: float | None = None, measured: Measurements | None = None,
                   experts_used: int | None = None, original_experts: int | None = None,
                   min_tps: float | None = None, max_kld: float | None = None,
                   calibration=None) -> tuple[Frontier, dict]:
    """The frontier from measured sensitivity and impact when measured, else from the weight-less prior; with
    the sensitivity it was made from (what point_plan needs)."""
    require_moe(summarize(inv), inv.source)
    sens = measured.sensitivity if measured else prior_sensitivity(engine, inv)
    excluded = tuple(t.lower() for t in device.unsupported_types + device.slow_types)
    budget = device_budget(inv, device, ctx, parallel, budget_gb)
    f = frontier(inv, sens, device, load_factors(device, calibration), budget, ctx, parallel, excluded,
                 measured.impact if measured else None, measured.expert_stats if measured else None,
                 adjusted_experts_used(inv, experts_used, original_experts), min_tps, max_kld)
    f.engine = engine.commit
    f.imatrix = str(measured.imatrix) if measured and measured.imatrix else None
    f.sensitivity_source = "measured" if measured else sens.get("prior")
    return f, sens


# ---------------------------------------------------------------- a point as a plan; text

def point_plan(f: Frontier, sens: dict, impact: dict | None = None, index: int | None = None) -> Plan:
    """The plan of one point (the chosen one by default): what `build` quantizes."""
    q = f.points[f.chosen if index is None else index]
    weights = tensor_weights(sens, impact)
    tensors = {}
    for name, typ in q.types.items():
        t = sens["tensors"][name]
        tensors[name] = PlannedTensor(typ, t["bytes"][typ], t["n_elements"], t["error"][typ],
                                      t["error"][typ] * weights[name], t["class"], t["layer"])
    fixed = sum(v["bytes"] for v in f.fixed.values())
    plan = Plan(model=f.model, arch=f.arch, budget=f.budget, total_bytes=q.total_bytes, fixed_bytes=fixed,
                file_bytes=q.file_bytes, n_expert=f.n_expert, n_expert_used=f.n_expert_used,
                experts_used_override=f.experts_used_override, objective=f.objective, total_error=q.kld,
                tensors=tensors, ctx=f.ctx, parallel=f.parallel, engine=f.engine, imatrix=f.imatrix,
                sensitivity_source=f.sensitivity_source)
    return plan


CLASS_COLUMNS = ("routed_expert", "shared_expert", "attention", "dense_ffn", "embed_output")
CLASS_LABELS = {"routed_expert": "routed", "shared_expert": "shared", "attention": "attention", "dense_ffn": "dense",
                "embed_output": "embed/out"}


def class_cell(u: ClassUse | None, unified: bool) -> str:
    if u is None:
        return "-"
    return f"{u.bpw:.2f}" if unified else f"{u.bpw:.2f} {u.where()}"


def table_lines(f: Frontier) -> list[str]:
    """One row per point: size, pools, predicted tok/s and KLD, bits (and pools) per class."""
    cols = [c for c in CLASS_COLUMNS if any(c in q.classes for q in f.points)]
    width = 9 if f.unified else 18
    unit, scale = ("GB", GB) if max(q.file_bytes for q in f.points) >= GB else ("MB", 1e6)
    pools = "" if f.unified else f"{'gpu ' + unit:>8} {'cpu ' + unit:>8} "
    kld = "KLD" if f.objective == "predicted KLD" else "error"
    head = (f"{'':2}{'#':>2} {'size ' + unit:>8} {pools}{'tok/s':>7} {'prompt':>8} {kld:>9}  "
            + " ".join(f"{CLASS_LABELS[c]:>{width}}" for c in cols))
    lines = [head]
    for i, q in enumerate(f.points):
        mark = "*" if i == f.chosen else ("k" if i == f.knee else " ")
        pool = "" if f.unified else f"{q.pool_bytes.get('gpu', 0) / scale:>8.2f} {q.pool_bytes.get('cpu', 0) / scale:>8.2f} "
        lines.append(f"{mark:2}{i:>2} {q.file_bytes / scale:>8.2f} {pool}{q.decode_tps:>7.1f} {q.prompt_tps:>8.0f} "
                     f"{q.kld:>9.5f}  " + " ".join(f"{class_cell(q.classes.get(c), f.unified):>{width}}" for c in cols))
    return lines


def summary_lines(f: Frontier) -> list[str]:
    """The frontier as text: what it was made for, the table, and which point was chosen and why."""
    caps = ", ".join(f"{p} {gb_text(b)}" for p, b in f.capacities.items())
    memory = "one memory pool (unified or CPU)" if f.unified else "GPU and host memory"
    q = f.point
    lines = [f"frontier for {f.model} on {f.device} ({f.backend}, {memory}): weights capacity {caps}",
             f"quality: {f.objective} ({f.sensitivity_source or 'measured'}); speed: decode tok/s at an empty "
             f"context, one stream (factors: {f.factors_source}); bits per weight per class"
             + ("" if f.unified else " and where it lives"),
             *table_lines(f),
             f"chosen (*): #{f.chosen}, {gb_text(q.file_bytes)}, predicted {q.decode_tps:.1f} tok/s and KLD "
             f"{q.kld:.5f}; {f.chosen_why}" + ("" if f.chosen == f.knee else f" (k: the knee, #{f.knee})")]
    return lines
