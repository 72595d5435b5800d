"""Statistics measured with llama.cpp: expert activation counts from llama-imatrix's GGUF output."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..core.artifacts import file_sha256, save_artifact
from ..core.errors import CcmoeError
from ..core.files import temp_beside
from ..engine.build import Engine
from ..engine.tools import run_imatrix
from ..model.experts import EXPERT_STATS_KIND, EXPERT_STATS_VERSION
from ..model.inventory import model_digest, read_gguf, require_moe, summarize

_COUNTS = re.compile(r"^blk\.(\d+)\.ffn_(?:up|gate|gate_up)_(?:ch|)exps\.weight\.counts$")


def expert_counts(imatrix: Path) -> dict[int, np.ndarray]:
    """Per MoE layer, how many tokens were routed to each expert (llama-imatrix's `counts` for *_exps)."""
    import gguf

    counts: dict[int, np.ndarray] = {}
    for t in gguf.GGUFReader(str(imatrix)).tensors:
        m = _COUNTS.match(t.name)
        if m and int(m.group(1)) not in counts:
            counts[int(m.group(1))] = np.asarray(t.data, dtype=np.float64).ravel().copy()
    return counts


def usage_entropy(counts: np.ndarray) -> float:
    """Entropy (bits) of the expert usage distribution; log2(E) when uniform."""
    p = counts / max(counts.sum(), 1.0)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# ---------------------------------------------------------------- the profile stage



def expert_frequencies(counts: dict[int, np.ndarray], n_used: int) -> dict[int, np.ndarray]:
    """Share of tokens routed to each expert, per layer (each layer's shares sum to experts-used-per-token)."""
    out = {}
    for layer, c in counts.items():
        tokens = c.sum() / max(n_used, 1)
        out[layer] = c / tokens if tokens > 0 else np.zeros_like(c)
    return out


def measure_expert_stats(engine: Engine, model: Path, calibration: Path, out_dir: Path, ctx: int = 512,
                  chunks: int | None = 64, threads: int | None = None, force: bool = False) -> dict:
    """Run llama-imatrix on the calibration text; write the imatrix and an expert-statistics artifact."""

    summary = summarize(read_gguf(model))
    require_moe(summary, str(model))
    if not Path(calibration).is_file():
        raise CcmoeError(f"calibration text {calibration} does not exist", "pass --calib with a plain-text file")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(model).name.removesuffix(".gguf")
    imatrix, stats_path = out_dir / f"{stem}.imatrix.gguf", out_dir / f"{stem}.expert-stats.json"
    for path in (imatrix, stats_path):
        if path.exists() and not force:
            raise CcmoeError(f"{path} already exists", "pass --force to overwrite it or choose another -o folder")
    tmp = temp_beside(imatrix)
    try:
        run_imatrix(engine, model, calibration, tmp, ctx=ctx, chunks=chunks, threads=threads)
        tmp.replace(imatrix)
    finally:
        tmp.unlink(missing_ok=True)
    counts = expert_counts(imatrix)
    freqs = expert_frequencies(counts, summary.n_expert_used)
    payload = {
        "model": str(model), "model_digest": model_digest(Path(model)), "calibration": str(calibration),
        "calibration_sha256": file_sha256(Path(calibration)), "ctx": ctx, "chunks": chunks, "imatrix": str(imatrix),
        "n_expert": summary.n_expert, "n_expert_used": summary.n_expert_used,
        "layers": {str(layer): {"counts": counts[layer].tolist(), "frequency": [round(float(x), 6) for x in freqs[layer]],
                                "entropy_bits": round(usage_entropy(counts[layer]), 4)} for layer in sorted(counts)},
    }
    save_artifact(stats_path, EXPERT_STATS_KIND, EXPERT_STATS_VERSION, payload)
    return {**payload, "stats": str(stats_path)}
