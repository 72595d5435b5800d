"""Quality per byte: ccmoe plans against llama.cpp's standard type mixes (the bundled or the reference model).

Usage: python benchmarks/plan_vs_mixes.py WORKDIR [--model PATH] [--plans-at IQ2_XXS,Q2_K,IQ3_XXS,Q3_K_S]
           [--mixes Q2_K,...] [--chunks N] [--priors-plan] [--cc-moe] [--ladder TYPES] [--no-impact] [--threads N]

--model defaults to the bundled model; a GGUF from `ccmoe-run train-reference` (it carries `ccmoe.training`)
is measured on the reference corpus (Python docs to calibrate, GNU standards held out), any other on the
bundled corpus.
1. `ccmoe-run measure` on calibration text (the first 200 KB of the corpus's training part): imatrix, expert
   statistics, per-type errors and output impact. --ladder: the types the plan may choose (default: the
   planner's; a model whose rows are shorter than 256 needs 32-weight types such as Q4_0,Q5_0,IQ4_NL,Q8_0).
   --no-impact skips the probe builds (hours on a loaded 2-core machine): the measured plan then weighs the
   imatrix-weighted errors by expert usage alone.
2. Every mix of --mixes built by llama-quantize with that imatrix; plans at exactly the size of the mixes named
   by --plans-at, built by `ccmoe-run build`; --priors-plan adds the weight-less plan (Gaussian rows x the
   shipped class priors, no measurement of this model) at the same sizes; --cc-moe adds the CC-MoE recipe's
   fixed types (docs/reference-model.md) mapped onto this model's layers, and the measured plan at its size.
3. Each file against the F16 model on the held-out text (never seen in calibration or training; the first
   --chunks chunks of 256): llama-perplexity --kl-divergence. For each plan: the smallest mix that is at least
   as good, and the size ratio of that mix to the plan (>1 means the plan is better per byte).
Writes WORKDIR/results.json and prints a markdown table (each figure with llama.cpp's ± where it gives one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ccmoe_runtime.compress.measure import load_measurements, measure_model, measurement_paths
from ccmoe_runtime.compress.plan import Budget, make_plan, type_lines
from ccmoe_runtime.compress.quality import kl_divergence, save_reference_logits
from ccmoe_runtime.compress.quantize import build
from ccmoe_runtime.compress.sensitivity import prior_sensitivity
from ccmoe_runtime.devices import get_profile
from ccmoe_runtime.engine.build import find_engine
from ccmoe_runtime.engine.tools import quantize
from ccmoe_runtime.model.inventory import read_gguf, summarize
from ccmoe_runtime.model.sources import bundled_model_path
from ccmoe_runtime.testmodels.corpus import ensure_corpus, ensure_reference_corpus

MIXES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "Q2_K", "IQ3_XXS", "IQ3_XS", "IQ3_S",
         "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
DSV3_LAST = 60      # DeepSeek-V3's blocks 0-60: 0-2 dense, 3-60 MoE; the CC-MoE recipe is written against them


def tensor_bytes(path: Path) -> int:
    return sum(t.n_bytes for t in read_gguf(path).tensors)


def measure(engine, path: Path, reference: Path, n_params: int, threads: int) -> dict:
    q = kl_divergence(engine, path, reference, threads=threads)
    size = tensor_bytes(path)
    return {"file_bytes": path.stat().st_size, "tensor_bytes": size, "bpw": round(8 * size / n_params, 3), **q.to_dict()}


def dsv3_block(layer: int, n_dense: int, n_layer: int) -> int:
    """This model's layer as the DeepSeek-V3 block at the same place: dense to dense, MoE spread over 3-60."""
    if layer < n_dense:
        return min(layer, 2)
    return 3 + round((layer - n_dense) * (DSV3_LAST - 3) / max(n_layer - 1 - n_dense, 1))


def ccmoe_recipe_types(inv) -> dict[str, str]:
    """The CC-MoE recipe for the 192-expert DeepSeek-V3 (base IQ1_S), by the DeepSeek-V3 block of each layer."""
    s = summarize(inv)
    types = {"token_embd.weight": "Q2_K", "output.weight": "Q5_K"}
    for t in inv.tensors:
        if not t.name.startswith("blk.") or len(t.shape) < 2 or "gate_inp" in t.name:
            continue
        layer = int(t.name.split(".")[1])
        b, kind = dsv3_block(layer, s.n_dense_lead, s.n_layers), t.name.split(".")[2]
        edge, more = (3 <= b <= 9 or 54 <= b <= 60), (3 <= b <= 9 or 53 <= b <= 60 or b % 3 == 0)
        typ = {"ffn_down_exps": "IQ2_XXS" if edge else "IQ1_M", "ffn_gate_exps": "IQ1_M" if edge else "IQ1_S",
               "ffn_up_exps": "IQ1_M" if edge else "IQ1_S", "ffn_down_shexp": "Q5_K" if more else "IQ4_XS",
               "ffn_gate_shexp": "IQ4_XS" if more else "IQ3_S", "ffn_up_shexp": "IQ4_XS" if more else "IQ3_S",
               "attn_output": "IQ4_XS" if (b <= 6 or b >= 53 or b % 3 == 0) else "IQ3_S",
               "attn_q_a": "Q4_K", "attn_kv_a_mqa": "Q4_K", "attn_q_b": "Q2_K",
               "ffn_down": "Q6_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K"}.get(kind)
        if typ:
            types[t.name] = typ
    return types


