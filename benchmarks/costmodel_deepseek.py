"""Cost model on DeepSeek shapes: predicted vs measured llama-bench decode and prompt tok/s of generated deepseek2
models (MLA, dense lead, shared expert) on this host, uncalibrated and calibrated, before and after the fixes.

  PYTHONPATH=. .venv/bin/python benchmarks/costmodel_deepseek.py [--work DIR] [--rounds 5] [--threads N]

Models: deepseek2 in Q8_0 and Q4_K, each over 4x the last-level cache (so reads come from RAM, as a real model's
do). Calibrations: `calibrate` at its old CPU default (200 MB medium models) and at the new one (4x the cache),
both measuring q8_0 and q4_0 only, so Q4_K is a type calibration did not measure. "old" predictions give such a
type the 0.55 default; "new" ones the pool's slowest measured efficiency. llama-bench rounds alternate the models
(pp512 and tg64, 2 repetitions each); medians over the rounds. Prints a markdown table and writes
costmodel_deepseek.json to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ccmoe_runtime.devices import get_profile  # noqa: E402
from ccmoe_runtime.devices.detect import last_level_cache_bytes  # noqa: E402
from ccmoe_runtime.engine.build import find_engine  # noqa: E402
from ccmoe_runtime.engine.tools import run_tool  # noqa: E402
from ccmoe_runtime.model.inventory import read_gguf, summarize  # noqa: E402
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf  # noqa: E402
from ccmoe_runtime.placement.calibrate import calibrate  # noqa: E402
from ccmoe_runtime.placement.costmodel import DEFAULT_EFFICIENCY, load_factors, predict, tensor_loads  # noqa: E402


def spec(n_layer: int) -> SynthSpec:
    return SynthSpec(arch="deepseek2", name=f"ds-bench-{n_layer}", n_embd=1024, n_layer=n_layer, n_dense_lead=1,
                     n_head=8, n_expert=32, n_expert_used=4, n_ff_exp=512, n_ff=2048, q_lora_rank=384,
                     kv_lora_rank=256, qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64, seed=3)


def models(work: Path, llc: int) -> dict[str, Path]:
    """deepseek2 models in Q8_0 and Q4_K, each over 4x the last-level cache."""
    out = {}
    for qt, per_layer in (("q8_0", 57e6), ("q4_k", 30e6)):
        n_layer = max(8, round(4 * llc / per_layer) + 1)
        path = work / f"ds-{qt}-{n_layer}.gguf"
        if not path.is_file():
            write_random_gguf(spec(n_layer), path, force=True, qtype=qt)
        out[qt] = path
    return out


def bench_round(engine, paths: list[Path], threads: int) -> dict[str, dict[str, float]]:
    args = [a for p in paths for a in ("-m", str(p))] + ["-p", "512", "-n", "64", "-r", "2", "-t", str(threads),
                                                         "-o", "json"]
    rows = json.loads(run_tool(engine, "llama-bench", args, "the benchmark models", timeout=1800).stdout)
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r["model_filename"], {})["pp" if r["n_prompt"] else "tg"] = statistics.median(r["samples_ts"])
    return out


def predicted(path: Path, device, factors) -> dict[str, float]:
    inv = read_gguf(path)
    loads = tensor_loads(inv)
    p = predict(loads, {ld.name: "cpu" for ld in loads}, device, factors, summarize(inv).n_layers, 0.0, 0, 512, 512,
                "cpu")
    return {"tg": p.decode_tps, "pp": round(p.prompt_tps, 1)}


def old_eff(factors, path: Path):
    """The factors as the model used them before: an unmeasured type at the 0.55 default."""
    types = {t.ggml_type.lower() for t in read_gguf(path).tensors}
    extra = {f"cpu:{t}": DEFAULT_EFFICIENCY["cpu"] for t in types if f"cpu:{t}" not in factors.efficiency}
    return replace(factors, efficiency={**factors.efficiency, **extra})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ccmoe-costmodel-ds"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    engine, device = find_engine(), get_profile("auto")
    llc = last_level_cache_bytes() or 32 * 1024**2
    paths = models(a.work, llc)
    cals = {}
    for label, size in (("cal-200MB", 200), ("cal-default", None)):
        out = a.work / f"{label}.json"
        if not out.is_file():
            calibrate(engine, device, out, size_mb=size, types=["q8_0", "q4_0"], reps=3, threads=a.threads)
        cals[label] = load_factors(device, out)
    load_before = os.getloadavg()[0]
    rounds = [bench_round(engine, list(paths.values()), a.threads) for _ in range(a.rounds)]
    result = {"llc_bytes": llc, "threads": a.threads, "load_before": load_before, "load_after": os.getloadavg()[0],
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}}
    print("| model | size | measured tg / pp | uncalibrated | cal 200 MB, old | cal 200 MB, new | cal default, old | "
          "cal default, new |\n|---|---|---|---|---|---|---|---|")
    for qt, path in paths.items():
        meas = {k: statistics.median(r[str(path)][k] for r in rounds) for k in ("tg", "pp")}
        preds = {"uncalibrated": predicted(path, device, load_factors(device, a.work / "absent.json"))}
        for label, f in cals.items():
            preds[f"{label}/old"] = predicted(path, device, old_eff(f, path))
            preds[f"{label}/new"] = predicted(path, device, f)
        result["models"][qt] = {"path": str(path), "bytes": path.stat().st_size, "measured": meas,
                                "samples": [r[str(path)] for r in rounds], "predicted": preds}

        def cell(p):
            return f"{p['tg']:.0f} ({100 * (p['tg'] / meas['tg'] - 1):+.0f}%) / {p['pp']:.0f} " \
                   f"({100 * (p['pp'] / meas['pp'] - 1):+.0f}%)"
        print(f"| {qt} | {path.stat().st_size / 1e9:.2f} GB | {meas['tg']:.1f} / {meas['pp']:.1f} | "
              + " | ".join(cell(preds[k]) for k in ("uncalibrated", "cal-200MB/old", "cal-200MB/new",
                                                     "cal-default/old", "cal-default/new")) + " |")
    print(f"load average {load_before:.1f} before, {result['load_after']:.1f} after; {a.threads} threads; "
          f"LLC {llc / 2**20:.0f} MiB")
    (a.work / "costmodel_deepseek.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
