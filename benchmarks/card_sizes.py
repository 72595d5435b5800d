"""ccmoe's placement vs the best --n-cpu-moe at several emulated card sizes, in alternating rounds.

`--n-cpu-moe` moves whole layers (three expert tensors); ccmoe moves single tensors but keeps a safety margin. Who
wins therefore depends on where the free memory ends inside a layer. The sizes given to --free-mib should step
through one layer's worth of memory (e.g. 24077 down in steps of a quarter layer), so that the phase of that edge
is sampled evenly instead of picked. At each size: hold the GPU memory (gpu_hold.py), place with ccmoe (trial run
included), find the fewest --n-cpu-moe layers that load, then alternate the two for --rounds rounds of llama-bench
(pp512, tg128; a round's sample is its best repetition). When ccmoe chose a load mode other than llama.cpp's mmap,
a third contender, that --n-cpu-moe with ccmoe's load mode, tells the placement's share from the load mode's. A
fourth, ccmoe's placement under the sweep's own policy (llama.cpp's mmap, no margin, kept only if its trial runs),
tells ccmoe's tensor-level placement from its safety policy.
Resumable: finished sizes are kept in --work.
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

from ccmoe_runtime.bench.bench import best_n_cpu_moe, spread
from ccmoe_runtime.devices import get_profile  # noqa: E402
from ccmoe_runtime.engine.build import find_engine  # noqa: E402
from ccmoe_runtime.engine.tools import N_GEN, N_PROMPT, llama_bench  # noqa: E402
from ccmoe_runtime.model.inventory import read_gguf, summarize  # noqa: E402
from ccmoe_runtime.placement.costmodel import load_factors  # noqa: E402
from ccmoe_runtime.placement.search import Settings, place  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hold_memory(free_mib: int) -> tuple[subprocess.Popen, dict]:
    """Start gpu_hold.py so that `free_mib` MiB stay free; returns the process and what it reports."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_hold.py"), "--free-mib", str(free_mib)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"gpu_hold.py --free-mib {free_mib} failed")
    return proc, json.loads(line)


