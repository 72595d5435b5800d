"""Quality of the bundled model on held-out text: llama-perplexity against a unigram baseline.

Usage: python benchmarks/bundled_quality.py [--model PATH] [--ctx 256]
Prints a Markdown table; its output is recorded in docs/bundled-model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from ccmoe_runtime.engine.build import find_engine, load_bindings
from ccmoe_runtime.model.inventory import read_gguf, summarize
from ccmoe_runtime.model.sources import bundled_model_path
from ccmoe_runtime.testmodels.corpus import ensure_corpus


def perplexity(engine, model, text, ctx: int, threads: int) -> tuple[float, float]:
    started = time.monotonic()
    out = subprocess.run([str(engine.tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
                          "-b", str(ctx), "-t", str(threads)], capture_output=True, text=True, check=True)
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out.stdout + out.stderr)
    return float(m.group(1)), time.monotonic() - started


def unigram_ppl(llama_cpp, model, train_text: str, heldout_text: str) -> float:
    """Perplexity of add-one unigram token frequencies (from the training text) on the held-out text."""
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    train = np.asarray(llm.tokenize(train_text.encode(), add_bos=False))
    held = np.asarray(llm.tokenize(heldout_text.encode(), add_bos=False))
    counts = np.bincount(train, minlength=llm.n_vocab()).astype(float) + 1
    return math.exp(-np.log(counts / counts.sum())[held].mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(bundled_model_path()))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    engine = find_engine()
    corpus = ensure_corpus()
    s = summarize(read_gguf(args.model))
    info = json.loads(read_gguf(args.model).metadata.get("ccmoe.training", "{}"))
    report = Path(args.model).with_suffix(".train.json")
    if report.is_file():                       # timings live in the training report, not in the GGUF
        info = {**info, **json.loads(report.read_text())}
    ppl, seconds = perplexity(engine, args.model, corpus.heldout, args.ctx, args.threads)
    uni = unigram_ppl(load_bindings(engine), args.model, corpus.train.read_text(), corpus.heldout.read_text())
    print(f"model: {args.model} ({s.arch}, {s.total_params / 1e6:.2f}M params, {s.n_expert} experts, "
          f"{s.n_expert_used} used); corpus: {corpus.source}\n")
    print("| measure | value |\n|---|---|")
    print(f"| held-out perplexity, llama-perplexity -c {args.ctx} | {ppl:.2f} |")
    print(f"| held-out perplexity, unigram baseline | {uni:.2f} |")
    print(f"| ratio | {uni / ppl:.1f}x lower |")
    print(f"| held-out perplexity in training (torch, all positions) | {info.get('heldout_ppl', 'n/a')} |")
    print(f"| training: steps, tokens seen, seconds (2 cores) | {info.get('config', {}).get('steps')}, "
          f"{info.get('config', {}).get('steps', 0) * info.get('config', {}).get('batch', 0) * info.get('config', {}).get('seq', 0)}, "
          f"{info.get('train_seconds')} |")
    print(f"| llama-perplexity wall time | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
