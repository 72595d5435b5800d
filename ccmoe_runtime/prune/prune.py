"""Expert pruning from router statistics: keep the N most important experts of every MoE layer.

Importance of expert e in a layer: I = alpha * F + (1 - alpha) * S, where F is its activation frequency (share
of tokens routed to it) and S its mean routing score (the final weight its output was multiplied by, over
the tokens that picked it), each divided by the layer's largest value so both lie in [0, 1] with the top
expert at 1. alpha = 1 is frequency-only pruning; `random` keeps a seeded random set (a baseline).

Every MoE layer keeps the same N experts (llama.cpp has one expert count). The expert tensors
(`ffn_{gate,up,down,gate_up}_exps` weights, biases and per-expert scales), the router rows
(`ffn_gate_inp`) and the expert selection bias (`exp_probs_b`) are sliced along the expert axis, which for
quantized tensors is a byte slice. Everything else (shared experts, dense layers, metadata) is copied
byte for byte. Experts used per token become max(1, round(k x N / E)) of the original k and E (CC-MoE's
activation adjustment) unless given.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..compress.imatrix import fit_to_model, read_imatrix_file, slice_experts, write_imatrix_gguf
from ..compress.router import cached_router_stats, router_stats_path
from ..core.errors import CcmoeError
from ..core.files import check_writable, read_text, staged_output
from ..core.units import human_size
from ..engine.build import Engine
from ..model.inventory import (
    ModelInventory,
    MoeSummary,
    read_gguf,
    require_moe,
    shard_paths,
    summarize,
)

PRUNE_METHODS = ("importance", "frequency", "random")
DEFAULT_ALPHA = 0.5
DISK_MARGIN = 1.02
_EXPERT_AXIS = re.compile(r"^blk\.(\d+)\.(?:ffn_(?:gate|up|down|gate_up)_exps|ffn_gate_inp|exp_probs_b|exp_probs_b_vl)\."
                          r"(?:weight|bias|scale)$")
_UNSUPPORTED = re.compile(r"_chexps\.|\.ffn_(?:gate|up|down)\.\d+\.weight$")


@dataclass
class ExpertCounts:
    """Expert counts before and after pruning, and the metadata keys that change."""

    n_expert: int
    n_keep: int
    experts_used: int
    experts_used_new: int
    original_expert_count: int
    original_expert_used_count: int
    groups: int = 0
    groups_used: int = 0
    groups_new: int = 0
    groups_used_new: int = 0
    balanced_groups: bool = False
    notes: list[str] = field(default_factory=list)
    user_experts_used: bool = False      # --experts-used was given (not the activation adjustment)


# ---------------------------------------------------------------- choosing experts

def resolve_keep(n_expert: int, keep: int | None, keep_ratio: float | None) -> int:
    """Experts to keep per layer from --keep or --keep-ratio (ceil(ratio x E), as CC-MoE)."""
    if (keep is None) == (keep_ratio is None):
        raise CcmoeError("pass exactly one of --keep N and --keep-ratio R", "e.g. --keep-ratio 0.75")
    if keep_ratio is not None:
        if not 0 < keep_ratio < 1:
            raise CcmoeError(f"--keep-ratio {keep_ratio} is outside (0, 1)", "pass a share such as 0.75")
        keep = math.ceil(keep_ratio * n_expert - 1e-9)
    if not 1 <= keep < n_expert:
        raise CcmoeError(f"cannot keep {keep} of {n_expert} experts", f"keep between 1 and {n_expert - 1}")
    return keep


def check_method(method: str, alpha: float) -> float | None:
    """The alpha a method uses (1 for frequency, None for random); refuses unknown methods and bad alphas."""
    if method not in PRUNE_METHODS:
        raise CcmoeError(f"unknown pruning method {method!r}", f"choose one of: {', '.join(PRUNE_METHODS)}")
    if not 0.0 <= alpha <= 1.0:
        raise CcmoeError(f"--alpha {alpha} is outside [0, 1]", "pass a weight between 0 and 1")
    return {"importance": alpha, "frequency": 1.0, "random": None}[method]


def _by_max(x: np.ndarray) -> np.ndarray:
    top = float(x.max()) if x.size else 0.0
    return x / top if top > 0 else np.zeros_like(x)


def importance(layer: dict, alpha: float) -> np.ndarray:
    """alpha x frequency + (1 - alpha) x mean score, each divided by the layer's maximum."""
    freq = np.asarray(layer["frequency"], dtype=np.float64)
    score = np.asarray(layer["mean_score"], dtype=np.float64)
    return alpha * _by_max(freq) + (1 - alpha) * _by_max(score)


