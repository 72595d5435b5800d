"""Expert pruning (bundled or reference model): importance vs frequency-only vs random, on held-out text.

Usage: python benchmarks/prune_quality.py [--model PATH] [--work DIR] [--seeds 20] [--chunks N] [--threads 2]

A model from `ccmoe-run train-reference` (it carries `ccmoe.training`) is measured on the reference corpus
(Python docs for statistics and alpha, GNU standards held out), any other on the bundled corpus; --chunks
limits the held-out text to its first N chunks of --ctx tokens.

Router statistics come from the first --stats-chars characters of the training text (calibration); alpha is
chosen per keep ratio from ALPHAS by mean KL-divergence on the next --select-chars characters (a second
calibration slice); the table reports llama-perplexity's KL-divergence against the unpruned model, top-token
agreement and perplexity on the held-out text, which neither step saw. Prints Markdown (recorded in
docs/pruning.md) and writes all figures to WORK/prune_quality.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from ccmoe_runtime.compress.quality import save_reference_logits
from ccmoe_runtime.compress.router import router_stats, save_router_stats
from ccmoe_runtime.engine.build import find_engine
from ccmoe_runtime.model.inventory import read_gguf, summarize
from ccmoe_runtime.model.sources import bundled_model_path
from ccmoe_runtime.prune.prune import prune_model, resolve_keep
from ccmoe_runtime.testmodels.corpus import ensure_corpus, ensure_reference_corpus

RATIOS = (0.875, 0.75, 0.5)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
_PM = r"([-\d.]+)\s*±\s*([\d.]+)"
FIGURES = {"kld": rf"^Mean\s+KLD:\s+{_PM}", "ppl": rf"^Mean PPL\(Q\)\s*:\s*{_PM}", "ppl_base": rf"^Mean PPL\(base\)\s*:\s*{_PM}",
           "ln_ratio": rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_PM}", "same_top": rf"^Same top p:\s*{_PM}"}


def measure(engine, model: Path, ref: Path, ctx: int, threads: int, attempts: int = 4) -> dict:
    """llama-perplexity --kl-divergence: each figure with its ±; reruns when the logger lost the summary."""
    cmd = [str(engine.tool("llama-perplexity")), "-m", str(model), "--kl-divergence-base", str(ref), "--kl-divergence",
           "-c", str(ctx), "-b", str(ctx), "-t", str(threads)]
    for attempt in range(attempts):
        time.sleep(attempt)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        text = out.stdout + out.stderr
        found = {k: re.search(p, text, re.MULTILINE) for k, p in FIGURES.items()}
        if all(found.values()):
            return {k: [float(m.group(1)), float(m.group(2))] for k, m in found.items()}
    raise RuntimeError(f"llama-perplexity printed no complete summary for {model}")


def prune(engine, model: Path, out: Path, n_keep: int, stats: dict, method: str, alpha: float = 0.5, seed: int = 0,
          experts_used: int | None = None) -> dict:
    return prune_model(engine, model, out, keep=n_keep, method=method, alpha=alpha, seed=seed, stats=stats,
                       experts_used=experts_used, force=True)


def choose_alpha(engine, model: Path, work: Path, n_keep: int, stats: dict, ref: Path, ctx: int, threads: int) -> dict:
    """Mean KLD on the selection slice for each alpha of the grid (alpha 1 is frequency-only)."""
    scores = {}
    for alpha in ALPHAS:
        out = work / f"sel-{n_keep}-{alpha}.gguf"
        prune(engine, model, out, n_keep, stats, "importance", alpha)
        scores[alpha] = measure(engine, out, ref, ctx, threads)["kld"][0]
        out.unlink()
    return scores


def evaluate_ratio(engine, model: Path, work: Path, ratio: float, n_expert: int, n_used: int, stats: dict,
                   refs: dict, args) -> dict:
    n_keep = resolve_keep(n_expert, None, ratio)
    selection = choose_alpha(engine, model, work, n_keep, stats, refs["select"], args.ctx, args.threads)
    alpha = min(selection, key=lambda a: (selection[a], abs(a - 0.5)))
    rows: dict[str, dict] = {}
    variants = [("importance", "importance", alpha, 0, None), ("frequency", "frequency", 1.0, 0, None)]
    variants += [(f"random-{s}", "random", 0.5, s, None) for s in range(args.seeds)]
    if max(1, round(n_used * n_keep / n_expert)) != n_used:   # the adjustment changes k: also measure k kept
        variants += [("importance-k2", "importance", alpha, 0, n_used), ("frequency-k2", "frequency", 1.0, 0, n_used)]
    for name, method, a, seed, k in variants:
        out = work / f"p{n_keep}-{name}.gguf"
        report = prune(engine, model, out, n_keep, stats, method, a, seed, k)
        rows[name] = {**measure(engine, out, refs["heldout"], args.ctx, args.threads), "kept": report["kept"],
                      "experts_used": report["counts"]["experts_used_new"], "bytes": report["bytes_after"]}
        out.unlink()
    return {"ratio": ratio, "keep": n_keep, "alpha": alpha, "alpha_selection_kld": selection, "rows": rows}


def random_summary(rows: dict) -> dict:
    """Mean, spread and range of the random seeds, and how many of them importance pruning beats."""
    kld = np.array([r["kld"][0] for k, r in rows.items() if k.startswith("random-")])
    ppl = np.array([r["ppl"][0] for k, r in rows.items() if k.startswith("random-")])
    same = np.array([r["same_top"][0] for k, r in rows.items() if k.startswith("random-")])
    return {"kld": kld.mean(), "kld_sd": kld.std(ddof=1) if len(kld) > 1 else 0.0, "kld_min": kld.min(),
            "kld_max": kld.max(), "ppl": ppl.mean(), "ppl_sd": ppl.std(ddof=1) if len(ppl) > 1 else 0.0,
            "same_top": same.mean(), "n": len(kld), "beaten": int((kld > rows["importance"]["kld"][0]).sum())}


def print_tables(results: list[dict], base: dict, args, stats: dict) -> None:
    print(f"Held-out text: {base['tokens']} tokens ({base['chunks']} chunks of {args.ctx}); unpruned PPL "
          f"{base['ppl'][0]:.2f} ± {base['ppl'][1]:.2f}. Router statistics: {stats['tokens']} training-text tokens; "
          f"alpha chosen on {args.select_chars:,} further training characters.\n")
    print("| keep | method | α | experts used | mean KLD | same top | PPL |\n|---|---|---|---|---|---|---|")
    for res in results:
        rows, keep = res["rows"], f"{res['keep']}/{base['n_expert']} ({res['ratio']:g})"
        for name, label, a in (("importance", "importance", f"{res['alpha']:g}"), ("frequency", "frequency only", "1")):
            r = rows[name]
            print(f"| {keep} | {label} | {a} | {r['experts_used']} | {r['kld'][0]:.4f} ± {r['kld'][1]:.4f} | "
                  f"{r['same_top'][0]:.2f} ± {r['same_top'][1]:.2f} % | {r['ppl'][0]:.2f} ± {r['ppl'][1]:.2f} |")
        rnd = random_summary(rows)
        print(f"| {keep} | random (mean of {rnd['n']} seeds, ± sd) | – | {rows['random-0']['experts_used']} | "
              f"{rnd['kld']:.4f} ± {rnd['kld_sd']:.4f} | {rnd['same_top']:.2f} % | {rnd['ppl']:.2f} ± {rnd['ppl_sd']:.2f} |")
    print("\nα selection (mean KLD on the selection slice):\n")
    print("| keep | " + " | ".join(f"α={a:g}" for a in ALPHAS) + " | chosen |\n|---|" + "---|" * (len(ALPHAS) + 1))
    for res in results:
        sel = res["alpha_selection_kld"]
        print(f"| {res['keep']} | " + " | ".join(f"{sel[a]:.4f}" for a in ALPHAS) + f" | {res['alpha']:g} |")
    print(f"\nExperts used per token with {base['n_expert'] // 2} of {base['n_expert']} experts kept (held-out):\n")
    print("| method | k | mean KLD | same top | PPL |\n|---|---|---|---|---|")
    for res in results:
        for name in ("importance", "importance-k2", "frequency", "frequency-k2"):
            if res["keep"] == base["n_expert"] // 2 and name in res["rows"]:
                r = res["rows"][name]
                print(f"| {name.removesuffix('-k2')} | {r['experts_used']} | {r['kld'][0]:.4f} ± {r['kld'][1]:.4f} | "
                      f"{r['same_top'][0]:.2f} % | {r['ppl'][0]:.2f} ± {r['ppl'][1]:.2f} |")
    print("\nVerdicts (held-out mean KLD):\n")
    for res in results:
        imp, freq, rnd = res["rows"]["importance"]["kld"], res["rows"]["frequency"]["kld"], random_summary(res["rows"])
        print(f"- keep {res['keep']}: importance {imp[0]:.4f} vs frequency {freq[0]:.4f} "
              f"({'at least as good' if imp[0] <= freq[0] else 'WORSE'}, difference {imp[0] - freq[0]:+.4f}); "
              f"vs random mean {rnd['kld']:.4f} (importance better than {rnd['beaten']} of {rnd['n']} seeds; "
              f"best seed {rnd['kld_min']:.4f}, worst {rnd['kld_max']:.4f})")


def slice_text(source: Path, out: Path, start: int, size: int) -> Path:
    out.write_text(source.read_text()[start:start + size])
    return out


def held_out_size(engine, model: Path, text: Path, ctx: int, limit: int | None = None) -> dict:
    """Chunks of the held-out text, and the tokens llama-perplexity scores (the second half of each chunk)."""
    from ccmoe_runtime.engine.build import load_bindings

    llm = load_bindings(engine).Llama(model_path=str(model), vocab_only=True, verbose=False)
    chunks = len(llm.tokenize(text.read_text().encode(), add_bos=True)) // ctx
    chunks = min(chunks, limit) if limit else chunks
    return {"chunks": chunks, "tokens": chunks * (ctx - 1 - ctx // 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=bundled_model_path())
    ap.add_argument("--work", type=Path, default=Path("/tmp/ccmoe-prune-bench"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--stats-chars", type=int, default=250_000)
    ap.add_argument("--select-chars", type=int, default=100_000)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=None, help="held-out chunks (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    started = time.monotonic()
    engine = find_engine()
    reference_model = "ccmoe.training" in read_gguf(args.model).metadata
    corpus = ensure_reference_corpus() if reference_model else ensure_corpus()
    args.work.mkdir(parents=True, exist_ok=True)
    calib = slice_text(corpus.train, args.work / "calib-stats.txt", 0, args.stats_chars)
    select = slice_text(corpus.train, args.work / "calib-select.txt", args.stats_chars, args.select_chars)
    stats = router_stats(engine, args.model, calib, ctx=args.ctx, chunks=None, threads=args.threads)
    save_router_stats(stats, args.work / "router-stats.json")
    refs = {name: save_reference_logits(engine, args.model, text, args.work / f"ref-{name}.bin", ctx=args.ctx,
                                        threads=args.threads, chunks=chunks)
            for name, text, chunks in (("select", select, None), ("heldout", corpus.heldout, args.chunks))}
    summary = summarize(read_gguf(args.model))
    base = {**measure(engine, args.model, refs["heldout"], args.ctx, args.threads),
            **held_out_size(engine, args.model, corpus.heldout, args.ctx, args.chunks), "n_expert": summary.n_expert}
    results = [evaluate_ratio(engine, args.model, args.work, r, summary.n_expert, summary.n_expert_used, stats, refs,
                              args) for r in RATIOS]
    print_tables(results, base, args, stats)
    (args.work / "prune_quality.json").write_text(json.dumps({"base": base, "results": results}, indent=1))
    print(f"\n{time.monotonic() - started:.0f} s on {args.threads} threads; figures in {args.work / 'prune_quality.json'}")


if __name__ == "__main__":
    main()
