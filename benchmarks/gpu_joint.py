"""Acceptance run of issue 18: `compress --device auto` + `serve` against llama.cpp's Q4_K_M of the same source under
llama-server's default (--fit) and under the best --n-cpu-moe, on a card emulated at fractions of that Q4_K_M's size.

  python3 benchmarks/gpu_joint.py prepare --work W            # source (Q8_0), llama-quantize's Q4_K_M, measurements
  python3 benchmarks/gpu_joint.py bench --work W --out DIR    # per fraction: hold the GPU, compress, 3 contenders
  python3 benchmarks/gpu_joint.py all --size cpu --work W --out DIR   # the same flow, CPU-sized (tests the script)

GPU size: a generated deepseek2 (2048 wide, 37 layers with 1 dense lead, 64 routed experts of 1408 with 6 used,
2 shared, MLA) of 21.0B parameters in Q8_0 (22.3 GB); llama-quantize Q4_K_M of it. For each --fractions value the
GPU is held (benchmarks/gpu_hold.py) so that fraction x the Q4_K_M's size stays free; `ccmoe-run compress SRC
--device auto --max-kld K` (K: the Q4_K_M's predicted KLD from the same measurements, so the compressed model is
asked for equal or lower predicted KLD) and then, in alternating rounds, each contender's llama-server is started,
sent one warm-up and --requests completions (~500-token prompt, 128 tokens, prompt cache off), and stopped:
  fit     llama-server -m Q4_K_M -c 4096 (its default --fit)
  ncmoe   llama-server -m Q4_K_M -c 4096 -ngl 999 --n-cpu-moe N, N the fewest CPU layers that run (llama-bench)
  ccmoe   ccmoe-run serve --model OUT.gguf --device auto --ctx 4096 (the layout compress wrote)
Timings are llama-server's own (prompt_per_second, predicted_per_second), medians over rounds and requests;
predictions are the cost model's for each contender's placement (fit's read off llama-fit-params). CPU size: a
small deepseek2 on this host, --budget-gb instead of a held GPU. --deadline-s stops starting work that would not
finish in time (what was skipped is recorded). Writes gpu_joint.json and gpu_joint.md to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ccmoe_runtime.compress.measure import load_measurements  # noqa: E402
from ccmoe_runtime.compress.plan import tensor_weights  # noqa: E402
from ccmoe_runtime.devices import get_profile  # noqa: E402
from ccmoe_runtime.engine.build import find_engine  # noqa: E402
from ccmoe_runtime.engine.server import LlamaServer, ServerConfig, free_port  # noqa: E402
from ccmoe_runtime.engine.tools import quantize  # noqa: E402
from ccmoe_runtime.model.inventory import read_gguf, summarize  # noqa: E402
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf  # noqa: E402
from ccmoe_runtime.placement.costmodel import load_factors, predict, tensor_loads  # noqa: E402
from ccmoe_runtime.placement.rules import rule_matches  # noqa: E402

CTX = 4096
FRACTION_MIN_S = 180       # a fraction (compress + three contenders) is started only with this much time left
MIB = 1024**2
T0 = time.monotonic()
SPECS = {
    "gpu": SynthSpec(arch="deepseek2", name="ds2-21b", n_embd=2048, n_layer=37, n_dense_lead=1, n_head=16,
                     n_expert=64, n_expert_used=6, n_ff_exp=1408, n_ff=10944, n_expert_shared=2, q_lora_rank=768,
                     kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, seed=21),
    "cpu": SynthSpec(arch="deepseek2", name="ds2-small", n_embd=512, n_layer=6, n_dense_lead=1, n_head=8,
                     n_expert=16, n_expert_used=4, n_ff_exp=256, n_ff=1024, n_expert_shared=1, q_lora_rank=128,
                     kv_lora_rank=128, qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64, seed=21),
}
PROMPT = ("The committee met on a grey morning to weigh the budget, the roads, the harbour and the schools, and every "
          "member had a list of numbers to read aloud before lunch. ")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:.0f}s] {msg}", flush=True)


def cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """`ccmoe-run ARGS` in a child (the user's path), its output kept."""
    say("ccmoe-run " + " ".join(args))
    r = subprocess.run([sys.executable, "-m", "ccmoe_runtime.cli", *args], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"ccmoe-run {args[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def has_option(command: str, option: str) -> bool:
    """Whether this ccmoe-run's `command` takes `option` (its --help)."""
    r = subprocess.run([sys.executable, "-m", "ccmoe_runtime.cli", command, "--help"], capture_output=True, text=True)
    return option in r.stdout


def paths(work: Path, size: str) -> dict[str, Path]:
    name = SPECS[size].name
    return {"source": work / f"{name}-q8_0.gguf", "q4km": work / f"{name}-Q4_K_M.gguf", "calib": work / "calib.txt",
            "first": work / f"ccmoe-{name}.gguf"}


def out_path(work: Path, size: str, fraction: float) -> Path:
    return work / f"ccmoe-{SPECS[size].name}-{round(fraction * 100)}.gguf"


def work_of(out: Path) -> Path:
    """compress's work folder beside OUT (its measurements and stage log)."""
    return out.with_name(out.name.removesuffix(".gguf") + ".ccmoe")


def generate(work: Path, size: str) -> dict[str, Path]:
    """The Q8_0 source (random weights, written directly as Q8_0 blocks), once."""
    p = paths(work, size)
    work.mkdir(parents=True, exist_ok=True)
    if not p["source"].is_file():
        say(f"generating {p['source'].name}")
        write_random_gguf(SPECS[size], p["source"], force=True, qtype="q8_0")
        say(f"generated {p['source'].stat().st_size / 1e9:.2f} GB")
    return p


def prepare(work: Path, size: str, engine) -> dict:
    """The Q8_0 source, llama-quantize's Q4_K_M of it, and the source's measurements: compress's own measuring
    stages (--stop-after impact) in a work folder that each fraction's compress starts from (done once)."""
    p = generate(work, size)
    if not p["q4km"].is_file():
        say("llama-quantize Q4_K_M")
        quantize(engine, p["source"], p["q4km"], "Q4_K_M", [], flags=("--allow-requantize",))
    if not p["calib"].is_file():
        p["calib"].write_text((PROMPT * 400) + "\n")
    if not (work_of(p["first"]) / f"{p['source'].stem}.sensitivity.json").is_file():
        cli("compress", str(p["source"]), "--device", "auto", "-o", str(p["first"]), "--ctx", str(CTX), "--calib",
            str(p["calib"]), "--no-impact", "--stop-after", "impact")
    inv = read_gguf(p["q4km"])
    return {"source_bytes": p["source"].stat().st_size, "q4km_bytes": p["q4km"].stat().st_size,
            "params": sum(t.n_elements for t in inv.tensors), "q4km_kld": q4km_kld(p)}


def q4km_kld(p: dict[str, Path]) -> float:
    """The Q4_K_M's predicted KLD with the planner's quality model (measured errors x impact or class priors)."""
    m = load_measurements(work_of(p["first"]), p["source"])
    weights = tensor_weights(m.sensitivity, m.impact)
    types = {t.name: t.ggml_type.lower() for t in read_gguf(p["q4km"]).tensors}
    total = 0.0
    for name, t in m.sensitivity["tensors"].items():
        errors = {k.lower(): v for k, v in t["error"].items()}
        total += errors.get(types.get(name, ""), 0.0) * weights[name]
    return total


class Hold:
    """GPU memory held so that `free_mib` stays free (benchmarks/gpu_hold.py in a child), released on exit."""

    def __init__(self, free_mib: int | None):
        self.free_mib, self.proc, self.info = free_mib, None, {}

    def __enter__(self):
        if self.free_mib is None:
            return self
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_hold.py"), "--free-mib",
                                      str(self.free_mib)], stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())
        say(f"GPU held: {self.info}")
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def fit_where(engine, model: Path, loads) -> tuple[dict[str, str], str]:
    """The placement llama-server's --fit chooses (llama-fit-params' printed arguments) as tensor -> pool."""
    exe = engine.tool("llama-fit-params")
    out = subprocess.run([str(exe), "-m", str(model), "-c", str(CTX)], capture_output=True, text=True, timeout=600)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    rules = line.split('-ot "', 1)[1].rstrip('"').split(",") if '-ot "' in line else []
    cpu = rule_matches([r for r in rules if r.endswith("=CPU")], [ld.name for ld in loads])
    return {ld.name: "cpu" if ld.name in cpu or ld.name.startswith("token_embd.") else "gpu" for ld in loads}, line