def rank_experts(layer: dict | None, n_expert: int, alpha: float | None, rng: np.random.Generator) -> np.ndarray:
    """Expert ids, most important first (ties: more frequent, then lower id); random order when alpha is None."""
    if alpha is None:
        return rng.permutation(n_expert)
    imp = importance(layer, alpha)
    freq = np.asarray(layer["frequency"], dtype=np.float64)
    return np.lexsort((np.arange(n_expert), -freq, -imp))


def choose_experts(stats: dict | None, layers: list[int], n_expert: int, n_keep: int, alpha: float | None,
                   seed: int = 0, groups: int = 1) -> dict[int, list[int]]:
    """Per MoE layer, the sorted ids of the experts to keep; with groups > 1, n_keep / groups from each group."""
    rng = np.random.default_rng(seed)
    kept: dict[int, list[int]] = {}
    size, per = n_expert // max(groups, 1), n_keep // max(groups, 1)
    for layer in layers:
        order = rank_experts(stats["layers"][str(layer)] if stats else None, n_expert, alpha, rng)
        if groups > 1:
            chosen = [e for g in range(groups) for e in [x for x in order if x // size == g][:per]]
        else:
            chosen = order[:n_keep]
        kept[layer] = sorted(int(e) for e in chosen)
    return kept


# ---------------------------------------------------------------- metadata

def _meta_int(inv: ModelInventory, key: str) -> int:
    value = inv.metadata.get(key)
    if isinstance(value, list):
        raise CcmoeError(f"{inv.source} stores {key} per layer", "pruning supports one value for all layers")
    return int(value or 0)


def _groups(counts: ExpertCounts) -> None:
    """Keep DeepSeek's expert groups valid: balanced groups when N divides evenly, else group routing off."""
    g, gu, n, k = counts.groups, counts.groups_used, counts.n_keep, counts.experts_used_new
    if g <= 1:
        counts.groups_new, counts.groups_used_new = g, gu
        return
    per = n // g
    if n % g == 0 and per >= 2 and k <= per * gu:
        counts.groups_new, counts.groups_used_new, counts.balanced_groups = g, gu, True
        counts.notes.append(f"kept the {per} most important experts of each of the {g} expert groups")
        return
    counts.groups_new, counts.groups_used_new = (1, 1) if n > 1 else (0, 0)
    counts.notes.append(f"{n} experts do not split into {g} groups of at least 2 (with {k} used in {gu} groups): "
                        f"group-limited routing turned off (expert_group_count={counts.groups_new})")


def expert_counts_after(inv: ModelInventory, summary: MoeSummary, n_keep: int,
                        experts_used: int | None = None) -> ExpertCounts:
    """Expert and group counts of the pruned model; refuses N < k and impossible --experts-used."""
    arch, k, e = inv.arch, summary.n_expert_used, summary.n_expert
    _meta_int(inv, f"{arch}.expert_count")
    _meta_int(inv, f"{arch}.expert_used_count")
    e_orig = int(inv.metadata.get("ccmoe.original_expert_count") or 0) or e
    k_orig = int(inv.metadata.get("ccmoe.original_expert_used_count") or 0) or k
    if experts_used is not None and not 1 <= experts_used <= n_keep:
        raise CcmoeError(f"--experts-used {experts_used} is outside 1..{n_keep} (the experts kept)",
                         f"pick a value between 1 and {n_keep}")
    if experts_used is None and n_keep < k:
        raise CcmoeError(f"keeping {n_keep} experts is fewer than the {k} used per token",
                         f"keep at least {k} experts or pass --experts-used")
    k_new = experts_used if experts_used is not None else max(1, round(k_orig * n_keep / e_orig))
    counts = ExpertCounts(e, n_keep, k, min(k_new, n_keep), e_orig, k_orig,
                          _meta_int(inv, f"{arch}.expert_group_count"),
                          _meta_int(inv, f"{arch}.expert_group_used_count"))
    counts.user_experts_used = experts_used is not None
    _groups(counts)
    return counts


def metadata_updates(arch: str, counts: ExpertCounts, kept_original: dict[int, list[int]],
                     choice: dict) -> dict[str, tuple[Any, Any]]:
    """The GGUF keys to set: name -> (value, GGUFValueType)."""
    import gguf

    u32, text = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    kv = {f"{arch}.expert_count": (counts.n_keep, u32), f"{arch}.expert_used_count": (counts.experts_used_new, u32),
          "ccmoe.original_expert_count": (counts.original_expert_count, u32),
          "ccmoe.original_expert_used_count": (counts.original_expert_used_count, u32),
          "ccmoe.pruned_experts": (json.dumps({str(k): v for k, v in kept_original.items()}), text),
          "ccmoe.pruning": (json.dumps(choice, sort_keys=True), text)}
    if counts.groups > 1:
        kv[f"{arch}.expert_group_count"] = (counts.groups_new, u32)
        kv[f"{arch}.expert_group_used_count"] = (counts.groups_used_new, u32)
    return kv


def original_ids(inv: ModelInventory, kept: dict[int, list[int]]) -> dict[int, list[int]]:
    """Kept experts as ids of the first, unpruned model (an input pruned before recorded its own)."""
    try:
        before = json.loads(inv.metadata.get("ccmoe.pruned_experts") or "{}")
    except (TypeError, json.JSONDecodeError):
        before = {}
    return {layer: [before[str(layer)][i] for i in ids] if str(layer) in before else list(ids)
            for layer, ids in kept.items()}


# ---------------------------------------------------------------- writing the GGUF

def check_prunable(inv: ModelInventory, summary: MoeSummary) -> None:
    """Refuse layouts whose experts cannot be sliced here, and expert tensors of the wrong width."""
    for t in inv.tensors:
        if _UNSUPPORTED.search(t.name):
            raise CcmoeError(f"{inv.source} has tensor {t.name} (chunked or per-expert split tensors)",
                             "pruning supports merged *_exps expert tensors; convert with a current llama.cpp")
        if _EXPERT_AXIS.match(t.name) and t.shape[-1] != summary.n_expert:
            raise CcmoeError(f"{t.name} has shape {t.shape}, not {summary.n_expert} experts on its last axis",
                             "check the model's expert_count")


def _sliced_layout(tensor, kept: dict[int, list[int]]) -> tuple[tuple[int, ...], int]:
    """Numpy shape and byte count of a tensor after slicing (unchanged when not an expert tensor)."""
    m = _EXPERT_AXIS.match(tensor.name)
    shape = tuple(int(x) for x in tensor.data.shape)
    if not m or int(m.group(1)) not in kept:
        return shape, int(tensor.n_bytes)
    n = len(kept[int(m.group(1))])
    return (n, *shape[1:]), int(tensor.n_bytes) // shape[0] * n


def _sliced_data(tensor, kept: dict[int, list[int]]) -> np.ndarray:
    """The tensor's bytes with only the kept experts (numpy axis 0 is ggml's last, the expert axis)."""
    m = _EXPERT_AXIS.match(tensor.name)
    if not m or int(m.group(1)) not in kept:
        return tensor.data
    return np.ascontiguousarray(tensor.data[np.asarray(kept[int(m.group(1))])])


def _copy_kv(reader, writer, updates: dict[str, tuple[Any, Any]]) -> None:
    """Every key of the input (but the writer's own and split keys), with `updates` applied or appended."""
    import gguf

    pending = dict(updates)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith(("GGUF.", "split.")):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if f.name in pending:
            value, vtype = pending.pop(f.name)
            sub = None
        else:
            value = f.contents()
        writer.add_key_value(f.name, value, vtype, sub_type=sub)
    for key, (value, vtype) in pending.items():
        writer.add_key_value(key, value, vtype)


def pruned_bytes(inv: ModelInventory, n_keep: int, n_expert: int) -> int:
    """The pruned file's size, from the inventory alone (expert tensors shrink by n_keep / n_expert)."""
    total = max(inv.file_bytes - sum(t.n_bytes for t in inv.tensors), 0)
    for t in inv.tensors:
        total += t.n_bytes // n_expert * n_keep if _EXPERT_AXIS.match(t.name) else t.n_bytes
    return total + 64 * len(inv.tensors)


def write_pruned_gguf(model: Path, out: Path, kept: dict[int, list[int]], updates: dict[str, tuple[Any, Any]],
                      force: bool = False) -> Path:
    """Copy `model` (any shard of it) to one GGUF `out` with the experts sliced; atomic, nothing left on failure."""
    import gguf

    readers = [gguf.GGUFReader(str(p), "r") for p in shard_paths(Path(model))]
    tensors = [t for r in readers for t in r.tensors]
    layout = {t.name: _sliced_layout(t, kept) for t in tensors}
    need = int((readers[0].data_offset + sum(n + 64 for _, n in layout.values())) * DISK_MARGIN)
    first = readers[0]
    with staged_output(out, force, need, "pruned model") as tmp:
        w = gguf.GGUFWriter(str(tmp), str(first.get_field(gguf.Keys.General.ARCHITECTURE).contents()),
                            endianess=first.endianess)
        w.data_alignment = first.alignment
        _copy_kv(first, w, updates)
        for t in tensors:
            shape, nbytes = layout[t.name]
            w.add_tensor_info(t.name, shape, t.data.dtype, nbytes, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            w.write_tensor_data(_sliced_data(t, kept), tensor_endianess=first.endianess)
        w.close()
    return Path(out)


# ---------------------------------------------------------------- the prune stage

def _check_stats(stats: dict, summary: MoeSummary, source: str) -> None:
    layers = sorted(int(x) for x in stats.get("layers", {}))
    if stats.get("n_expert") != summary.n_expert or layers != summary.moe_layers:
        raise CcmoeError(f"the router statistics ({stats.get('n_expert')} experts, layers {layers}) do not fit "
                         f"{source} ({summary.n_expert} experts, layers {summary.moe_layers})",
                         "measure them on this model (leave out --stats)")


def kept_share(stats: dict | None, kept: dict[int, list[int]]) -> dict[int, float | None]:
    """Per layer, the share of calibration routings that went to the kept experts."""
    out: dict[int, float | None] = {}
    for layer, ids in kept.items():
        counts = np.asarray(stats["layers"][str(layer)]["counts"], dtype=np.float64) if stats else None
        out[layer] = round(float(counts[ids].sum() / counts.sum()), 4) if counts is not None and counts.sum() else None
    return out


@dataclass
class PruneResult:
    """What `prune` did: the experts kept per layer, by which method, and the sizes before and after."""

    model: str
    output: str
    arch: str
    method: str
    alpha: float | None
    seed: int | None
    calibration: str | None
    calibration_sha256: str | None
    tokens: int | None
    stats: str | None            # the router statistics file used (or written)
    score_node: str | None
    counts: ExpertCounts
    kept: dict[str, list[int]]   # layer -> kept expert ids (of this input)
    kept_share: dict[str, float | None]   # layer -> share of the calibration routings the kept experts took
    bytes_before: int
    bytes_after: int
    imatrix: str | None = None   # the input's imatrix sliced to the kept experts, beside the output

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        c = self.counts
        how = f"alpha {self.alpha:g}" if self.alpha is not None else f"seed {self.seed}"
        lines = [f"pruned {Path(self.model).name} ({self.arch}): {c.n_expert} -> {c.n_keep} experts in "
                 f"{len(self.kept)} MoE layers by {self.method} ({how})"]
        if self.tokens:
            lines.append(f"router statistics: {self.tokens} tokens of {self.calibration}, score {self.score_node} "
                         f"({self.stats})")
        lines.append(f"experts used per token {c.experts_used} -> {c.experts_used_new}"
                     + ("" if c.user_experts_used else f" (max(1, round({c.original_expert_used_count} x {c.n_keep} / "
                                                       f"{c.original_expert_count})))"))
        lines += [f"note: {n}" for n in c.notes]
        lines.append("layer  kept experts" + " " * 20 + "share of calibration routings kept")
        for layer, ids in self.kept.items():
            share = self.kept_share[layer]
            lines.append(f"  {layer:<5}{' '.join(map(str, ids)):<32}{'-' if share is None else f'{100 * share:.1f}%'}")
        lines.append(f"size {human_size(self.bytes_before)} -> {human_size(self.bytes_after)}; wrote {self.output}")
        if self.imatrix:
            lines.append(f"imatrix sliced to the kept experts: {self.imatrix}")
        return lines


def pruned_imatrix_path(out: Path) -> Path:
    """Where prune writes the sliced imatrix: OUT.imatrix.gguf beside OUT.gguf."""
    return Path(out).with_name(Path(out).name.removesuffix(".gguf") + ".imatrix.gguf")


def prune_model(engine: Engine | None, model: Path, out: Path, keep: int | None = None, keep_ratio: float | None = None,
                method: str = "importance", alpha: float = DEFAULT_ALPHA, seed: int = 0, calib: Path | None = None,
                stats: dict | None = None, stats_path: Path | None = None, experts_used: int | None = None,
                ctx: int = 256, chunks: int | None = 64, threads: int | None = None, force: bool = False,
                imatrix: Path | None = None) -> PruneResult:
    """Check the output, measure (or reuse) router statistics, choose the experts, write the pruned GGUF (and
    the input's `imatrix` sliced to the kept experts beside it)."""
    out = Path(out)
    used_alpha = check_method(method, alpha)
    inv = read_gguf(model)
    summary = summarize(inv)
    require_moe(summary, str(model))
    check_prunable(inv, summary)
    n_keep = resolve_keep(summary.n_expert, keep, keep_ratio)
    check_writable(out, force, int(pruned_bytes(inv, n_keep, summary.n_expert) * DISK_MARGIN), "pruned model")
    counts = expert_counts_after(inv, summary, n_keep, experts_used)
    given = fit_to_model(read_imatrix_file(imatrix), inv, Path(imatrix)) if imatrix else None
    if given is not None:
        check_writable(pruned_imatrix_path(out), force, what="sliced imatrix")
    if stats is None and method != "random":
        if calib is None:
            raise CcmoeError(f"pruning by {method} needs calibration text", "pass --calib FILE")
        read_text(Path(calib), "calibration text")
        stats_path = stats_path or router_stats_path(out.parent, model)
        stats = cached_router_stats(engine, model, calib, stats_path, ctx=ctx, chunks=chunks, threads=threads)
    if stats is not None:
        _check_stats(stats, summary, str(model))
    kept = choose_experts(stats if method != "random" else None, summary.moe_layers, summary.n_expert, n_keep,
                          used_alpha, seed, counts.groups if counts.balanced_groups else 1)
    choice = {"method": method, "alpha": used_alpha, "seed": seed if method == "random" else None,
              "calibration": stats.get("calibration") if stats else None,
              "calibration_sha256": stats.get("calibration_sha256") if stats else None,
              "tokens": stats.get("tokens") if stats else None}
    write_pruned_gguf(model, out, kept, metadata_updates(inv.arch, counts, original_ids(inv, kept), choice), force)
    if given is not None:
        write_imatrix_gguf(slice_experts(given, kept), pruned_imatrix_path(out), force=True)
    return PruneResult(model=str(model), output=str(out), arch=inv.arch, **choice,
                       stats=str(stats_path) if stats_path else None,
                       score_node=stats.get("score_node") if stats else None, counts=counts,
                       kept={str(k): v for k, v in kept.items()},
                       kept_share={str(k): v for k, v in kept_share(stats, kept).items()},
                       bytes_before=inv.file_bytes, bytes_after=out.stat().st_size,
                       imatrix=str(pruned_imatrix_path(out)) if given is not None else None)
