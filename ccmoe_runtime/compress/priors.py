"""Measured class priors: output impact per tensor kind and depth, from the project's reference models.

`ccmoe-run measure --impact` on the deepseek2 reference model (testmodels/reference.py) gives every tensor's
KLD per unit of relative weight error; `priors_from_impact` folds that into one number per tensor kind (the
sum over the layers that have it) and a depth profile (mean 1 over DEPTH_BANDS bands of the layer stack).
The weight-less planner (sensitivity.prior_sensitivity) reads them for models of the same family.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PRIORS_DIR = Path(__file__).with_name("data")
PRIORS_VERSION = 1
FAMILIES = {"deepseek2": "deepseek2"}     # GGUF architecture -> priors file (DeepSeek-V2/V3/R1, Kimi K2)
DEPTH_BANDS = 3


def tensor_kind(name: str) -> str:
    """blk.7.ffn_down_exps.weight -> ffn_down_exps; output.weight -> output."""
    return re.sub(r"\.(weight|bias)$", "", re.sub(r"^blk\.\d+\.", "", name))


def band_of(layer: int, n_layer: int, bands: int = DEPTH_BANDS) -> int:
    return min(bands - 1, layer * bands // max(n_layer, 1))


def class_priors(arch: str) -> dict | None:
    """The shipped priors for an architecture's family, or None when none were measured."""
    family = FAMILIES.get(arch)
    path = PRIORS_DIR / f"class-priors-{family}.json"
    if family is None or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("version") == PRIORS_VERSION else None


def prior_impact(priors: dict, name: str, layer: int | None, n_layer: int, layers_with_kind: int) -> float | None:
    """A tensor's impact: its kind's total shared over the layers that have it, times its depth band's factor."""
    kind = tensor_kind(name)
    kind = priors.get("aliases", {}).get(kind, kind)
    entry = priors["kinds"].get(kind)
    if entry is None:
        return None
    if layer is None:
        return entry["total"]
    depth = entry.get("depth") or [1.0]
    return entry["total"] / max(layers_with_kind, 1) * depth[band_of(layer, n_layer, len(depth))]


def priors_from_impact(impact: dict, n_layer: int, source: str, bands: int = DEPTH_BANDS) -> dict:
    """Fold a measured impact artifact (per tensor) into per-kind totals and depth profiles."""
    per_kind: dict[str, dict[int | None, float]] = {}
    for name, value in impact["impact"].items():
        m = re.match(r"^blk\.(\d+)\.", name)
        per_kind.setdefault(tensor_kind(name), {})[int(m.group(1)) if m else None] = value
    kinds = {}
    for kind, by_layer in sorted(per_kind.items()):
        entry = {"total": sum(by_layer.values()), "layers": len(by_layer)}
        layered = {k: v for k, v in by_layer.items() if k is not None}
        if layered:
            sums = [[v for k, v in layered.items() if band_of(k, n_layer, bands) == b] for b in range(bands)]
            means = [sum(s) / len(s) if s else None for s in sums]
            mean = sum(layered.values()) / len(layered)
            entry["depth"] = [round(m / mean, 4) if m is not None else 1.0 for m in means]
            entry["per_layer"] = {str(k): v for k, v in sorted(layered.items())}
        kinds[kind] = entry
    return {"version": PRIORS_VERSION, "source": source, "n_layer": n_layer, "bands": bands,
            "reference_kld": impact.get("reference_kld"), "ctx": impact.get("ctx"),
            "aliases": {"attn_kv_b": "attn_v_b", "attn_q": "attn_q_b"}, "kinds": kinds}
