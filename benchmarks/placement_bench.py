"""ccmoe placement vs llama.cpp's own placements, side by side with llama-bench (pp512, tg128, medians).

Contenders on one model and the same free GPU memory (benchmarks/gpu_hold.py emulates a smaller card):
  ccmoe      `ccmoe_runtime.placement.search.place` (calibrated cost model, -ot rules per tensor)
  fit        llama.cpp's --fit (llama-bench -fitt 1024: the default 1024 MiB margin)
  exps=CPU   all routed experts in host memory (-ot exps=CPU)
  ncmoe=N    --n-cpu-moe N, swept downwards from ccmoe's CPU layer count until a load fails (best = fewest)
Attribution runs, not baselines: the best --n-cpu-moe with ccmoe's CPU settings (load mode, threads, --no-host),
and, when ccmoe chose llama.cpp's repacking CPU buffers, ccmoe's placement made with pinned ones.
Resumable: what is done is kept in --work; a later run with the same --work does the rest.
Writes placement_bench.json and placement_bench.md to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ccmoe_runtime.devices import get_profile
from ccmoe_runtime.devices.detect import read_nvidia_smi  # noqa: E402
from ccmoe_runtime.engine.build import find_engine  # noqa: E402
from ccmoe_runtime.model.inventory import read_gguf, summarize  # noqa: E402
from ccmoe_runtime.placement.calibrate import calibrate  # noqa: E402
from ccmoe_runtime.placement.costmodel import calibration_path, load_factors  # noqa: E402
from ccmoe_runtime.placement.search import (  # noqa: E402
    Settings,
    place,
    save_placement,
    summary_lines,
)

N_PROMPT, N_GEN = 512, 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def save_json(path: Path, data) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def spread(samples: list[float]) -> dict:
    return {"median": round(statistics.median(samples), 2), "min": round(min(samples), 2),
            "max": round(max(samples), 2), "samples": [round(s, 2) for s in samples]}


def bench(engine, model: Path, args: list[str], reps: int, timeout: float) -> dict:
    """One llama-bench run: pp512 and tg128 medians, or the error that stopped it."""
    cmd = [str(engine.tool("llama-bench")), "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN), "-r", str(reps),
           "-o", "json", *args]
    started = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "args": args}
    result = {"args": args, "wall_s": round(time.monotonic() - started, 1), "ok": out.returncode == 0}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        result["error"] = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower()), " | ".join(lines[-2:]))
        return result
    for row in json.loads(out.stdout):
        key = f"pp{N_PROMPT}" if row["n_prompt"] else f"tg{N_GEN}"
        result[key] = spread(row.get("samples_ts") or [row["avg_ts"]])
        result.setdefault("info", {k: row.get(k) for k in ("n_gpu_layers", "n_cpu_moe", "n_threads", "flash_attn",
                                                           "n_batch", "n_ubatch", "gpu_info", "cpu_info")})
    return result


def gpu_state() -> dict:
    gpus = read_nvidia_smi()
    return gpus[0] if gpus else {}


def ensure_calibration(engine, work: Path, size_mb: int, reps: int) -> Path:
    path = work / "host-profile.json"
    shared = calibration_path(get_profile("auto"))
    if not path.is_file() and shared.is_file():              # calibrated by an earlier job on this machine
        path.write_bytes(shared.read_bytes())
    if not path.is_file():
        log("calibrating (generated models, llama-bench)")
        calibrate(engine, get_profile("auto"), path, size_mb=size_mb, reps=reps, progress=log)
        shared.parent.mkdir(parents=True, exist_ok=True)     # where `ccmoe-run bench/serve --device auto` look
        shared.write_bytes(path.read_bytes())
    log(f"calibration: {json.dumps(load_json(path, {}).get('factors'))}")
    return path


def ccmoe_placement(engine, model: Path, work: Path, host_profile: Path, extra_margin: int = 0,
                    name: str = "placement", cpu_repack: bool | None = None) -> tuple[dict, list[str]]:
    """Place the model for llama-bench's contexts (pp512: 512 tokens; tg128 measured from an empty context)."""
    from ccmoe_runtime.placement.search import DEFAULT_MARGIN

    device = get_profile("auto")
    factors = load_factors(device, host_profile)
    inv = read_gguf(model)
    settings = Settings(ctx=N_PROMPT, parallel=1, kv_type="f16", depth=N_GEN // 2, n_prompt=N_PROMPT,
                        margin_bytes=DEFAULT_MARGIN + extra_margin if extra_margin else None, cpu_repack=cpu_repack)
    p = place(inv, device, factors, settings, engine, model, trial=True)
    save_placement(p, work / f"{name}.json")
    lines = summary_lines(p)
    for line in lines:
        log(line)
    return p.to_dict(), lines


