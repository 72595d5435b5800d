"""Plan vs llama.cpp's standard mixes at equal size on the bundled model: mean KLD and top-token agreement.

Usage: python benchmarks/plan_vs_mixes.py WORKDIR Q2_K Q3_K_S IQ2_XS ...
For each mix: build it with llama-quantize (same imatrix), plan at exactly its size, build the plan, and
compare both with the F16 model's logits (llama-perplexity --kl-divergence on the held-out text).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from ccmoe_runtime import plan as P
from ccmoe_runtime.corpus import ensure_corpus
from ccmoe_runtime.engine import find_engine
from ccmoe_runtime.inventory import read_gguf
from ccmoe_runtime.sensitivity import measure_sensitivity
from ccmoe_runtime.sources import bundled_model_path
from ccmoe_runtime.stats import profile_model


def run(*args) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{args[0]} failed: {result.stderr[-1500:]}")
    return result.stdout + result.stderr


def tensor_bytes(path: Path) -> int:
    return sum(t.n_bytes for t in read_gguf(path).tensors)


def main() -> None:
    work, mixes = Path(sys.argv[1]), sys.argv[2:]
    work.mkdir(parents=True, exist_ok=True)
    engine, corpus, model = find_engine(), ensure_corpus(), bundled_model_path()
    calib = work / "calib.txt"
    calib.write_text(corpus.train.read_text()[:200_000])
    imatrix = work / "prof" / f"{model.stem}.imatrix.gguf"
    if not imatrix.exists():
        profile_model(engine, model, calib, work / "prof", ctx=256, chunks=100, threads=2)
    stats = json.loads((work / "prof" / f"{model.stem}.expert-stats.json").read_text())
    sens = measure_sensitivity(engine, model, imatrix, stats, rows_per_expert=32)
    base = work / "base.kld"
    if not base.exists():
        run(engine.tool("llama-perplexity"), "-m", model, "-f", corpus.heldout, "-c", "256", "-b", "256",
            "--kl-divergence-base", base, "-t", "2")

    def kld(path: Path) -> tuple[float, str]:
        out = run(engine.tool("llama-perplexity"), "-m", path, "--kl-divergence-base", base, "--kl-divergence",
                  "-c", "256", "-b", "256", "-t", "2")
        mean = re.search(r"Mean\s+KLD:\s+([\d.]+)", out)
        top = re.search(r"Same top p\s*:\s+([\d.]+)", out)
        return float(mean.group(1)), top.group(1) + " %" if top else "n/a"

    inv = read_gguf(model)
    print("| mix | size | mean KLD | same top | plan size | plan mean KLD | plan same top |\n|---|---|---|---|---|---|---|")
    for mix in mixes:
        mixed = work / f"{mix}.gguf"
        run(engine.tool("llama-quantize"), "--imatrix", imatrix, model, mixed, mix, "2")
        size = tensor_bytes(mixed)
        plan = P.make_plan(inv, sens, P.Budget("bench", size, 0, 0, 0, size))
        types = work / f"plan-{mix}.txt"
        types.write_text("\n".join(P.tensor_type_lines(plan)) + "\n")
        planned = work / f"plan-{mix}.gguf"
        run(engine.tool("llama-quantize"), "--imatrix", imatrix, "--tensor-type-file", types, model, planned, "Q8_0", "2")
        (k_mix, t_mix), (k_plan, t_plan) = kld(mixed), kld(planned)
        print(f"| {mix} | {size / 1e6:.3f} MB | {k_mix:.4f} | {t_mix} | {tensor_bytes(planned) / 1e6:.3f} MB | "
              f"{k_plan:.4f} | {t_plan} |", flush=True)


if __name__ == "__main__":
    main()