def release(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def ccmoe_args(engine, model: Path, margin_bytes: int | None = None, load_mode: str | None = None
               ) -> tuple[list[str], dict]:
    """ccmoe's llama-bench flags for this free memory, and what it predicted and placed."""
    device = get_profile("auto")
    settings = Settings(ctx=N_PROMPT, kv_type="f16", depth=N_GEN // 2, n_prompt=N_PROMPT, margin_bytes=margin_bytes,
                        load_mode=load_mode)
    p = place(read_gguf(model), device, load_factors(device), settings, engine, model, trial=True)
    info = {"predicted": p.predicted_empty.to_dict(), "cpu_expert_tensors": len(p.cpu_expert_tensors),
            "cpu_expert_layers": p.cpu_expert_layers, "notes": p.notes, "threads": p.threads, "load_mode": p.load_mode}
    return p.bench_args() + ["-t", str(p.threads)], info


def one_size(engine, model: Path, free_mib: int, rounds: int, reps: int, n_moe_layers: int) -> dict:
    """Everything measured at one emulated card size."""
    proc, held = hold_memory(free_mib)
    try:
        log(f"{free_mib} MiB free: {held}")
        args, info = ccmoe_args(engine, model)
        log(f"  ccmoe: {info['cpu_expert_tensors']} expert tensors in {info['cpu_expert_layers']} layers on the CPU; "
            f"predicted tg {info['predicted']['decode_tps']}; {' | '.join(info['notes'])}")
        threads = int(args[args.index("-t") + 1])
        n = best_n_cpu_moe(engine, model, n_moe_layers, info["cpu_expert_layers"], threads)
        if n is None:
            return {"free_mib": free_mib, "held": held, "ccmoe_info": info, "error": "no --n-cpu-moe count loads"}
        log(f"  best --n-cpu-moe: {n} ({3 * n} expert tensors on the CPU)")
        contenders = {"ccmoe": args, f"n-cpu-moe={n}": ["-ncmoe", str(n), "-t", str(threads)]}
        if info["load_mode"] != "auto":      # attribution: llama.cpp's layers with ccmoe's host-memory load mode
            contenders[f"n-cpu-moe={n} +ccmoe-load-mode"] = ["-ncmoe", str(n), "-lm", info["load_mode"], "-t", str(threads)]
        same_args, same = ccmoe_args(engine, model, margin_bytes=0, load_mode="auto")
        result_same = {"ccmoe_same_policy_info": same}
        if same_args != args:                # attribution: ccmoe's placement under the sweep's policy (mmap, no margin)
            log(f"  ccmoe, the sweep's policy: {same['cpu_expert_tensors']} expert tensors on the CPU; "
                f"{' | '.join(same['notes'])}")
            contenders["ccmoe, sweep's policy"] = same_args
        samples = {k: {"pp": [], "tg": []} for k in contenders}
        errors = {}
        for i in range(rounds):
            for name, a in contenders.items():
                if name in errors:
                    continue
                r = llama_bench(engine, model, a, reps=reps)
                if not r["ok"]:
                    errors[name] = r["error"]
                    continue
                for key in ("pp", "tg"):
                    samples[name][key].append(max(r[key]))
                log(f"  round {i + 1} {name}: pp {samples[name]['pp'][-1]:.1f} tg {samples[name]['tg'][-1]:.1f}")
        result = {"free_mib": free_mib, "held": held, "ccmoe_info": info, "best_n_cpu_moe": n, "args": contenders,
                  "errors": errors, **result_same}
        for name in contenders:
            if samples[name]["tg"]:
                result[name] = {k: spread(v) for k, v in samples[name].items()}
        return result
    finally:
        release(proc)


def verdict(r: dict) -> dict:
    """ccmoe's decode against the best --n-cpu-moe: medians, per-round ratios and the prediction's error."""
    base = f"n-cpu-moe={r.get('best_n_cpu_moe')}"
    if "ccmoe" not in r or base not in r:
        return {}
    mine, theirs = r["ccmoe"]["tg"], r[base]["tg"]
    ratios = [a / b for a, b in zip(mine["samples"], theirs["samples"])]
    pred = r["ccmoe_info"]["predicted"]["decode_tps"]
    return {"tg_ratio_of_medians": round(mine["median"] / theirs["median"], 4),
            "tg_ratio_per_round_median": round(statistics.median(ratios), 4),
            "ccmoe_rounds_won": sum(x >= 1 for x in ratios), "rounds": len(ratios),
            "pp_ratio_of_medians": round(r["ccmoe"]["pp"]["median"] / r[base]["pp"]["median"], 4),
            "prediction_error": round(pred / mine["median"] - 1, 4)}


def attribution(r: dict, base: str) -> str:
    a = r.get(f"{base} +ccmoe-load-mode")
    return f"{a['tg']['median']:.1f} ({a['tg']['spread']:.1%})" if a else "(same as the baseline)"


def same_policy(r: dict) -> str:
    a, info = r.get("ccmoe, sweep's policy"), r.get("ccmoe_same_policy_info")
    if not info:
        return ""
    return (f"{info['cpu_expert_tensors']}, {a['tg']['median']:.1f} ({a['tg']['spread']:.1%})" if a
            else f"{info['cpu_expert_tensors']}, same flags as ccmoe")


def table(results: list[dict]) -> list[str]:
    rows = ["| free MiB | ccmoe CPU tensors (layers) | best --n-cpu-moe (tensors) | ccmoe tg (spread) | --n-cpu-moe tg (spread)"
            " | ccmoe / --n-cpu-moe tg, per-round median | rounds ccmoe won | ccmoe / --n-cpu-moe pp | ccmoe tg predicted |"
            " --n-cpu-moe with ccmoe's load mode: tg (spread) | ccmoe under the sweep's policy: CPU tensors, tg (spread) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v, base = r.get("verdict", {}), f"n-cpu-moe={r.get('best_n_cpu_moe')}"
        if not v:
            rows.append(f"| {r['free_mib']} | failed: {r.get('error') or r.get('errors')} | | | | | | | | | |")
            continue
        c, b, info = r["ccmoe"]["tg"], r[base]["tg"], r["ccmoe_info"]
        rows.append(f"| {r['free_mib']:,} | {info['cpu_expert_tensors']} ({info['cpu_expert_layers']}) | "
                    f"{r['best_n_cpu_moe']} ({3 * r['best_n_cpu_moe']}) | {c['median']:.1f} ({c['spread']:.1%}) | "
                    f"{b['median']:.1f} ({b['spread']:.1%}) | {v['tg_ratio_per_round_median']:.3f} | "
                    f"{v['ccmoe_rounds_won']}/{v['rounds']} | {v['pp_ratio_of_medians']:.2f} | "
                    f"{info['predicted']['decode_tps']:.1f} ({v['prediction_error']:+.1%}) | {attribution(r, base)} | {same_policy(r)} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--free-mib", type=int, nargs="+", required=True, help="emulated card sizes (MiB left free)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per round (the best one counts)")
    ap.add_argument("--deadline", type=float, default=time.time() + 3600, help="Unix time: start no size after it")
    ap.add_argument("--size-s", type=float, default=None,
                    help="expected seconds per size, checked against --deadline (default: 90 + 60 per round)")
    ap.add_argument("--backend", default="cuda")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    engine = find_engine(a.backend)
    n_moe_layers = len(summarize(read_gguf(a.model)).moe_layers)
    done_path = a.work / "card_sizes.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    for free in a.free_mib:
        if str(free) in done:
            continue
        if time.time() + (a.size_s or 90 + 60 * a.rounds) > a.deadline:
            log(f"stopping before {free} MiB: the deadline is near (run again to go on)")
            break
        done[str(free)] = one_size(engine, a.model, free, a.rounds, a.reps, n_moe_layers)
        done_path.write_text(json.dumps(done, indent=1) + "\n")
    results = [done[str(f)] for f in a.free_mib if str(f) in done]
    for r in results:
        r["verdict"] = verdict(r)
    (a.out / "card_sizes.json").write_text(json.dumps({"model": str(a.model), "rounds": a.rounds, "reps": a.reps,
                                                        "sizes": results}, indent=1) + "\n")
    md = table(results)
    (a.out / "card_sizes.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
