"""Statistics measured with llama.cpp: expert activation counts from llama-imatrix's GGUF output (or the user's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil

from ..core.artifacts import file_sha256, save_artifact
from ..core.errors import CcmoeError
from ..core.files import temp_beside
from ..engine.build import Engine
from ..engine.tools import run_imatrix
from ..model.experts import EXPERT_STATS_KIND, EXPERT_STATS_VERSION
from ..model.inventory import model_digest, read_gguf, require_moe, summarize
from .imatrix import expert_token_counts, fit_to_model, read_imatrix_file, write_imatrix_gguf

STREAMED_SEQUENCES = 8      # chunks per pass (llama-imatrix batch, router decode) when the model is larger than RAM


def available_ram() -> int:
    """Memory available to a new process without swapping (MemAvailable on Linux)."""
    return psutil.virtual_memory().available


def chunks_per_pass(model_bytes: int, ram_bytes: int, chunks: int | None) -> int:
    """Chunks one pass over the weights evaluates (a llama-imatrix batch, a router decode): several when the model
    streams from disk (fewer reads), else 1."""
    if model_bytes <= ram_bytes:
        return 1
    return max(1, min(STREAMED_SEQUENCES, chunks or STREAMED_SEQUENCES))


def model_reads(model_bytes: int, ram_bytes: int, chunks: int) -> int:
    """Times llama-imatrix or the router pass reads the model from disk: once per pass when it streams, else once."""
    return -(-chunks // chunks_per_pass(model_bytes, ram_bytes, chunks)) if model_bytes > ram_bytes else 1


def expert_counts(imatrix: Path) -> dict[int, np.ndarray]:
    """Per MoE layer, how many tokens were routed to each expert (llama-imatrix's `counts` for *_exps)."""
    return expert_token_counts(read_imatrix_file(imatrix))


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
                  chunks: int | None = 64, threads: int | None = None, force: bool = False,
                  imatrix: Path | None = None) -> dict | None:
    """Run llama-imatrix on the calibration text (or take the user's `imatrix`); write the imatrix (GGUF) and
    the expert-statistics artifact. None when a legacy imatrix has no per-expert counts to derive them from."""

    inv = read_gguf(model)
    summary = summarize(inv)
    require_moe(summary, str(model))
    if imatrix is None and not Path(calibration).is_file():
        raise CcmoeError(f"calibration text {calibration} does not exist", "pass --calib with a plain-text file")
    stem = Path(model).name.removesuffix(".gguf")
    dest, stats_path = out_dir / f"{stem}.imatrix.gguf", out_dir / f"{stem}.expert-stats.json"
    for path in (dest, stats_path):
        if path.exists() and not force:
            raise CcmoeError(f"{path} already exists", "pass --force to overwrite it or choose another -o folder")
    given = fit_to_model(read_imatrix_file(imatrix), inv, Path(imatrix)) if imatrix else None
    out_dir.mkdir(parents=True, exist_ok=True)
    if given is not None:
        write_imatrix_gguf(given, dest)
        counts = expert_token_counts(given)
    else:
        tmp = temp_beside(dest)
        try:
            sequences = chunks_per_pass(inv.file_bytes, available_ram(), chunks)
            run_imatrix(engine, model, calibration, tmp, ctx=ctx, chunks=chunks, threads=threads, sequences=sequences)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        counts = expert_counts(dest)
    if not counts:
        stats_path.unlink(missing_ok=True)
        return None
    freqs = expert_frequencies(counts, summary.n_expert_used)
    source = ({"imatrix_source": str(imatrix), "calibration": ", ".join(given.datasets) or None, "ctx": given.chunk_size,
               "chunks": given.chunk_count} if given is not None else
              {"calibration": str(calibration), "calibration_sha256": file_sha256(Path(calibration)), "ctx": ctx,
               "chunks": chunks})
    payload = {
        "model": str(model), "model_digest": model_digest(Path(model)), **source, "imatrix": str(dest),
        "n_expert": summary.n_expert, "n_expert_used": summary.n_expert_used,
        "layers": {str(layer): {"counts": counts[layer].tolist(), "frequency": [round(float(x), 6) for x in freqs[layer]],
                                "entropy_bits": round(usage_entropy(counts[layer]), 4)} for layer in sorted(counts)},
    }
    save_artifact(stats_path, EXPERT_STATS_KIND, EXPERT_STATS_VERSION, payload)
    return {**payload, "stats": str(stats_path)}
