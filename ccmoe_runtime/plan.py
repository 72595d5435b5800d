"""Planning: a GGUF type for every tensor that minimises the total measured error under a byte budget."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .devices import GB, DeviceProfile
from .errors import EXIT_RESOURCE, CcmoeError
from .inventory import ModelInventory, summarize

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


def kv_bytes_per_token(inv: ModelInventory, kv_type_bytes: float = 2.0) -> float:
    """KV cache bytes one token of context takes (f16 by default); MLA stores the latent and the RoPE key."""
    n_layer = int(inv.key("block_count", 0) or 0)
    if inv.arch in ("deepseek2",) and inv.key("attention.kv_lora_rank"):
        rope = int(inv.key("rope.dimension_count", 64) or 64)
        return n_layer * (int(inv.key("attention.kv_lora_rank")) + rope) * kv_type_bytes
    heads = int(inv.key("attention.head_count", 1) or 1)
    heads_kv = int(inv.key("attention.head_count_kv", 0) or heads)
    head_dim = int(inv.key("attention.key_length", 0) or int(inv.key("embedding_length", 0)) // heads)
    return n_layer * 2 * heads_kv * head_dim * kv_type_bytes


def device_budget(inv: ModelInventory, device: DeviceProfile, ctx: int, parallel: int,
                  budget_gb: float | None = None) -> Budget:
    """Device memory minus OS reserve, KV cache for ctx x parallel and compute buffers (or an explicit budget)."""
    memory = sum(p.usable_bytes for p in device.pools)
    reserve = int(device.os_reserve_gb * GB)
    kv = int(kv_bytes_per_token(inv) * ctx * parallel)
    weights = int(budget_gb * GB) if budget_gb else memory - reserve - kv - COMPUTE_BUFFER_BYTES
    return Budget(device.name, memory, reserve, kv, COMPUTE_BUFFER_BYTES, weights)


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= GB else f"{n / 1e6:.1f} MB"


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
        raise CcmoeError(f"even the smallest plan needs {_size(spent)} but the budget for weights is "
                         f"{_size(budget_bytes)}", "raise --budget-gb, shorten --ctx/--parallel, or prune more experts",
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
              impact: dict | None = None, experts_used: int | None = None) -> dict:
    """The plan as plain data: a type, bytes and predicted error per tensor, and totals."""
    summary = summarize(inv)
    planned = set(sensitivity["tensors"])
    fixed = sum(t.n_bytes for t in inv.tensors if t.name not in planned)
    metadata_bytes = max(inv.file_bytes - sum(t.n_bytes for t in inv.tensors), 0)
    weights = tensor_weights(sensitivity, impact)
    types = choose_types(sensitivity, budget.weights_bytes, fixed, excluded, weights)
    tensors = {}
    for name, typ in types.items():
        t = sensitivity["tensors"][name]
        tensors[name] = {"type": typ, "bytes": t["bytes"][typ], "n_elements": t["n_elements"], "error": t["error"][typ],
                         "weighted_error": t["error"][typ] * weights[name], "class": t["class"], "layer": t["layer"]}
    total = fixed + sum(t["bytes"] for t in tensors.values())
    return {"model": inv.source, "arch": inv.arch, "budget": budget.to_dict(), "total_bytes": total,
            "fixed_bytes": fixed, "file_bytes": total + metadata_bytes, "n_expert": summary.n_expert,
            "n_expert_used": summary.n_expert_used, "experts_used_override": experts_used,
            "objective": "predicted KLD" if impact else "usage-weighted relative error",
            "total_error": sum(t["weighted_error"] for t in tensors.values()), "tensors": tensors}


def plan_overrides(plan: dict) -> list[str]:
    """llama-quantize --override-kv values the build writes (experts used per token after pruning)."""
    used = plan.get("experts_used_override")
    return [f"{plan['arch']}.expert_used_count=int:{used}"] if used else []


def tensor_type_lines(plan: dict) -> list[str]:
    """llama-quantize --tensor-type-file lines: one anchored `regex=type` per tensor (patterns are lower-cased)."""
    return [f"^{re.escape(name)}$={t['type'].lower()}" for name, t in sorted(plan["tensors"].items())]


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


def class_bits(plan: dict) -> dict[str, dict]:
    """Per tensor class: bytes, bits per weight and the types used (planned tensors only)."""
    out: dict[str, dict] = {}
    for t in plan["tensors"].values():
        c = out.setdefault(t["class"], {"bytes": 0, "elements": 0, "types": {}})
        c["bytes"] += t["bytes"]
        c["elements"] += t["n_elements"]
        c["types"][t["type"]] = c["types"].get(t["type"], 0) + 1
    for c in out.values():
        c["bpw"] = round(bits(c["bytes"], c["elements"]), 3)
    return out


def tensor_label(name: str) -> str:
    """A short column label: blk.3.ffn_down_exps.weight -> down_exps, blk.0.attn_kv_a_mqa.weight -> kv_a_mqa."""
    label = name.split(".", 2)[2].removesuffix(".weight").removeprefix("ffn_")
    return "attn_out" if label == "attn_output" else label.removeprefix("attn_")


def layer_grid(plan: dict) -> tuple[list[int], list[str], dict[tuple[int, str], str]]:
    """Layers, tensor kinds (name without blk.N.) and the planned type of each (layer, kind)."""
    grid = {}
    for name, t in plan["tensors"].items():
        if t["layer"] is not None:
            grid[(t["layer"], tensor_label(name))] = t["type"]
    layers = sorted({k[0] for k in grid})
    ffn = ("gate", "up", "down")
    kinds = sorted({k[1] for k in grid}, key=lambda s: (s.split("_")[0] in ffn, s))
    return layers, kinds, grid


def summary_lines(plan: dict) -> list[str]:
    """A readable summary: budget, totals, bits per class, and one line per layer with each tensor's type."""
    b = plan["budget"]
    lines = [f"plan for {plan['model']} on {b['device']}: {_size(plan['file_bytes'])} file, weights "
             f"{_size(plan['total_bytes'])} of a {_size(b['weights_bytes'])} budget "
             f"(memory {_size(b['memory_bytes'])} - OS {_size(b['os_reserve_bytes'])} - KV cache "
             f"{_size(b['kv_cache_bytes'])} - compute {_size(b['compute_bytes'])})",
             f"objective: {plan['objective']}, total {plan['total_error']:.4g}"]
    if plan.get("experts_used_override"):
        lines.append(f"experts used per token: {plan['n_expert_used']} -> {plan['experts_used_override']} "
                     f"(activation adjustment, written to the GGUF)")
    lines.append("class            bpw    size       types")
    for cls, c in sorted(class_bits(plan).items(), key=lambda kv: -kv[1]["bytes"]):
        types = ", ".join(f"{k} x{n}" for k, n in sorted(c["types"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{cls:<16} {c['bpw']:>5.2f}  {_size(c['bytes']):>10}  {types}")
    layers, kinds, grid = layer_grid(plan)
    if layers:
        width = max(7, *(len(k) for k in kinds))
        lines.append("layer " + " ".join(f"{k[:width]:>{width}}" for k in kinds))
        for layer in layers:
            lines.append(f"{layer:>5} " + " ".join(f"{grid.get((layer, k), '-'):>{width}}" for k in kinds))
    return lines
