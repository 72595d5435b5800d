"""Sensitivity: each tensor's error under each candidate type, measured with ggml's own quantizers.

Rows are sampled from every weight tensor (per expert for routed experts), quantized and dequantized
through libggml-base (ctypes), and the squared error is weighted per column by the imatrix. The result
is relative (error power / signal power), so tensors of any scale compare; routed experts combine their
per-expert errors weighted by measured activation frequency. Results are cached by content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.artifacts import save_artifact
from ..core.errors import CcmoeError
from ..core.files import write_atomic
from ..core.paths import cache_root
from ..engine.build import Engine
from ..engine.ggml import Ggml
from ..model.inventory import classify_tensor, shard_paths, summarize
from .priors import class_priors, prior_impact
from .priors import tensor_kind as kind_of

SENSITIVITY_VERSION = 2
LADDER = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "Q2_K", "Q3_K", "IQ4_XS", "Q4_K",
          "Q5_K", "Q6_K", "Q8_0")
NEVER_QUANTIZED = ("norm", "router")   # llama-quantize keeps norms and the router as they are
MAX_EXPERTS = 32                       # experts measured per tensor at most (a seeded sample beyond that)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Per weight, the mean squared activation of each input column: (n_per_row,) or (n_expert, n_per_row)."""
    import gguf

    sums, counts = {}, {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.array(t.data, dtype=np.float64)
    out = {}
    for name, s in sums.items():
        c = counts.get(name, np.ones(1)).reshape(s.shape[:-1] + (1,)) if s.ndim > 1 else counts.get(name, np.ones(1))
        out[name] = (s / np.maximum(c, 1.0)).astype(np.float32)
    return out


def _rows_as_float(t, ggml: Ggml, index: np.ndarray) -> np.ndarray:
    """Selected rows of a GGUF tensor (flattened over experts) as float32, whatever its storage type."""
    import gguf

    n_per_row = int(t.shape[0])
    data = np.asarray(t.data)
    flat = data.reshape(-1, data.shape[-1])[index]
    kind = t.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return flat.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.BF16:
        return (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return ggml.dequantize(int(kind), flat.tobytes(), len(index), n_per_row)


def _sample_index(experts: np.ndarray, rows_per_expert: int, want: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spread rows within each of `experts`, `want` per expert (all rows if fewer)."""
    take = min(want, rows_per_expert)
    per = np.sort(rng.choice(rows_per_expert, size=take, replace=False))
    return (experts[:, None] * rows_per_expert + per[None, :]).ravel()


def sample_experts(n_expert: int, max_experts: int, rng: np.random.Generator) -> np.ndarray:
    """Which experts of a tensor are measured: all when few, else a seeded sample of `max_experts`."""
    if n_expert <= max_experts:
        return np.arange(n_expert)
    return np.sort(rng.choice(n_expert, size=max_experts, replace=False))


def tensor_errors(ggml: Ggml, rows: np.ndarray, n_expert: int, importance: np.ndarray | None,
                  types: list[str]) -> dict[str, np.ndarray]:
    """For each type, the relative weighted error of each expert's sampled rows (one entry for 2D tensors)."""
    import gguf

    n_per_row = rows.shape[-1]
    rows = rows.reshape(n_expert, -1, n_per_row)
    imp = np.ones((n_expert, n_per_row), dtype=np.float32) if importance is None else \
        np.broadcast_to(importance.reshape(-1, n_per_row), (n_expert, n_per_row)).astype(np.float32)
    imp = np.maximum(imp, 1e-12)
    out = {}
    for name in types:
        tid = gguf.GGMLQuantizationType[name].value
        if n_per_row % ggml.block_size(tid) or (importance is None and ggml.requires_imatrix(tid)):
            continue                       # llama-quantize refuses these (e.g. IQ2 for token_embd, which has no imatrix)
        errs = np.empty(n_expert)
        guide = importance is not None
        for e in range(n_expert):
            errs[e] = ggml.relative_error(tid, rows[e], imp[e], imp[e] if guide else None)
        out[name] = errs
    return out


def _measure_one(ggml: Ggml, t, index: np.ndarray, experts: np.ndarray, imp: np.ndarray | None, types: tuple[str, ...],
                 cache: Path | None) -> dict[str, np.ndarray]:
    """One tensor's per-type errors of its sampled experts (ggml's C calls release the GIL: run in threads)."""
    rows = _rows_as_float(t, ggml, index)
    if imp is not None and imp.ndim > 1:
        imp = imp[experts]
    key = hashlib.sha256(b"".join([rows.tobytes(), b"" if imp is None else imp.tobytes(),
                                   json.dumps([SENSITIVITY_VERSION, list(types)]).encode()])).hexdigest()
    cached = cache / f"{key}.json" if cache else None
    if cached and cached.is_file():
        return {k: np.array(v) for k, v in json.loads(cached.read_text()).items()}
    per_type = tensor_errors(ggml, rows, len(experts), imp, list(types))
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, json.dumps({k: v.tolist() for k, v in per_type.items()}).encode())
    return per_type


def measure_sensitivity(engine: Engine, model: Path, imatrix: Path | None = None, expert_stats: dict | None = None,
                        types: tuple[str, ...] = LADDER, rows_per_expert: int = 16, seed: int = 0,
                        use_cache: bool = True, max_experts: int = MAX_EXPERTS, threads: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """Per tensor: class, layer, bytes and relative error under each candidate type (plain data).

    At most `max_experts` experts x `rows_per_expert` rows of each tensor are measured, so the cost does not
    grow with the model; tensors are measured in parallel over `threads` (default: every core)."""
    import gguf

    ggml = Ggml(engine)
    readers = [gguf.GGUFReader(str(p)) for p in shard_paths(Path(model))]     # every shard of a split GGUF
    importance = read_imatrix(imatrix) if imatrix else {}
    if not importance:
        types = tuple(t for t in types if not ggml.requires_imatrix(gguf.GGMLQuantizationType[t].value))
    freq_by_layer = {int(k): np.array(v["frequency"]) for k, v in (expert_stats or {}).get("layers", {}).items()}
    rng = np.random.default_rng(seed)
    cache = cache_root() / "sensitivity" if use_cache else None
    jobs = []
    for t in (t for r in readers for t in r.tensors):
        shape = [int(x) for x in t.shape]
        if len(shape) < 2 or classify_tensor(t.name) in NEVER_QUANTIZED:
            continue
        experts = sample_experts(shape[2] if len(shape) == 3 else 1, max_experts, rng)
        jobs.append((t, shape, experts, _sample_index(experts, shape[1], rows_per_expert, rng)))
    if not jobs:
        raise CcmoeError(f"{model} has no quantizable weight tensors", "pass a model GGUF, not an imatrix or vocabulary")
    workers = max(1, min(threads or os.cpu_count() or 1, len(jobs)))
    results = {}
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(_measure_one, ggml, t, index, experts, importance.get(t.name), types, cache): t.name
                   for t, _, experts, index in jobs}
        for done, f in enumerate(as_completed(futures), 1):
            results[futures[f]] = f.result()
            if progress:
                progress(done, len(jobs))
    tensors = {}
    for t, shape, experts, _ in jobs:
        per_type = results[t.name]
        cls = classify_tensor(t.name)
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
        n_expert = shape[2] if len(shape) == 3 else 1
        freq = freq_by_layer.get(layer) if cls == "routed_expert" else None
        freq = freq if freq is not None and len(freq) == n_expert and freq.sum() > 0 else None
        weights = freq[experts] if freq is not None else np.ones(len(experts))
        if weights.sum() <= 0:                 # only unused experts were sampled: count them equally
            weights = np.ones(len(experts))
        n_rows = int(np.prod(shape[1:]))
        tensors[t.name] = {
            "class": cls, "layer": layer, "shape": shape, "source_type": t.tensor_type.name,
            "n_elements": int(np.prod(shape)),
            "usage": float(freq.sum()) if freq is not None else 1.0,
            "error": {k: float((v * weights).sum() / weights.sum()) for k, v in per_type.items()},
            "bytes": {k: ggml.row_size(gguf.GGMLQuantizationType[k].value, shape[0]) * n_rows for k in per_type},
        }
        if len(experts) < n_expert:
            tensors[t.name]["experts_sampled"] = len(experts)
    return {"model": str(model), "imatrix": str(imatrix) if imatrix else None, "types": list(types),
            "rows_per_expert": rows_per_expert, "max_experts": max_experts, "tensors": tensors}


def save_sensitivity(result: dict, path: Path, force: bool = True) -> Path:
    return save_artifact(path, "sensitivity", SENSITIVITY_VERSION, result, force=force)


# ---------------------------------------------------------------- planning without weights
# Output impact per unit of relative error, by tensor kind, measured on the bundled model with
# `ccmoe-run profile` (impact.py; docs/compression.md). Whole-model tensors as measured; per-layer kinds as
# the sum over the model's layers, so that a layer of an L-layer model gets 1/L of it.
PRIOR_IMPACT = {"output": 0.54, "token_embd": 0.20, "ffn_down": 0.18, "ffn_gate": 0.09, "ffn_up": 0.045,
                "attn_v": 0.063, "attn_kv_b": 0.063, "attn_output": 0.05, "attn_q": 0.035, "attn_q_a": 0.035,
                "attn_q_b": 0.035, "attn_k": 0.033, "attn_kv_a_mqa": 0.033}
PRIOR_ROWS, PRIOR_COLUMNS = 16, 1024


def prior_kind(name: str) -> str:
    """The PRIOR_IMPACT key of a tensor: output, token_embd, attn_v, ffn_down (for dense, shared and routed)..."""
    base = name.split(".")[-2] if name.endswith((".weight", ".bias")) else name.split(".")[-1]
    base = re.sub(r"_(exps|shexp|chexps)$", "", base)
    return base if base in PRIOR_IMPACT else "ffn_down" if base.startswith("ffn_") else "attn_output"


GAUSSIAN_TABLE = Path(__file__).with_name("gaussian-errors.json")   # ggml's figures for the pinned engine


def gaussian_errors(ggml: Ggml, types: tuple[str, ...], seed: int = 0) -> dict[str, float]:
    """Relative error of each type on Gaussian rows: the error model when the weights are not at hand."""
    import gguf

    rows = np.random.default_rng(seed).standard_normal((PRIOR_ROWS, PRIOR_COLUMNS)).astype(np.float32)
    flat = np.ones(PRIOR_COLUMNS, dtype=np.float32)
    return {t: ggml.relative_error(gguf.GGMLQuantizationType[t].value, rows, flat, flat) for t in types}


def gaussian_table(engine: Engine, ggml: Ggml, types: tuple[str, ...]) -> dict[str, float]:
    """gaussian_errors for this engine's commit: shipped for the pinned engine (ggml's IQ grids take ~10 s to
    set up), else measured once and cached."""
    for path in (GAUSSIAN_TABLE, cache_root() / "sensitivity" / f"gaussian-{engine.commit}.json"):
        if path.is_file():
            doc = json.loads(path.read_text())
            if doc.get("commit") == engine.commit and set(types) <= set(doc["errors"]):
                return {t: doc["errors"][t] for t in types}
    errors = gaussian_errors(ggml, types)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"commit": engine.commit, "rows": PRIOR_ROWS, "columns": PRIOR_COLUMNS,
                                "errors": errors}, indent=1) + "\n")
    return errors


