"""Real-size rehearsal of `compress`: a generated deepseek2 model with DeepSeek-V3's real tensor widths (7168 hidden,
2048 expert FFN, 256 experts, V3's MLA dims, 129280 vocabulary) but 1 dense + 1 MoE layer (~14B parameters,
Q8_0 ~15 GB), compressed stage by stage; per stage the wall time and peak RSS, and the extrapolation to
DeepSeek-V3 pruned to 192 experts (61 layers) on a 16-core, 128 GB machine.

Usage: python benchmarks/rehearsal.py --work DIR [--size full|test] [--threads N] [--imatrix-chunks N]
                                     [--last STAGE] [--serve-device NAME] [--scale-threads 2,4,8,16] [--keep]
                                     [--json OUT]
       python benchmarks/rehearsal.py --work DIR --report OUT.json   # the table of a saved run again

Each stage runs as its own `ccmoe-run compress ... --stop-after STAGE` process (the next one resumes), so its
peak RSS is that process's (wait4). The budget gives the rehearsal model the bits per weight the 192-expert
DeepSeek-V3 gets on a Strix Halo (128 GB). `--size test` is a small model with the same layer structure (seconds;
tests/test_rehearsal.py). After the build, `ccmoe-run serve` starts on the output (--serve-device, default auto;
--serve-device none skips it): seconds until ready, its warm-up's and one OpenAI chat request's tokens/s, the
server's RSS; then it is stopped. --scale-threads then times llama-imatrix (2 chunks) and the build's llama-quantize
(this run's types) at each thread count on a smaller model of the same widths (8 experts, at most 16384 tokens of
vocabulary): how the two stages that need cores scale on this machine. The generated model and outputs are
deleted unless --keep. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from ccmoe_runtime.bench.serving import chat_timings
from ccmoe_runtime.compress.checks import smallest_plan_bytes
from ccmoe_runtime.compress.plan import device_budget
from ccmoe_runtime.compress.quantize import BASE_TYPE
from ccmoe_runtime.compress.sensitivity import prior_sensitivity
from ccmoe_runtime.core.units import GB
from ccmoe_runtime.engine.build import find_engine
from ccmoe_runtime.engine.server import free_port
from ccmoe_runtime.engine.tools import quantize
from ccmoe_runtime.compress.stages import STAGES
from ccmoe_runtime.compress.stats import model_reads
from ccmoe_runtime.devices import get_profile
from ccmoe_runtime.model.inventory import read_gguf, summarize
from ccmoe_runtime.model.synth import SynthSpec, builtin_inventory, deepseek_v3_spec, write_random_gguf
from ccmoe_runtime.testmodels.corpus import ensure_corpus

DEVICE = "strixhalo-128g"
TARGET = "deepseek-v3-pruned192"
TARGET_CORES, TARGET_RAM, TARGET_DISK_BPS = 16, 128 * 2**30, 5e9   # the machine the job is for (2 TB NVMe)


def rehearsal_spec(size: str) -> SynthSpec:
    """V3's widths with 1 dense + 1 MoE layer, or (test) a small model of the same structure."""
    if size == "full":
        return replace(deepseek_v3_spec(256), name="DeepSeek-V3 widths, 2 layers", n_layer=2, n_dense_lead=1,
                       ctx=4096)
    return SynthSpec(arch="deepseek2", name="rehearsal-test", n_layer=2, n_dense_lead=1, n_embd=256, n_expert=16,
                     n_expert_used=4, n_ff_exp=256, n_ff=512, seed=4)


def rehearsal_budget(inv) -> tuple[float, float]:
    """A budget (GB) at the same place between the rehearsal model's smallest and largest plan as DSV3-192's
    Strix Halo budget is between its own; and that share."""
    engine = find_engine()
    device = get_profile(DEVICE)
    excluded = tuple(t.lower() for t in device.unsupported_types + device.slow_types)
    target = builtin_inventory(TARGET)
    low_t, high_t = smallest_plan_bytes(target, prior_sensitivity(engine, target), excluded)
    share = (device_budget(target, device, 8192, 1).weights_bytes - low_t) / (high_t - low_t)
    low, high = smallest_plan_bytes(inv, prior_sensitivity(engine, inv), excluded)
    return (low + share * (high - low)) / GB, share