def plan_row(engine, model, inv, sens, impact, size, path, imatrix, reference, n_params, threads, rows) -> dict:
    """Build a plan of `size` tensor bytes, measure it, and find the smallest mix at least as good."""
    excluded = tuple(t.lower() for t in get_profile("cpu").unsupported_types)
    plan = make_plan(inv, sens, Budget("cpu", size, 0, 0, 0, size), excluded, impact)
    build(engine, model, plan, path, imatrix=imatrix, force=True, threads=threads)
    row = {"kind": "ccmoe plan", **measure(engine, path, reference, n_params, threads)}
    mixes = {m: r for m, r in rows.items() if r["kind"] == "llama.cpp mix"}
    better = sorted((r["tensor_bytes"], m) for m, r in mixes.items() if r["mean_kld"] <= row["mean_kld"])
    row["smallest_mix_as_good"] = better[0][1] if better else None
    row["size_ratio"] = round(better[0][0] / row["tensor_bytes"], 3) if better else None
    return row


def fmt(value, se, digits: int, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    return f"{scale * value:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")


def print_table(rows: dict) -> None:
    print("\n| file | bits/weight | size (MB) | mean KLD | p99 KLD | same top token (%) | PPL | "
          "smallest mix as good (size ratio) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["tensor_bytes"]):
        as_good = f"{r['smallest_mix_as_good']} (x{r['size_ratio']})" if r["kind"] == "ccmoe plan" else ""
        label = f"**{name}**" if r["kind"] == "ccmoe plan" else name
        print(f"| {label} | {r['bpw']:.2f} | {r['tensor_bytes'] / 1e6:.2f} | {fmt(r['mean_kld'], r['mean_kld_se'], 5)} | "
              f"{fmt(r['p99_kld'], None, 4)} | {fmt(r['same_top'], r.get('same_top_se'), 2, 100)} | "
              f"{fmt(r['ppl'], r.get('ppl_se'), 2)} | {as_good} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--plans-at", default="IQ2_XXS,Q2_K,IQ3_XXS,Q3_K_S")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--chunks", type=int, default=None, help="held-out chunks of 256 tokens (default: all)")
    ap.add_argument("--priors-plan", action="store_true")
    ap.add_argument("--cc-moe", action="store_true")
    ap.add_argument("--ladder", default=None, help="comma-separated candidate types (default: the planner's)")
    ap.add_argument("--no-impact", action="store_true", help="no impact probes: errors x expert usage")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work, threads = args.work, args.threads
    work.mkdir(parents=True, exist_ok=True)
    engine, model = find_engine(), args.model or bundled_model_path()
    inv = read_gguf(model)
    corpus = ensure_reference_corpus() if "ccmoe.training" in inv.metadata else ensure_corpus()
    n_params = sum(t.n_elements for t in inv.tensors)
    calib = work / "calib.txt"
    calib.write_text(corpus.train.read_text()[:200_000])
    folder = work / "measure"
    done = measurement_paths(folder, model)["sensitivity" if args.no_impact else "impact"]
    if not done.is_file():
        measure_model(engine, model, calib, folder, ctx=256, chunks=100, impact=not args.no_impact, force=True,
                      threads=threads,
                      types=tuple(args.ladder.split(",")) if args.ladder else None)
    prof = load_measurements(folder, model)
    impact = None if args.no_impact else prof.impact
    reference = work / "heldout.kld"
    if not reference.exists():
        save_reference_logits(engine, model, corpus.heldout, reference, threads=threads, chunks=args.chunks)
    out = work / "results.json"
    rows = json.loads(out.read_text()) if out.is_file() else {}
    for mix in args.mixes.split(","):
        path = work / f"{mix}.gguf"
        if mix not in rows:
            quantize(engine, model, path, mix, [], imatrix=prof.imatrix, threads=threads)
            rows[mix] = {"kind": "llama.cpp mix", **measure(engine, path, reference, n_params, threads)}
            path.unlink()
            out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{mix}: {rows[mix]['tensor_bytes']} B, KLD {rows[mix]['mean_kld']:.5f}", flush=True)
    targets = [(at, rows[at]["tensor_bytes"]) for at in args.plans_at.split(",") if at]
    if args.cc_moe:
        path = work / "cc-moe.gguf"
        if "CC-MoE recipe" not in rows:
            quantize(engine, model, path, "IQ1_S", type_lines(ccmoe_recipe_types(inv)), imatrix=prof.imatrix,
                     threads=threads)
            rows["CC-MoE recipe"] = {"kind": "CC-MoE recipe", **measure(engine, path, reference, n_params, threads)}
            path.unlink()
        targets.append(("CC-MoE recipe", rows["CC-MoE recipe"]["tensor_bytes"]))
    ladder = {"types": tuple(args.ladder.split(","))} if args.ladder else {}
    priors = prior_sensitivity(engine, inv, **ladder) if args.priors_plan else None
    for at, size in targets:
        for label, sens, imp in (("plan", prof.sensitivity, impact), ("priors plan", priors, None)):
            name = f"{label}@{at}"
            if sens is None or name in rows:
                continue
            path = work / f"{label.replace(' ', '-')}@{at}.gguf"
            rows[name] = plan_row(engine, model, inv, sens, imp, size, path, prof.imatrix, reference, n_params,
                                  threads, rows)
            path.unlink()
            out.write_text(json.dumps(rows, indent=1) + "\n")
            print(f"{name}: KLD {rows[name]['mean_kld']:.5f}, as good as {rows[name]['smallest_mix_as_good']} "
                  f"(x{rows[name]['size_ratio']})", flush=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