def cpu_expert_layers(placement: dict) -> int:
    """How many layers hold at least one routed expert tensor on the CPU."""
    layers = {int(n.split(".")[1]) for n, w in placement["tensors"].items() if w == "cpu" and "_exps" in n}
    return len(layers)


def run_contenders(engine, model: Path, placement: dict, results: dict, path: Path, reps: int, deadline: float,
                   n_moe_layers: int, retry=None) -> None:
    """ccmoe, fit, the --n-cpu-moe sweep and exps=CPU, each once, saving after every run."""
    def left() -> float:
        return deadline - time.time()

    def run(name: str, args: list[str]) -> dict | None:
        if name in results:
            return results[name]
        if left() < 45:
            log(f"skipping {name}: {left():.0f} s left")
            return None
        log(f"{name}: llama-bench {' '.join(args)}")
        results[name] = bench(engine, model, args, reps, max(left() - 10, 30))
        r = results[name]
        log(f"{name}: " + (f"pp{N_PROMPT} {r[f'pp{N_PROMPT}']['median']} tg{N_GEN} {r[f'tg{N_GEN}']['median']} tok/s "
                           f"({r['wall_s']} s)" if r["ok"] else f"FAILED: {r['error']}"))
        save_json(path, results)
        return r

    first = run("ccmoe", placement["bench_args"] + ["-t", str(placement["threads"])])
    if first is not None and not first["ok"] and retry is not None:
        again = retry()
        run("ccmoe-margin", again["bench_args"] + ["-t", str(again["threads"])])     # a placement that did not load: once more, 512 MiB freer
    run("fit", ["-fitt", "1024"])
    start = max(cpu_expert_layers(placement), 1)
    n = start
    while 0 <= n <= n_moe_layers:
        r = run(f"ncmoe={n}", ["-ncmoe", str(n)])
        if r is None or not r["ok"]:
            break
        n -= 1
    if all(not results.get(f"ncmoe={k}", {}).get("ok") for k in range(start, n_moe_layers + 1)):
        n = start + 1
        while n <= n_moe_layers:                       # nothing fitted at ccmoe's count: go up until one does
            r = run(f"ncmoe={n}", ["-ncmoe", str(n)])
            if r is None or r["ok"]:
                break
            n += 1
    run("exps=CPU", ["-ot", "exps=CPU"])
    best = min((int(k.split("=")[1]) for k, r in results.items() if k.startswith("ncmoe=") and r.get("ok")), default=None)
    own = (["-lm", placement["load_mode"]] if placement["load_mode"] != "auto" else []) + ["-t", str(placement["threads"])]
    own += ["--no-host", "1"] if placement.get("cpu_repack") else []
    if best is not None:                    # attribution, not a baseline: llama.cpp's layers with ccmoe's CPU settings
        run(f"ncmoe={best} +ccmoe-cpu-settings", ["-ncmoe", str(best), *own])


def table(results: dict, predicted: dict) -> list[str]:
    """Markdown table: medians (min-max) per contender, and ccmoe's prediction."""
    rows = ["| contender | pp512 tok/s median (min-max) | tg128 tok/s median (min-max) |", "|---|---|---|"]
    for name, r in results.items():
        if not r.get("ok"):
            rows.append(f"| {name} | failed: {r.get('error', '')[:80]} | |")
            continue
        pp, tg = r[f"pp{N_PROMPT}"], r[f"tg{N_GEN}"]
        rows.append(f"| {name} | {pp['median']:,.1f} ({pp['min']:,.1f}-{pp['max']:,.1f}) | "
                    f"{tg['median']:,.1f} ({tg['min']:,.1f}-{tg['max']:,.1f}) |")
    if predicted:
        rows.append(f"| ccmoe predicted | {predicted['prompt_tps']:,.1f} | {predicted['decode_tps']:,.1f} |")
    return rows


