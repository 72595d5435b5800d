"""Statistics measured with llama.cpp: expert activation counts from llama-imatrix's GGUF output."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from .engine import Engine
from .artifacts import file_sha256
from .errors import EXIT_ENGINE, CcmoeError

_COUNTS = re.compile(r"^blk\.(\d+)\.ffn_(?:up|gate|gate_up)_(?:ch|)exps\.weight\.counts$")


def run_imatrix(engine: Engine, model: Path, text: Path, out: Path, ctx: int = 512, chunks: int | None = None,
                threads: int | None = None) -> Path:
    """Run llama-imatrix on `text`, writing its GGUF imatrix to `out`."""
    cmd = [str(engine.tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if threads:
        cmd += ["-t", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise CcmoeError(f"llama-imatrix failed on {model} ({tail})", "check the model and the calibration text", EXIT_ENGINE)
    return out


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

EXPERT_STATS_VERSION = 1


def expert_frequencies(counts: dict[int, np.ndarray], n_used: int) -> dict[int, np.ndarray]:
    """Share of tokens routed to each expert, per layer (each layer's shares sum to experts-used-per-token)."""
    out = {}
    for layer, c in counts.items():
        tokens = c.sum() / max(n_used, 1)
        out[layer] = c / tokens if tokens > 0 else np.zeros_like(c)
    return out


def profile_model(engine: Engine, model: Path, calibration: Path, out_dir: Path, ctx: int = 512,
                  chunks: int | None = 64, threads: int | None = None, force: bool = False) -> dict:
    """Run llama-imatrix on the calibration text; write the imatrix and an expert-statistics artifact."""
    from .artifacts import save_artifact
    from .inventory import read_gguf, require_moe, summarize

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
    tmp = imatrix.with_name(f".{imatrix.name}.part")
    try:
        run_imatrix(engine, model, calibration, tmp, ctx=ctx, chunks=chunks, threads=threads)
        tmp.replace(imatrix)
    finally:
        tmp.unlink(missing_ok=True)
    counts = expert_counts(imatrix)
    freqs = expert_frequencies(counts, summary.n_expert_used)
    payload = {
        "model": str(model), "model_sha256": file_sha256(Path(model)), "calibration": str(calibration),
        "calibration_sha256": file_sha256(Path(calibration)), "ctx": ctx, "chunks": chunks, "imatrix": str(imatrix),
        "n_expert": summary.n_expert, "n_expert_used": summary.n_expert_used,
        "layers": {str(layer): {"counts": counts[layer].tolist(), "frequency": [round(float(x), 6) for x in freqs[layer]],
                                "entropy_bits": round(usage_entropy(counts[layer]), 4)} for layer in sorted(counts)},
    }
    save_artifact(stats_path, "expert-stats", EXPERT_STATS_VERSION, payload)
    return {**payload, "stats": str(stats_path)}
