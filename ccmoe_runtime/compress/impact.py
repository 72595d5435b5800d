"""Output impact: how far each tensor's quantization error moves the model's output distribution.

The relative weight error of a tensor (sensitivity.py) says how well a type reproduces its weights, not how
much that matters for the model's answers. Here each tensor (or group of tensors) is quantized alone to a
low type while the rest stays at Q8_0, and llama-perplexity measures the KL-divergence against the
unquantized model on calibration text. KLD is second order in small logit changes, so it grows linearly
with the error power: impact = extra KLD per unit of relative error, and the planner minimises
sum(impact x relative error), a predicted KLD.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.artifacts import save_artifact
from ..engine.build import Engine
from ..engine.tools import quantize
from ..model.inventory import is_quantized, read_gguf
from .quality import kl_divergence, save_reference_logits

IMPACT_VERSION = 1
IMPACT_MAX_BYTES = 4 * 10**9   # probe builds rebuild the whole model once per group: by default only models up to 4 GB
PROBE_TYPES = ("IQ2_XXS", "Q2_K", "Q4_0")   # low enough to be measured well above noise, but not saturated;
# Q4_0 (32-weight blocks) only where measured: rows shorter than the K/IQ types' 256 (the small reference models)
REFERENCE_TYPE = "Q8_0"                # llama-quantize applies per-tensor types only on a quantized base


def tensor_kind(name: str) -> str:
    """A tensor's name without its layer number: blk.3.ffn_up_exps.weight -> blk.*.ffn_up_exps.weight."""
    return re.sub(r"^blk\.\d+\.", "blk.*.", name)


def probe_groups(sensitivity: dict, max_probes: int) -> dict[str, list[str]]:
    """Tensors measured together: one each when few, else by kind and band of neighbouring layers."""
    names = sorted(sensitivity["tensors"])
    if len(names) <= max_probes:
        return {n: [n] for n in names}
    kinds = sorted({tensor_kind(n) for n in names})
    layers = [t["layer"] for t in sensitivity["tensors"].values() if t["layer"] is not None]
    n_layer = max(layers) + 1 if layers else 1
    bands = max(1, min(n_layer, max_probes // max(len(kinds), 1)))
    groups: dict[str, list[str]] = {}
    for n in names:
        layer = sensitivity["tensors"][n]["layer"]
        band = 0 if layer is None else layer * bands // n_layer
        groups.setdefault(f"{tensor_kind(n)}#{band}", []).append(n)
    return groups


def probe_type(entry: dict) -> str | None:
    """The type a tensor is probed at: the first of PROBE_TYPES it was measured for."""
    return next((t for t in PROBE_TYPES if t in entry["error"]), None)


def _error_gap(sensitivity: dict, names: list[str], typ: str) -> float:
    tensors = sensitivity["tensors"]
    return sum(tensors[n]["error"][typ] - tensors[n]["error"].get(REFERENCE_TYPE, 0.0) for n in names)


def measure_impact(engine: Engine, model: Path, sensitivity: dict, text: Path, work: Path,
                   imatrix: Path | None = None, max_probes: int = 64, ctx: int = 256, chunks: int | None = None,
                   threads: int | None = None, progress=None) -> dict:
    """Per tensor, the KLD added per unit of relative error, from one probe build per group."""
    work.mkdir(parents=True, exist_ok=True)
    logits = save_reference_logits(engine, model, text, work / "reference.kld", ctx=ctx, threads=threads, chunks=chunks)
    probe = work / "probe.gguf"
    flags = ("--allow-requantize",) if is_quantized(read_gguf(model)) else ()     # e.g. a Q8_0 source
    quantize(engine, model, probe, REFERENCE_TYPE, [], imatrix=imatrix, threads=threads, flags=flags)
    base = kl_divergence(engine, probe, logits, ctx=ctx, threads=threads)
    groups = probe_groups(sensitivity, max_probes)
    measured: dict[str, dict] = {}
    for i, (group, names) in enumerate(groups.items()):
        typ = probe_type(sensitivity["tensors"][names[0]])
        if typ is None or _error_gap(sensitivity, names, typ) <= 0:
            continue
        lines = [f"^{re.escape(n)}$={typ.lower()}" for n in names]
        quantize(engine, model, probe, REFERENCE_TYPE, lines, imatrix=imatrix, threads=threads, flags=flags)
        q = kl_divergence(engine, probe, logits, ctx=ctx, threads=threads)
        measured[group] = {"tensors": names, "type": typ, "kld": q.mean_kld, "delta_kld": q.mean_kld - base.mean_kld,
                           "error_gap": _error_gap(sensitivity, names, typ)}
        if progress:
            progress(i + 1, len(groups))
    probe.unlink(missing_ok=True)
    floor = max(base.mean_kld_se, 1e-9)                 # a probe below the noise counts as the noise level
    impact = {}
    for g in measured.values():
        g["impact"] = max(g["delta_kld"], floor) / g["error_gap"]
        impact.update({n: g["impact"] for n in g["tensors"]})
    return {"model": str(model), "text": str(text), "ctx": ctx, "reference_type": REFERENCE_TYPE,
            "reference_kld": base.mean_kld, "reference_kld_se": base.mean_kld_se, "groups": measured,
            "impact": impact}


def save_impact(result: dict, path: Path, force: bool = True) -> Path:
    return save_artifact(path, "impact", IMPACT_VERSION, result, force=force)
