"""Quality per byte: ccmoe plans against llama.cpp's standard type mixes on the bundled model.

Usage: python benchmarks/plan_vs_mixes.py WORKDIR [--plans-at IQ2_XXS,Q2_K,IQ3_XXS,Q3_K_S] [--threads N]

1. `ccmoe-run profile` on calibration text (the first 200 KB of the corpus's training part): imatrix, expert
   statistics, per-type errors and output impact.
2. Every standard mix built by llama-quantize with that imatrix; plans at exactly the size of the mixes named
   by --plans-at, built by `ccmoe-run build`.
3. Each file against the F16 model on the held-out text (never seen in calibration or training):
   llama-perplexity --kl-divergence (ctx 256). For each plan: the smallest mix that is at least as good, and
   the size ratio of that mix to the plan (>1 means the plan is better per byte).
Writes WORKDIR/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ccmoe_runtime.compress.measure import load_profile, profile_paths, run_profile
from ccmoe_runtime.compress.plan import Budget, make_plan
from ccmoe_runtime.compress.quality import kl_divergence, save_reference_logits
from ccmoe_runtime.compress.quantize import build
from ccmoe_runtime.devices import get_profile
from ccmoe_runtime.engine.build import find_engine
from ccmoe_runtime.engine.tools import quantize
from ccmoe_runtime.model.inventory import read_gguf
from ccmoe_runtime.model.sources import bundled_model_path
from ccmoe_runtime.testmodels.corpus import ensure_corpus

MIXES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "Q2_K", "IQ3_XXS", "IQ3_XS", "IQ3_S",
         "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


def tensor_bytes(path: Path) -> int:
    return sum(t.n_bytes for t in read_gguf(path).tensors)


def measure(engine, path: Path, reference: Path, n_params: int, threads: int) -> dict:
    q = kl_divergence(engine, path, reference, threads=threads)
    size = tensor_bytes(path)
    return {"file_bytes": path.stat().st_size, "tensor_bytes": size, "bpw": round(8 * size / n_params, 3), **q.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--plans-at", default="IQ2_XXS,Q2_K,IQ3_XXS,Q3_K_S")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work, threads = args.work, args.threads
    work.mkdir(parents=True, exist_ok=True)
    engine, corpus, model = find_engine(), ensure_corpus(), bundled_model_path()
    n_params = sum(t.n_elements for t in read_gguf(model).tensors)
    calib = work / "calib.txt"
    calib.write_text(corpus.train.read_text()[:200_000])
    folder = work / "profile"
    if not profile_paths(folder, model)["impact"].is_file():
        run_profile(engine, model, calib, folder, ctx=256, chunks=100, impact=True, force=True, threads=threads)
    prof = load_profile(folder, model)
    reference = work / "heldout.kld"
    if not reference.exists():
        save_reference_logits(engine, model, corpus.heldout, reference, threads=threads)
    rows = {}
    for mix in MIXES:
        path = work / f"{mix}.gguf"
        if not path.exists():
            quantize(engine, model, path, mix, [], imatrix=prof.imatrix, threads=threads)
        rows[mix] = {"kind": "llama.cpp mix", **measure(engine, path, reference, n_params, threads)}
        print(f"{mix}: {rows[mix]['tensor_bytes']} B, KLD {rows[mix]['mean_kld']:.5f}", flush=True)
    inv = read_gguf(model)
    device = get_profile("cpu")
    for at in args.plans_at.split(","):
        size = rows[at]["tensor_bytes"]
        plan = make_plan(inv, prof.sensitivity, Budget("cpu", size, 0, 0, 0, size),
                         tuple(t.lower() for t in device.unsupported_types), prof.impact)
        path = work / f"plan@{at}.gguf"
        build(engine, model, plan, path, imatrix=prof.imatrix, force=True, threads=threads)
        row = {"kind": "ccmoe plan", **measure(engine, path, reference, n_params, threads)}
        better = sorted((r["tensor_bytes"], m) for m, r in rows.items()
                        if r["kind"] == "llama.cpp mix" and r["mean_kld"] <= row["mean_kld"])
        row["smallest_mix_as_good"] = better[0][1] if better else None
        row["size_ratio"] = round(better[0][0] / row["tensor_bytes"], 3) if better else None
        larger = sorted((rows[m]["tensor_bytes"], m) for m in MIXES if rows[m]["tensor_bytes"] >= row["tensor_bytes"])
        row["beats_every_mix_up_to_that_size"] = all(rows[m]["mean_kld"] > row["mean_kld"] for _, m in larger
                                                     if not better or rows[m]["tensor_bytes"] < better[0][0])
        rows[f"plan@{at}"] = row
        print(f"plan@{at}: KLD {row['mean_kld']:.5f}, as good as {row['smallest_mix_as_good']} "
              f"(x{row['size_ratio']})", flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| file | bits/weight | size (MB) | mean KLD | p99 KLD | same top token | smallest mix as good (size ratio) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["tensor_bytes"]):
        as_good = f"{r['smallest_mix_as_good']} (x{r['size_ratio']})" if r["kind"] == "ccmoe plan" else ""
        label = f"**{name}**" if r["kind"] == "ccmoe plan" else name
        p99 = f"{r['p99_kld']:.4f}" if r["p99_kld"] is not None else "n/a"
        print(f"| {label} | {r['bpw']:.2f} | {r['tensor_bytes'] / 1e6:.3f} | {r['mean_kld']:.5f} | {p99} | "
              f"{100 * r['same_top']:.2f} % | {as_good} |")


if __name__ == "__main__":
    main()