def verdict(results: dict, predicted: dict) -> dict:
    """Acceptance: ccmoe's decode >= the best baseline's, and its prediction within 15% of the measurement."""
    ok = {k: r for k, r in results.items() if r.get("ok")}
    mine_key = "ccmoe" if "ccmoe" in ok else "ccmoe-margin"
    if mine_key not in ok:
        return {"ccmoe_measured": False}
    mine = ok[mine_key][f"tg{N_GEN}"]["median"]
    others = {k: r[f"tg{N_GEN}"]["median"] for k, r in ok.items() if not k.startswith("ccmoe") and "+ccmoe" not in k}
    best = max(others.items(), key=lambda kv: kv[1]) if others else (None, 0.0)
    pred = predicted["decode_tps"]
    pp_pred, pp_meas = predicted["prompt_tps"], ok[mine_key][f"pp{N_PROMPT}"]["median"]
    return {"measured": mine_key, "ccmoe_tg": mine, "best_baseline": best[0], "best_baseline_tg": best[1],
            "ccmoe_vs_best": round(mine / best[1], 4) if best[1] else None, "beats_or_ties_best": mine >= best[1],
            "predicted_tg": pred, "prediction_error": round(pred / mine - 1, 4), "within_15pct": abs(pred / mine - 1) <= 0.15,
            "predicted_pp": pp_pred, "pp_prediction_error": round(pp_pred / pp_meas - 1, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deadline", type=float, default=time.time() + 3600, help="Unix time to stop starting runs.")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calib-mb", type=int, default=1500)
    ap.add_argument("--backend", default=None)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    engine = find_engine(a.backend)
    log(f"engine {engine.bin_dir} ({engine.backend}); GPU {gpu_state()}")
    host_profile = ensure_calibration(engine, a.work, a.calib_mb, a.reps)
    inv = read_gguf(a.model)
    s = summarize(inv)
    log(f"model {a.model.name}: {s.total_params / 1e9:.2f}B params, {a.model.stat().st_size / 1e9:.2f} GB, "
        f"{s.n_layers} layers, {s.n_expert} experts (top {s.n_expert_used})")
    placement, lines = ccmoe_placement(engine, a.model, a.work, host_profile)
    results_path = a.work / "results.json"
    results = load_json(results_path, {})
    retry = lambda: ccmoe_placement(engine, a.model, a.work, host_profile, 512 * 2**20, "placement-margin")[0]  # noqa: E731
    run_contenders(engine, a.model, placement, results, results_path, a.reps, a.deadline, len(s.moe_layers), retry)
    if placement.get("cpu_repack") and "ccmoe, pinned buffers" not in results and time.time() < a.deadline - 60:
        pinned = ccmoe_placement(engine, a.model, a.work, host_profile, name="placement-pinned", cpu_repack=False)[0]
        results["ccmoe, pinned buffers"] = bench(engine, a.model, pinned["bench_args"] + ["-t", str(pinned["threads"])],
                                                 a.reps, max(a.deadline - time.time() - 10, 30))   # attribution
        results["ccmoe, pinned buffers"]["predicted"] = pinned["predicted_empty"]
        save_json(results_path, results)
    predicted = placement["predicted_empty"] | {"decode_tps": placement["predicted"]["decode_tps"]}
    doc = {"model": {"path": str(a.model), "bytes": a.model.stat().st_size, "params": s.total_params,
                     "layers": s.n_layers, "experts": s.n_expert, "experts_used": s.n_expert_used},
           "gpu": gpu_state(), "engine": str(engine.bin_dir), "reps": a.reps,
           "calibration": load_json(host_profile, {}), "placement_summary": lines,
           "placement": {k: placement[k] for k in ("overrides", "memory", "predicted", "predicted_empty",
                                                   "bench_args", "memory_source", "factors_source", "notes",
                                                   "load_mode", "cpu_repack", "threads")},
           "results": results, "verdict": verdict(results, predicted)}
    save_json(a.out / "placement_bench.json", doc)
    md = table(results, predicted)
    (a.out / "placement_bench.md").write_text("\n".join(md + ["", "```", *lines, "```", "",
                                                              json.dumps(doc["verdict"], indent=1)]) + "\n")
    print("\n".join(md))
    print(json.dumps(doc["verdict"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
