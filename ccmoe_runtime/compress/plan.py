"""Planning: a GGUF type for every tensor that minimises the total measured error under a byte budget."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.units import GB, gb_text
from ..devices.profiles import DeviceProfile
from ..model.inventory import ModelInventory, kv_bytes_per_token, summarize

PLAN_VERSION = 1
PLAN_KIND = "plan"
COMPUTE_BUFFER_BYTES = 1 * 1024**3    # llama.cpp compute buffers and scratch; measured per host in the placement stage


@dataclass
class Budget:
    """Where the bytes for the weights come from."""

    device: str
    memory_bytes: int         # usable memory of the device's pools
    os_reserve_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    weights_bytes: int        # what is left for the weights

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PlannedTensor:
    """One tensor's planned type, its bytes in that type and the error the planner predicts for it."""

    type: str
    bytes: int
    n_elements: int
    error: float                # relative weight error of the type (measured or prior)
    weighted_error: float       # error times the tensor's impact (or usage): what the planner minimises
    cls: str                    # tensor class (inventory.TENSOR_CLASSES); "class" in the JSON
    layer: int | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d

    @staticmethod
    def from_dict(d: dict) -> "PlannedTensor":
        return PlannedTensor(d["type"], d["bytes"], d["n_elements"], d["error"], d["weighted_error"], d["class"],
                             d["layer"])


@dataclass
class Plan:
    """A GGUF type for every planned tensor of a model, for one device budget (artifact kind `plan`)."""

    model: str
    arch: str
    budget: Budget
    total_bytes: int            # weights, planned and fixed
    fixed_bytes: int            # tensors the plan leaves as they are (norms, router)
    file_bytes: int             # the GGUF the build will write
    n_expert: int
    n_expert_used: int
    experts_used_override: int | None   # activation adjustment written by the build, None: unchanged
    objective: str
    total_error: float
    tensors: dict[str, PlannedTensor]
    ctx: int | None = None
    parallel: int | None = None
    engine: str | None = None           # llama.cpp commit whose type sizes the plan used
    imatrix: str | None = None
    sensitivity_source: str | None = None   # "measured" or the prior's name

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("budget", "tensors")}
        return {**d, "budget": self.budget.to_dict(), "tensors": {n: t.to_dict() for n, t in self.tensors.items()}}

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        fields = {k: d.get(k) for k in Plan.__dataclass_fields__ if k not in ("budget", "tensors")}
        return Plan(**fields, budget=Budget(**d["budget"]),
                    tensors={n: PlannedTensor.from_dict(t) for n, t in d["tensors"].items()})


def device_budget(inv: ModelInventory, device: DeviceProfile, ctx: int, parallel: int,
                  budget_gb: float | None = None) -> Budget:
    """Device memory minus OS reserve, KV cache for ctx x parallel and compute buffers (or an explicit budget)."""
    memory = sum(p.usable_bytes for p in device.pools)
    reserve = int(device.os_reserve_gb * GB)
    kv = int(kv_bytes_per_token(inv) * ctx * parallel)
    weights = int(budget_gb * GB) if budget_gb else memory - reserve - kv - COMPUTE_BUFFER_BYTES
    return Budget(device.name, memory, reserve, kv, COMPUTE_BUFFER_BYTES, weights)


