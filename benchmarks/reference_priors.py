"""The deepseek2 reference model: held-out perplexity, routing, and the class priors the weight-less planner ships.

Usage: python benchmarks/reference_priors.py MODEL.gguf [--work DIR] [--priors OUT.json] [--threads 2] [--chunks 64]

MODEL is the GGUF `ccmoe-run train-reference` wrote. Runs llama-perplexity on the held-out text (GNU
standards), the impact probes of `measure --impact` (each tensor kind x depth band quantized alone to Q4_0 over
a Q8_0 base, KLD against F16 on the held-out text), folds the impact into per-kind priors
(compress/priors.py) and writes them to --priors (default: the package's class-priors-deepseek2.json).
Prints Markdown tables for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

from ccmoe_runtime.compress.impact import measure_impact, save_impact
from ccmoe_runtime.compress.measure import measurement_paths
from ccmoe_runtime.compress.priors import PRIORS_DIR, priors_from_impact
from ccmoe_runtime.compress.sensitivity import measure_sensitivity, save_sensitivity
from ccmoe_runtime.compress.stats import measure_expert_stats
from ccmoe_runtime.engine.build import find_engine
from ccmoe_runtime.model.inventory import read_gguf, summarize
from ccmoe_runtime.testmodels.corpus import ensure_reference_corpus


def perplexity(engine, model: Path, text: Path, ctx: int, threads: int) -> tuple[float, float, float]:
    started = time.monotonic()
    out = subprocess.run([str(engine.tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
                          "-b", str(ctx), "-t", str(threads)], capture_output=True, text=True, check=True)
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out.stdout + out.stderr)
    return float(m.group(1)), float(m.group(2)), time.monotonic() - started


def measure_class_impact(engine, model: Path, text: Path, work: Path, ctx: int, threads: int, chunks: int = 64) -> dict:
    """imatrix, per-tensor Q4_0/Q8_0 errors and probe builds at Q4_0: the reference model's rows (128 or 64
    weights) are too short for the 256-weight K/IQ types the planner's ladder probes with."""
    paths = measurement_paths(work, model)
    stats = measure_expert_stats(engine, model, text, work, ctx=ctx, chunks=chunks, threads=threads, force=True)
    sens = measure_sensitivity(engine, model, paths["imatrix"], stats, types=("Q4_0", "Q8_0"))
    save_sensitivity(sens, paths["sensitivity"])
    impact = measure_impact(engine, model, sens, text, work / ".impact-work", imatrix=paths["imatrix"],
                            ctx=ctx, chunks=chunks, threads=threads)
    save_impact(impact, paths["impact"])
    return impact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--work", type=Path, default=Path("reference-measurements"))
    ap.add_argument("--priors", type=Path, default=PRIORS_DIR / "class-priors-deepseek2.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=64, help="256-token chunks of held-out text each probe is scored on")
    a = ap.parse_args()
    engine, corpus = find_engine(), ensure_reference_corpus()
    inv = read_gguf(a.model)
    info = json.loads(inv.metadata["ccmoe.training"])
    ctx = info["config"]["ctx"]
    ppl, se, secs = perplexity(engine, a.model, corpus.heldout, ctx, a.threads)
    print("| measure | value |\n|---|---|")
    print(f"| held-out perplexity, llama-perplexity -c {ctx} | {ppl:.2f} ± {se:.2f} ({secs:.1f} s) |")
    print(f"| held-out perplexity, torch (all positions) | {info['heldout_ppl']} |")
    print(f"| unigram baseline | {info['unigram_ppl']} |")
    started = time.monotonic()
    impact = measure_class_impact(engine, a.model, corpus.heldout, a.work, ctx, a.threads, a.chunks)
    print(f"\nimpact probes: {time.monotonic() - started:.0f} s, {len(impact['groups'])} probes, "
          f"Q8_0 base KLD {impact['reference_kld']:.5f} ± {impact['reference_kld_se']:.5f}")
    priors = priors_from_impact(impact, summarize(inv).n_layers,
                                f"measured class priors of {inv.name} ({info['parameters'] / 1e6:.1f}M, {ppl:.1f} held-out ppl)")
    a.priors.parent.mkdir(parents=True, exist_ok=True)
    a.priors.write_text(json.dumps(priors, indent=1) + "\n")
    print(f"\nwrote {a.priors}\n\n| kind | total impact (sum over layers) | layers | depth (first/middle/last third) |")
    print("|---|---|---|---|")
    for kind, e in sorted(priors["kinds"].items(), key=lambda kv: -kv[1]["total"]):
        depth = " / ".join(f"{d:.2f}" for d in e.get("depth", [])) or "-"
        print(f"| {kind} | {e['total']:.4g} | {e['layers']} | {depth} |")


if __name__ == "__main__":
    main()