def ncmoe_where(loads, n: int) -> dict[str, str]:
    return {ld.name: "cpu" if (ld.cls == "routed_expert" and ld.layer is not None and ld.layer < n)
            or ld.name.startswith("token_embd.") else "gpu" for ld in loads}


def predicted(model: Path, where: dict[str, str], device, n_prompt: int) -> dict:
    inv = read_gguf(model)
    p = predict(tensor_loads(inv), where, device, load_factors(device), summarize(inv).n_layers, 0.0, 0, n_prompt,
                512, "gpu" if device.backend != "cpu" else "cpu")
    return {"decode_tps": p.decode_tps, "prompt_tps": round(p.prompt_tps, 1)}


def best_ncmoe(engine, model: Path, start: int, n_moe: int, gpu: bool) -> tuple[int, list]:
    """The fewest layers of experts on the CPU that load and run (llama-bench), from `start` down."""
    if not gpu:
        return 0, []
    tried, best = [], None
    n = start
    while 0 <= n <= n_moe:
        r = subprocess.run([str(engine.tool("llama-bench")), "-m", str(model), "-ngl", "999", "-ncmoe", str(n),
                            "-p", "0", "-n", "8", "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=300)
        ok = r.returncode == 0
        tried.append({"n_cpu_moe": n, "ok": ok})
        say(f"--n-cpu-moe {n}: {'runs' if ok else 'fails'}")
        if ok:
            best = n
            n -= 1
        elif best is None:
            n += 1
        else:
            break
    return (best if best is not None else n_moe), tried


LOAD = {"gpu": (18, 128), "cpu": (3, 32)}     # prompt repetitions of PROMPT, tokens generated per request
SIZE = ["gpu"]


def measure_server(base_url: str, requests: int, tag: int) -> list[dict]:
    """One warm-up and `requests` completions with distinct prompts (GPU size: ~2,500 characters) and the prompt
    cache off: llama-server's own timings."""
    reps, n_predict = LOAD[SIZE[0]]
    out = []
    for i in range(requests + 1):
        body = {"prompt": f"Request {tag}-{i}. " + PROMPT * reps, "n_predict": n_predict if i else 8,
                "cache_prompt": False, "ignore_eos": True, "temperature": 0}
        req = urllib.request.Request(base_url + "/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            t = json.loads(r.read())["timings"]
        if i:
            out.append({k: t[k] for k in ("prompt_n", "prompt_per_second", "predicted_n", "predicted_per_second")})
    return out


def run_llama_server(engine, model: Path, args: list[str], requests: int, tag: int) -> dict:
    started = time.monotonic()
    with LlamaServer(engine, ServerConfig(model=model, port=free_port(), ctx=CTX, extra_args=args)) as s:
        ready = time.monotonic() - started
        return {"ready_s": round(ready, 2), "requests": measure_server(s.base_url, requests, tag)}


def run_ccmoe(model: Path, requests: int, tag: int, device: str) -> dict:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ccmoe_runtime.cli", "serve", "--model", str(model), "--device",
                             device, "--ctx", str(CTX), "--port", str(free_port()), "--json", "--no-warmup"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ccmoe-run serve failed: {proc.stderr.read()[-2000:]}")
        ready = json.loads(line)
        out = {"ready_s": round(time.monotonic() - started, 2), "start_cache": ready.get("start_cache"),
               "placed_s": ready.get("placed_s"), "overrides": ready["overrides"], "kv_type": ready["kv_type"],
               "predicted": {"decode_tps": ready["predicted_generation_tokens_per_s"],
                             "prompt_tps": ready["predicted_prompt_tokens_per_s"]},
               "requests": measure_server(ready["base_url"].removesuffix("/v1"), requests, tag)}
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def medians(rounds: list[dict]) -> dict:
    reqs = [r for rd in rounds for r in rd["requests"]]
    return {"decode_tps": round(statistics.median(r["predicted_per_second"] for r in reqs), 2),
            "prompt_tps": round(statistics.median(r["prompt_per_second"] for r in reqs), 1),
            "prompt_n": reqs[0]["prompt_n"], "n": len(reqs),
            "decode_range": [round(min(r["predicted_per_second"] for r in reqs), 2),
                             round(max(r["predicted_per_second"] for r in reqs), 2)]}


def bench_fraction(engine, work: Path, size: str, fraction: float, base: dict, rounds: int, requests: int,
                   deadline: float) -> dict:
    """Hold the card at `fraction` of the Q4_K_M, compress for it, and run the three contenders in turn."""
    p = paths(work, size)
    gpu = size == "gpu"
    free_mib = int(fraction * base["q4km_bytes"] / MIB)
    out = out_path(work, size, fraction)
    res: dict = {"fraction": fraction, "free_mib": free_mib if gpu else None, "skipped": []}
    if not work_of(out).is_dir():                 # measured once (prepare): compress resumes from those stages
        shutil.copytree(work_of(p["first"]), work_of(out))
    with Hold(free_mib if gpu else None) as hold:
        res["hold"] = hold.info
        budget = [] if gpu else ["--budget-gb", f"{fraction * base['q4km_bytes'] / 1e9:.3f}"]
        target = ["--max-kld", f"{base['q4km_kld'] * 1.0001:.6g}"] if has_option("compress", "--max-kld") else []
        res["compress_target"] = target or "plan (this ccmoe-run's compress has no --max-kld)"
        if not out.is_file():
            r = cli("compress", str(p["source"]), "--device", "auto", "-o", str(out), "--ctx", str(CTX), *target,
                    "--calib", str(p["calib"]), "--no-impact", "--json", *budget)   # no --force: it measures again
            doc = json.loads(r.stdout)
            (work / f"{out.stem}.compress.json").write_text(json.dumps(doc))
        doc = json.loads((work / f"{out.stem}.compress.json").read_text())
        fr = doc.get("frontier") or {}
        point = (fr.get("points") or [{}])[fr.get("chosen", 0)] if fr.get("points") else {}
        res["ccmoe_file_bytes"] = out.stat().st_size
        res["ccmoe_predicted_kld"] = point.get("kld", (doc.get("plan") or {}).get("total_error"))
        res["ccmoe_point"] = {k: point.get(k) for k in ("decode_tps", "bytes", "kld")} if point else None
        res["q4km_predicted_kld"] = base["q4km_kld"]
        device = get_profile("auto")
        loads = tensor_loads(read_gguf(p["q4km"]))
        fit, fit_line = fit_where(engine, p["q4km"], loads) if gpu else ({ld.name: "cpu" for ld in loads}, "")
        n_moe = len(summarize(read_gguf(p["q4km"])).moe_layers)
        start = len({ld.layer for ld in loads if ld.cls == "routed_expert" and fit.get(ld.name) == "cpu"})
        n_best, tried = best_ncmoe(engine, p["q4km"], start, n_moe + SPECS[size].n_dense_lead, gpu)
        res["fit_args"], res["ncmoe_tried"], res["n_cpu_moe"] = fit_line, tried, n_best
        n_prompt = 512
        res["predicted"] = {"fit": predicted(p["q4km"], fit, device, n_prompt),
                            "ncmoe": predicted(p["q4km"], ncmoe_where(loads, n_best) if gpu else fit, device,
                                               n_prompt)}
        contenders = {"fit": lambda tag: run_llama_server(engine, p["q4km"], [], requests, tag),
                      "ncmoe": lambda tag: run_llama_server(engine, p["q4km"], ["-ngl", "999", "--n-cpu-moe",
                                                                              str(n_best)], requests, tag),
                      "ccmoe": lambda tag: run_ccmoe(out, requests, tag, "auto")}
        runs: dict[str, list] = {k: [] for k in contenders}
        order = list(contenders)
        for rd in range(rounds):
            for name in order[rd % len(order):] + order[:rd % len(order)]:
                if time.monotonic() > deadline:
                    res["skipped"].append(f"round {rd + 1} {name}: past the deadline")
                    continue
                say(f"round {rd + 1}: {name}")
                runs[name].append(contenders[name](rd * 10 + len(runs[name])))
        res["runs"] = runs
        res["measured"] = {k: medians(v) for k, v in runs.items() if v}
        if runs["ccmoe"]:
            res["predicted"]["ccmoe"] = runs["ccmoe"][0]["predicted"]
    return res


def report(doc: dict) -> str:
    lines = [f"source {doc['base']['params'] / 1e9:.1f}B params, Q8_0 {doc['base']['source_bytes'] / 1e9:.2f} GB; "
             f"Q4_K_M {doc['base']['q4km_bytes'] / 1e9:.2f} GB, predicted KLD {doc['base']['q4km_kld']:.4g}", ""]
    for r in doc["fractions"]:
        m, pr = r.get("measured", {}), r.get("predicted", {})
        lines += [f"card {r['fraction']:.0%} of the Q4_K_M ({r['free_mib']} MiB free); ccmoe file "
                  f"{r['ccmoe_file_bytes'] / 1e9:.2f} GB, predicted KLD {r['ccmoe_predicted_kld']}; "
                  f"--n-cpu-moe {r['n_cpu_moe']}", "",
                  "| contender | decode tok/s (range) | prompt tok/s | predicted decode (error) | predicted prompt |",
                  "|---|---|---|---|---|"]
        for k in ("fit", "ncmoe", "ccmoe"):
            if k not in m:
                continue
            d, p = m[k], pr.get(k, {})
            err = f"{100 * (p['decode_tps'] / d['decode_tps'] - 1):+.0f}%" if p else ""
            lines.append(f"| {k} | {d['decode_tps']} ({d['decode_range'][0]}-{d['decode_range'][1]}) | "
                         f"{d['prompt_tps']} | {p.get('decode_tps')} ({err}) | {p.get('prompt_tps')} |")
        if "fit" in m and "ccmoe" in m:
            lines.append(f"\nccmoe / fit decode {m['ccmoe']['decode_tps'] / m['fit']['decode_tps']:.2f}x; ccmoe / "
                         f"best --n-cpu-moe {m['ccmoe']['decode_tps'] / m.get('ncmoe', m['fit'])['decode_tps']:.2f}x")
        lines += [f"skipped: {s}" for s in r["skipped"]] + [""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["generate", "prepare", "bench", "all"])
    ap.add_argument("--size", choices=list(SPECS), default="gpu")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fractions", default="0.6,0.8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=3600.0)
    a = ap.parse_args()
    deadline = T0 + a.deadline_s
    SIZE[0] = a.size
    if a.phase == "generate":                    # the source alone (no engine needed: runs beside its build)
        generate(a.work, a.size)
        return 0
    engine = find_engine("cuda" if a.size == "gpu" else None)
    base = prepare(a.work, a.size, engine)
    say(f"prepared: {base}")
    if a.phase == "prepare":
        (a.work / "base.json").write_text(json.dumps(base))
        return 0
    doc = {"size": a.size, "base": base, "fractions": []}
    out = a.out or a.work
    out.mkdir(parents=True, exist_ok=True)
    for fr in (float(x) for x in a.fractions.split(",")):
        if time.monotonic() > deadline - (FRACTION_MIN_S if a.size == "gpu" else 0):
            doc["fractions"].append({"fraction": fr, "skipped": ["not started: too close to the deadline"]})
            continue
        doc["fractions"].append(bench_fraction(engine, a.work, a.size, fr, base, a.rounds, a.requests, deadline))
        (out / "gpu_joint.json").write_text(json.dumps(doc, indent=1))
    (out / "gpu_joint.json").write_text(json.dumps(doc, indent=1))
    text = report({**doc, "fractions": [r for r in doc["fractions"] if "measured" in r]})
    (out / "gpu_joint.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