def _hull(options: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """Lower convex hull of (bytes, error) options, cheapest first: the only choices worth upgrading along."""
    pts = sorted(options, key=lambda o: (o[1], o[2]))
    frontier = []
    for o in pts:
        if frontier and o[2] >= frontier[-1][2]:
            continue                       # more bytes, no less error
        frontier.append(o)
    hull: list[tuple[str, int, float]] = []
    for o in frontier:
        while len(hull) >= 2:
            (_, b1, e1), (_, b2, e2) = hull[-2], hull[-1]
            if (e2 - e1) * (o[1] - b1) >= (o[2] - e1) * (b2 - b1):   # hull[-1] lies above the segment
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def tensor_weights(sensitivity: dict, impact: dict | None = None) -> dict[str, float]:
    """What one unit of a tensor's relative error costs: its measured output impact, else its usage."""
    measured = (impact or {}).get("impact", {})
    return {n: measured.get(n, t.get("usage", 1.0)) for n, t in sensitivity["tensors"].items()}


def choose_types(sensitivity: dict, budget_bytes: int, fixed_bytes: int = 0,
                 excluded: tuple[str, ...] = (), weights: dict[str, float] | None = None) -> dict[str, str]:
    """Greedy upgrades by error saved per byte along each tensor's hull, until the budget is spent."""
    import heapq

    weights = weights or tensor_weights(sensitivity)
    hulls = {}
    for name, t in sensitivity["tensors"].items():
        opts = [(k, t["bytes"][k], t["error"][k] * weights[name]) for k in t["error"] if k.lower() not in excluded]
        if not opts:
            raise CcmoeError(f"no allowed type for {name}", "allow more types on this device")
        hulls[name] = _hull(opts)
    choice = {n: 0 for n in hulls}
    spent = fixed_bytes + sum(h[0][1] for h in hulls.values())
    if spent > budget_bytes:
        raise CcmoeError(f"even the smallest plan needs {gb_text(spent)} but the budget for weights is "
                         f"{gb_text(budget_bytes)}", "raise --budget-gb, shorten --ctx/--parallel, or prune more experts",
                         EXIT_RESOURCE)

    def gain(name: str) -> tuple[float, str]:
        h, i = hulls[name], choice[name]
        (_, b0, e0), (_, b1, e1) = h[i], h[i + 1]
        return (-(e0 - e1) / max(b1 - b0, 1), name)

    heap = [gain(n) for n in hulls if len(hulls[n]) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], choice[name]
        extra = h[i + 1][1] - h[i][1]
        if spent + extra > budget_bytes:
            continue                       # this step does not fit; smaller steps of other tensors may
        spent += extra
        choice[name] = i + 1
        if choice[name] + 1 < len(h):
            heapq.heappush(heap, gain(name))
    return {n: hulls[n][i][0] for n, i in choice.items()}


def make_plan(inv: ModelInventory, sensitivity: dict, budget: Budget, excluded: tuple[str, ...] = (),
              impact: dict | None = None, experts_used: int | None = None) -> Plan:
    """The plan: a type, bytes and predicted error per tensor, and totals."""
    summary = summarize(inv)
    planned = set(sensitivity["tensors"])
    fixed = sum(t.n_bytes for t in inv.tensors if t.name not in planned)
    metadata_bytes = max(inv.file_bytes - sum(t.n_bytes for t in inv.tensors), 0)
    weights = tensor_weights(sensitivity, impact)
    types = choose_types(sensitivity, budget.weights_bytes, fixed, excluded, weights)
    tensors = {}
    for name, typ in types.items():
        t = sensitivity["tensors"][name]
        tensors[name] = PlannedTensor(typ, t["bytes"][typ], t["n_elements"], t["error"][typ],
                                      t["error"][typ] * weights[name], t["class"], t["layer"])
    total = fixed + sum(t.bytes for t in tensors.values())
    return Plan(model=inv.source, arch=inv.arch, budget=budget, total_bytes=total, fixed_bytes=fixed,
                file_bytes=total + metadata_bytes, n_expert=summary.n_expert, n_expert_used=summary.n_expert_used,
                experts_used_override=experts_used,
                objective="predicted KLD" if impact else "usage-weighted relative error",
                total_error=sum(t.weighted_error for t in tensors.values()), tensors=tensors)


def plan_overrides(plan: Plan) -> list[str]:
    """llama-quantize --override-kv values the build writes (experts used per token after pruning)."""
    used = plan.experts_used_override
    return [f"{plan.arch}.expert_used_count=int:{used}"] if used else []


def tensor_type_lines(plan: Plan) -> list[str]:
    """llama-quantize --tensor-type-file lines: one anchored `regex=type` per planned tensor."""
    return type_lines({name: t.type for name, t in plan.tensors.items()})


def type_lines(types: dict[str, str]) -> list[str]:
    """One anchored `^name$=type` line per tensor, sorted (llama-quantize lower-cases the patterns)."""
    return [f"^{re.escape(name)}$={typ.lower()}" for name, typ in sorted(types.items())]


def adjusted_experts_used(inv: ModelInventory, requested: int | None = None, original: int | None = None) -> int | None:
    """Experts per token after pruning: round(k x kept / original) (CC-MoE's activation adjustment), or the
    user's value; None when nothing changes. `original` defaults to the GGUF's ccmoe.original_expert_count."""
    summary = summarize(inv)
    n_expert, k = summary.n_expert, summary.n_expert_used
    if requested is not None:
        if not 1 <= requested <= n_expert:
            raise CcmoeError(f"--experts-used {requested} is outside 1..{n_expert} for this model",
                             f"pick a value between 1 and {n_expert}")
        return requested if requested != k else None
    if "ccmoe.pruning" in inv.metadata and original is None:
        return None                    # `ccmoe-run prune` already set k (adjusted, or the user's --experts-used)
    original = original or int(inv.metadata.get("ccmoe.original_expert_count", 0) or 0)
    k_original = int(inv.metadata.get("ccmoe.original_expert_used_count", 0) or 0) or k
    if not original or original <= n_expert:
        return None
    adjusted = max(1, round(k_original * n_expert / original))
    return adjusted if adjusted != k else None


def bits(n_bytes: float, n_elements: float) -> float:
    return 8 * n_bytes / n_elements if n_elements else 0.0


def class_bits(plan: Plan) -> dict[str, dict]:
    """Per tensor class: bytes, bits per weight and the types used (planned tensors only)."""
    out: dict[str, dict] = {}
    for t in plan.tensors.values():
        c = out.setdefault(t.cls, {"bytes": 0, "elements": 0, "types": {}})
        c["bytes"] += t.bytes
        c["elements"] += t.n_elements
        c["types"][t.type] = c["types"].get(t.type, 0) + 1
    for c in out.values():
        c["bpw"] = round(bits(c["bytes"], c["elements"]), 3)
    return out


def tensor_label(name: str) -> str:
    """A short column label: blk.3.ffn_down_exps.weight -> down_exps, blk.0.attn_kv_a_mqa.weight -> kv_a_mqa."""
    label = name.split(".", 2)[2].removesuffix(".weight").removeprefix("ffn_")
    return "attn_out" if label == "attn_output" else label.removeprefix("attn_")


def layer_grid(plan: Plan) -> tuple[list[int], list[str], dict[tuple[int, str], str]]:
    """Layers, tensor kinds (name without blk.N.) and the planned type of each (layer, kind)."""
    grid = {}
    for name, t in plan.tensors.items():
        if t.layer is not None:
            grid[(t.layer, tensor_label(name))] = t.type
    layers = sorted({k[0] for k in grid})
    ffn = ("gate", "up", "down")
    kinds = sorted({k[1] for k in grid}, key=lambda s: (s.split("_")[0] in ffn, s))
    return layers, kinds, grid


def summary_lines(plan: Plan) -> list[str]:
    """A readable summary: budget, totals, bits per class, and one line per layer with each tensor's type."""
    b = plan.budget
    lines = [f"plan for {plan.model} on {b.device}: {gb_text(plan.file_bytes)} file, weights "
             f"{gb_text(plan.total_bytes)} of a {gb_text(b.weights_bytes)} budget "
             f"(memory {gb_text(b.memory_bytes)} - OS {gb_text(b.os_reserve_bytes)} - KV cache "
             f"{gb_text(b.kv_cache_bytes)} - compute {gb_text(b.compute_bytes)})",
             f"objective: {plan.objective}, total {plan.total_error:.4g}"]
    if plan.experts_used_override:
        lines.append(f"experts used per token: {plan.n_expert_used} -> {plan.experts_used_override} "
                     f"(activation adjustment, written to the GGUF)")
    lines.append("class            bpw    size       types")
    for cls, c in sorted(class_bits(plan).items(), key=lambda kv: -kv[1]["bytes"]):
        types = ", ".join(f"{k} x{n}" for k, n in sorted(c["types"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{cls:<16} {c['bpw']:>5.2f}  {gb_text(c['bytes']):>10}  {types}")
    layers, kinds, grid = layer_grid(plan)
    if layers:
        width = max(7, *(len(k) for k in kinds))
        lines.append("layer " + " ".join(f"{k[:width]:>{width}}" for k in kinds))
        for layer in layers:
            lines.append(f"{layer:>5} " + " ".join(f"{grid.get((layer, k), '-'):>{width}}" for k in kinds))
    return lines