def run_stage(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes, of the process and the tools it ran) and exit code of one stage."""
    started = time.monotonic()
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.monotonic() - started, usage.ru_maxrss * 1024, proc.returncode


def imatrix_cmd(engine, model: Path, calib: Path, out: Path, chunks: int, threads: int) -> list[str]:
    """llama-imatrix over `chunks` chunks of 512 tokens of `calib`, one per batch."""
    return [str(engine.tool("llama-imatrix")), "-m", str(model), "-f", str(calib), "-o", str(out), "-c", "512",
            "--chunks", str(chunks), "-t", str(threads)]


def serve_output(out: Path, device: str, log: Path) -> dict:
    """`ccmoe-run serve` on the compressed model: seconds until ready, the warm-up's and one OpenAI chat request's
    tokens/s (llama-server's own timings) and the server's RSS; the server is stopped before this returns."""
    port = free_port()
    cmd = [sys.executable, "-m", "ccmoe_runtime.cli", "serve", "--model", str(out), "--device", device,
           "--port", str(port), "--json"]
    started = time.monotonic()
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()           # the ready message, one line
        if not line:
            raise RuntimeError(f"ccmoe-run serve exited {proc.wait()} before it was ready; see {log}")
        ready_s, ready = time.monotonic() - started, json.loads(line)
        timings = chat_timings(f"http://127.0.0.1:{port}", timeout=600)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    return {"ready_s": round(ready_s, 1), "server_rss_bytes": ready.get("server_rss_bytes"),
            "warmup_generation_tokens_per_s": ready.get("generation_tokens_per_s"),
            "warmup_prompt_tokens_per_s": ready.get("prompt_tokens_per_s"),
            "predicted_generation_tokens_per_s": ready.get("predicted_generation_tokens_per_s"),
            "chat_generation_tokens_per_s": round(timings["predicted_per_second"], 2),
            "chat_prompt_tokens_per_s": round(timings["prompt_per_second"], 2),
            "chat_prompt_tokens": timings.get("prompt_n"), "chat_generated_tokens": timings.get("predicted_n")}


def scaling_spec(size: str) -> SynthSpec:
    """The rehearsal model's widths with 8 experts and at most 16384 tokens: the thread-scaling runs' model."""
    s = rehearsal_spec(size)
    return replace(s, name=s.name + ", 8 experts", n_expert=8, n_expert_used=min(s.n_expert_used, 8),
                   vocab_size=min(s.vocab_size, 16384))


def thread_scaling(work: Path, size: str, types_file: Path, calib: Path, threads: list[int], log: Path) -> dict:
    """llama-imatrix (2 chunks of 512) and llama-quantize with the rehearsal plan's types at each thread count, on
    `scaling_spec`'s model: seconds, and the speed-up over the fewest threads."""
    model, out = work / f"scaling-{size}-q8_0.gguf", work / "scaling-out.gguf"
    if not model.is_file():
        write_random_gguf(scaling_spec(size), model, qtype="q8_0")
    engine, lines = find_engine(), types_file.read_text().split()
    params, rows = summarize(read_gguf(model)).total_params, {}
    for t in threads:
        imatrix = work / f"scaling-{t}.imatrix.gguf"
        imatrix_s, _, code = run_stage(imatrix_cmd(engine, model, calib, imatrix, 2, t), log)
        if code != 0:
            raise RuntimeError(f"llama-imatrix exited {code}; see {log}")
        started = time.monotonic()
        quantize(engine, model, out, BASE_TYPE, lines, imatrix, threads=t, flags=("--allow-requantize",))
        rows[t] = {"imatrix_s": round(imatrix_s, 2), "build_s": round(time.monotonic() - started, 2)}
        imatrix.unlink()
    first = rows[min(rows)]
    for row in rows.values():
        row["imatrix_speedup"] = round(first["imatrix_s"] / row["imatrix_s"], 2)
        row["build_speedup"] = round(first["build_s"] / row["build_s"], 2)
    out.unlink(missing_ok=True)
    model.unlink()
    return {"params": params, "threads": rows}


def scale_factors(model_inv, threads: int) -> dict[str, float]:
    """How each stage's cost grows from the rehearsal model to the target on the target machine."""
    target = builtin_inventory(TARGET)
    s, t = summarize(model_inv), summarize(target)
    cores = max(threads, 1) / TARGET_CORES
    moe = len(t.moe_layers) / max(len(s.moe_layers), 1)
    n_tensors_t = sum(1 for x in target.tensors if len(x.shape) >= 2)
    n_tensors_s = sum(1 for x in model_inv.tensors if len(x.shape) >= 2)
    return {
        # tokens x active parameters per token (the imatrix is a forward pass over the calibration text)
        "statistics": t.active_params / s.active_params * cores,
        # bounded samples per tensor: grows with the tensor count only
        "sensitivity": n_tensors_t / n_tensors_s * cores,
        "impact": 1.0, "plan": n_tensors_t / n_tensors_s,
        # llama-quantize reads and requantizes every weight: grows with the parameter count
        "build": t.total_params / s.total_params * cores,
        "moe_layers": moe,
    }


def streamed_imatrix_seconds(target_file_bytes: int, chunks: int = 64) -> float:
    """The target's imatrix reads of a model larger than its RAM: one per batch of chunks, at the disk's speed."""
    if target_file_bytes <= TARGET_RAM:
        return 0.0
    return model_reads(target_file_bytes, TARGET_RAM, chunks) * target_file_bytes / TARGET_DISK_BPS


def print_report(result: dict) -> float:
    """Print the Markdown table of a rehearsal's numbers (a run's or a saved --json's); returns the total seconds."""
    factors, stream_s = result["factors"], streamed_imatrix_seconds(result["target_file_bytes"])
    total = 0.0
    print(f"| stage | rehearsal ({result['params'] / 1e9:.1f}B params, {result['threads']} threads) | peak RSS "
          f"| DSV3-192 on {TARGET_CORES} cores (extrapolated) |")
    print("|---|---|---|---|")
    for stage, row in result["stages"].items():
        seconds, rss = row["seconds"], row["peak_rss_bytes"]
        est = seconds * factors.get(stage, 1.0)
        if stage in ("statistics", "llama-imatrix") and not (stage == "statistics" and result["imatrix_chunks"]):
            est = max(est, stream_s)
        if stage != "check":
            total += est
        print(f"| {stage} | {seconds:.1f} s | {rss / 2**30:.2f} GiB | {est / 3600:.2f} h |")
    print(f"| total | | | {total / 3600:.2f} h |")
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--size", choices=("full", "test"), default="full")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--keep", action="store_true", help="Keep the generated model and the outputs.")
    p.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    p.add_argument("--imatrix-chunks", type=int, default=0,
                   help="Time llama-imatrix on this many 512-token chunks alone (scaled to compress's 64) and give "
                        "compress its output, instead of compress running it on 64.")
    p.add_argument("--last", choices=STAGES, default="build", help="The last stage to run (e.g. plan: no build).")
    p.add_argument("--report", type=Path, default=None, help="Print the table of a saved --json and exit.")
    p.add_argument("--serve-device", default="auto", help="Device profile to serve the output with; none: no serve.")
    p.add_argument("--scale-threads", type=lambda v: sorted({int(x) for x in v.split(",")}), default=[],
                   help="Comma-separated thread counts for the scaling runs (none by default).")
    a = p.parse_args(argv)
    if a.report:
        print_report(json.loads(a.report.read_text()))
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / f"rehearsal-{a.size}-q8_0.gguf"
    spec = rehearsal_spec(a.size)
    started = time.monotonic()
    if not model.is_file():
        write_random_gguf(spec, model, qtype="q8_0")
    generate_s = time.monotonic() - started
    inv = read_gguf(model)
    budget_gb, share = rehearsal_budget(inv)
    out = a.work / "out.gguf"
    calib = ensure_corpus().train
    base = [sys.executable, "-m", "ccmoe_runtime.cli", "compress", str(model), "--device", DEVICE, "--budget-gb",
            f"{budget_gb:.4f}", "-o", str(out), "--calib", str(calib), "-t", str(a.threads), "--no-impact"]
    log = a.work / "rehearsal.log"
    rows = {}
    check_s, check_rss, code = run_stage(base + ["--check"], log)
    rows["check"] = (check_s, check_rss)
    chunk_scale = 1.0
    if a.imatrix_chunks:       # llama-imatrix on fewer chunks, timed alone; compress then takes its output
        imatrix = a.work / "rehearsal.imatrix.gguf"
        seconds, rss, code = run_stage(imatrix_cmd(find_engine(), model, calib, imatrix, a.imatrix_chunks, a.threads),
                                       log)
        if code != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            return code
        rows["llama-imatrix"] = (seconds, rss)
        chunk_scale = 64 / a.imatrix_chunks
        base += ["--imatrix", str(imatrix)]
    for stage in STAGES[:STAGES.index(a.last) + 1]:
        cmd = base + (["--stop-after", stage] if stage != "build" else [])
        seconds, rss, code = run_stage(cmd, log)
        if code != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            return code
        rows[stage] = (seconds, rss)
        if a.json:              # after every stage: a run stopped midway keeps what it measured
            a.json.write_text(json.dumps({"stages": {k: {"seconds": s, "peak_rss_bytes": r}
                                                     for k, (s, r) in rows.items()}}, indent=1) + "\n")
    factors = scale_factors(inv, a.threads)
    factors["llama-imatrix"] = factors["statistics"] * chunk_scale
    if a.imatrix_chunks:
        factors["statistics"] = 1.0       # compress only copies the given imatrix
    target = builtin_inventory(TARGET)
    result = {"model": str(model), "params": summarize(inv).total_params, "file_bytes": inv.file_bytes,
              "budget_gb": budget_gb, "budget_share": share, "threads": a.threads, "generate_s": generate_s,
              "stages": {k: {"seconds": s, "peak_rss_bytes": r} for k, (s, r) in rows.items()},
              "factors": factors, "target": TARGET, "target_file_bytes": target.file_bytes,
              "out_bytes": out.stat().st_size if out.is_file() else None, "imatrix_chunks": a.imatrix_chunks}
    result["extrapolated_total_s"] = print_report(result)
    if a.last == "build" and a.serve_device != "none":
        result["serve"] = serve_output(out, a.serve_device, log)
        if a.json:              # before the scaling runs: a run stopped there keeps what it measured
            a.json.write_text(json.dumps(result, indent=1) + "\n")
        print("serve: " + ", ".join(f"{k} {v}" for k, v in result["serve"].items()))
    if a.scale_threads and a.last == "build":
        result["scaling"] = thread_scaling(a.work, a.size, out.with_suffix(".types.txt"), calib, a.scale_threads, log)
        print(f"threads on {result['scaling']['params'] / 1e9:.2f}B params: " + "; ".join(
            f"{t}: imatrix {r['imatrix_s']} s ({r['imatrix_speedup']}x), build {r['build_s']} s ({r['build_speedup']}x)"
            for t, r in result["scaling"]["threads"].items()))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    if not a.keep:
        model.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        (a.work / "rehearsal.imatrix.gguf").unlink(missing_ok=True)
        shutil.rmtree(a.work / "out.ccmoe", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
