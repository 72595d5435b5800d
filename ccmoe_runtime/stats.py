"""Statistics measured with llama.cpp: expert activation counts from llama-imatrix's GGUF output."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from .engine import Engine
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