def layers_by_kind(inv) -> Counter:
    """How many layers have each tensor kind (the priors share a kind's total over them)."""
    return Counter(kind_of(t.name) for t in inv.tensors if t.name.startswith("blk."))


def prior_impact_artifact(inv, sensitivity: dict) -> dict | None:
    """Impact of every measured tensor from the shipped class priors of the model's family (None without any):
    what the planner weighs errors by when probe builds are too expensive."""
    measured = class_priors(inv.arch)
    if not measured:
        return None
    n_layer, kinds = max(summarize(inv).n_layers, 1), layers_by_kind(inv)
    impact = {n: prior_impact(measured, n, t["layer"], n_layer, kinds[kind_of(n)]) for n, t in sensitivity["tensors"].items()}
    return {"model": inv.source, "source": f"class priors: {measured['source']}", "prior": True, "groups": {},
            "impact": {n: v for n, v in impact.items() if v is not None}}


def prior_sensitivity(engine: Engine, inv, types: tuple[str, ...] = LADDER) -> dict:
    """Sensitivity of every tensor of an inventory from Gaussian-row errors and impact priors by tensor kind."""
    import gguf

    ggml = Ggml(engine)
    errors = gaussian_table(engine, ggml, types)
    summary = summarize(inv)
    n_layer, share = max(summary.n_layers, 1), summary.n_expert_used / max(summary.n_expert, 1)
    measured = class_priors(inv.arch)
    kind_layers = layers_by_kind(inv)
    tensors = {}
    for t in inv.tensors:
        cls = classify_tensor(t.name)
        if len(t.shape) < 2 or cls in NEVER_QUANTIZED:
            continue
        n_per_row, n_rows = t.shape[0], int(np.prod(t.shape[1:]))
        ok = [k for k in types if n_per_row % ggml.block_size(gguf.GGMLQuantizationType[k].value) == 0]
        if cls == "embed_output":          # no imatrix data there (see tensor_errors)
            ok = [k for k in ok if not ggml.requires_imatrix(gguf.GGMLQuantizationType[k].value)]
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
        usage = prior_impact(measured, t.name, layer, n_layer, kind_layers[kind_of(t.name)]) if measured else None
        if usage is None:   # the bundled qwen3moe's kind table, routed experts weighted by their share of tokens
            usage = PRIOR_IMPACT[prior_kind(t.name)] / (1 if layer is None else n_layer)
            usage *= share if cls == "routed_expert" else 1.0
        tensors[t.name] = {
            "class": cls, "layer": layer, "shape": list(t.shape), "source_type": t.ggml_type,
            "n_elements": t.n_elements, "usage": usage,
            "error": {k: errors[k] for k in ok},
            "bytes": {k: ggml.row_size(gguf.GGMLQuantizationType[k].value, n_per_row) * n_rows for k in ok},
        }
    return {"model": inv.source, "imatrix": None, "types": list(types), "rows_per_expert": 0,
            "prior": f"gaussian rows x {measured['source'] if measured else 'impact by tensor kind'}", "tensors": tensors}
