"""`ccmoe-run calibrate`: measure the cost model's factors on this host with llama-bench on generated models.

Two tiny models (2 and 12 layers) give the fixed and per-layer cost of a token; on a GPU host two more, as wide as
real MoE models (2048) but with few small experts, give the per-layer cost of wide layers (kernels on wide layers
take longer, and without them that time would be charged to the medium models' bandwidth). One medium model per
weight type gives the decode efficiency of each pool and the prompt throughput; on a GPU host the same models with
`-ot exps=CPU` give the cost of a CPU<->GPU split, the CPU pool's efficiency and the link's copy rate.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import EXIT_ENGINE, CcmoeError
from ..core.files import check_writable
from ..core.units import MIB
from ..devices.detect import environment_threads, last_level_cache_bytes, read_nvidia_smi
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from ..engine.tools import fit_print, llama_bench, quantize, run_tool
from ..model.inventory import read_gguf, summarize
from ..model.synth import SYNTH_TYPES, SynthSpec, block_shape, write_random_gguf
from .costmodel import (
    NARROW_WIDTH,
    WIDE_WIDTH,
    Factors,
    TensorLoad,
    calibration_path,
    default_factors,
    main_pool,
    model_width,
    pool_bandwidth,
    predict,
    save_calibration,
    tensor_loads,
)

TINY_LAYERS = (2, 12)
N_PROMPT, N_GEN = 512, 64
# Types calibrated from a generated Q8_0 model requantized by llama-quantize (`--pure`: every weight in the type),
# by the file type that produces them. Those llama-quantize makes only with an imatrix get a flat one
# (`write_flat_imatrix`): random weights have no important columns, and only their speed is measured.
QUANTIZED_TYPES = {"q2_k": "Q2_K", "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K",
                   "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "iq3_s": "IQ3_S", "iq4_nl": "IQ4_NL",
                   "iq4_xs": "IQ4_XS", "iq1_s": "IQ1_S", "iq1_m": "IQ1_M", "iq2_xxs": "IQ2_XXS", "iq2_xs": "IQ2_XS",
                   "iq2_s": "IQ2_S", "iq3_xxs": "IQ3_XXS"}
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs")


@dataclass
class CalModel:
    """A generated model used for calibration and what the cost model knows of it."""

    role: str                        # tiny2, tiny12, medium-q8_0 ...
    path: Path
    qtype: str
    loads: list[TensorLoad]
    n_layers: int
    n_moe_layers: int


def tiny_spec(n_layer: int) -> SynthSpec:
    return SynthSpec(arch="qwen3moe", name=f"cal-tiny{n_layer}", n_embd=NARROW_WIDTH, n_layer=n_layer, n_head=4,
                     n_head_kv=2, head_dim=64, n_expert=16, n_expert_used=4, n_ff_exp=256, seed=11)


def wide_spec(n_layer: int) -> SynthSpec:
    """As wide as real MoE models, with few small experts: about 18 MB per layer in Q8_0."""
    return SynthSpec(arch="qwen3moe", name=f"cal-wide{n_layer}", n_embd=WIDE_WIDTH, n_layer=n_layer, n_head=16,
                     n_head_kv=4, head_dim=128, n_expert=8, n_expert_used=4, n_ff_exp=128, seed=13)


def medium_spec(size_mb: int, qtype: str, wide: bool) -> SynthSpec:
    """A qwen3moe of about `size_mb` MB in `qtype` (wider layers on GPU hosts)."""
    n_embd, n_ff = (2048, 1024) if wide else (1024, 512)
    per_layer = (3 * n_embd * n_ff * 32 + 2 * n_embd * 2048 + 2 * n_embd * 512) * bytes_per_weight(qtype)
    layers = max(2, round(size_mb * 1e6 / per_layer))
    return SynthSpec(arch="qwen3moe", name=f"cal-medium-{qtype}", n_embd=n_embd, n_layer=layers, n_head=16,
                     n_head_kv=4, head_dim=128, n_expert=32, n_expert_used=4, n_ff_exp=n_ff, seed=12)


CACHE_MULTIPLE = 4          # a CPU host's medium models are this many times its last-level cache


def default_size_mb(main: str, llc_bytes: int | None) -> int:
    """Medium-model size: 1500 MB on GPU hosts; on CPU hosts 200 MB or CACHE_MULTIPLE x the last-level cache if
    larger (a model that fits a 300 MiB L3 decodes from the cache, not from RAM, and overstates bandwidth 2-3x)."""
    if main == "gpu":
        return 1500
    return max(200, round(CACHE_MULTIPLE * (llc_bytes or 0) / 1e6))


def bytes_per_weight(qtype: str) -> float:
    """Bytes a weight of `qtype` takes (ggml's block size and bytes per block)."""
    block, size = block_shape(qtype)
    return size / block


def make_models(folder: Path, size_mb: int, types: list[str], wide: bool, engine: Engine | None = None
                ) -> list[CalModel]:
    """Generate the calibration models (Q8_0 tiny ones, one medium one per type; QUANTIZED_TYPES through
    llama-quantize from a Q8_0 model of as many weights)."""
    out = []
    specs = [(f"tiny{n}", tiny_spec(n), "q8_0") for n in TINY_LAYERS]
    if wide:
        specs += [(f"wide{n}", wide_spec(n), "q8_0") for n in TINY_LAYERS]
    specs += [(f"medium-{t}", medium_spec(size_mb, t, wide), t) for t in types]
    for role, spec, qtype in specs:
        path = folder / f"{spec.name}.gguf"
        if qtype in QUANTIZED_TYPES:
            path = requantized(engine, write_random_gguf(spec, folder / f"{spec.name}-q8_0.gguf", force=True,
                                                         qtype="q8_0"), path, qtype)
        else:
            path = write_random_gguf(spec, path, force=True, qtype=qtype)
        inv = read_gguf(path)
        s = summarize(inv)
        out.append(CalModel(role, path, qtype, tensor_loads(inv), s.n_layers, len(s.moe_layers)))
    return out


def requantized(engine: Engine | None, source: Path, out: Path, qtype: str) -> Path:
    """`source` (Q8_0) with every weight requantized to `qtype` by llama-quantize; the source is removed."""

    if engine is None:
        raise CcmoeError(f"calibrating {qtype} needs llama-quantize", "pass the engine to make_models")
    imatrix = write_flat_imatrix(source, source.with_suffix(".imatrix.gguf")) if qtype in NEEDS_IMATRIX else None
    try:
        return quantize(engine, source, out, QUANTIZED_TYPES[qtype], [], imatrix=imatrix,
                        flags=("--allow-requantize", "--pure"))
    finally:
        source.unlink(missing_ok=True)
        if imatrix:
            imatrix.unlink(missing_ok=True)


def write_flat_imatrix(model: Path, out: Path) -> Path:
    """A GGUF imatrix in llama-imatrix's format that weighs every column of every weight matrix alike (one call,
    every expert counted once): what lets llama-quantize make IQ1/IQ2 types of a random calibration model."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(out), "imatrix")
    w.add_array("imatrix.datasets", ["ccmoe-calibrate (flat)"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", N_PROMPT)
    for t in gguf.GGUFReader(str(model)).tensors:
        shape = [int(x) for x in t.shape]              # ggml order: columns first
        if len(shape) < 2 or not t.name.endswith(".weight"):
            continue
        n_mat = shape[2] if len(shape) == 3 else 1
        w.add_tensor(f"{t.name}.in_sum2", np.ones((n_mat, shape[0]), dtype=np.float32))
        w.add_tensor(f"{t.name}.counts", np.ones((n_mat,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def bench_models(engine: Engine, models: list[CalModel], args: list[str], reps: int, threads: int | None,
              by: str | None = None) -> dict:
    """llama-bench over the models: {(role, "pp"|"tg"): seconds per token (median of the repetitions)}; with `by`
    (a llama-bench JSON field given a list of values in `args`), one such dict per value of that field."""
    args = [a for m in models for a in ("-m", str(m.path))] + \
        ["-p", str(N_PROMPT), "-n", str(N_GEN), "-r", str(reps), "-o", "json", *args] + \
        (["-t", str(threads)] if threads else [])
    out = run_tool(engine, "llama-bench", args, "the calibration models", timeout=1800)
    by_path = {str(m.path): m.role for m in models}
    result: dict = {}
    for row in json.loads(out.stdout):
        kind = "pp" if row["n_prompt"] else "tg"
        tps = statistics.median(row.get("samples_ts") or [row["avg_ts"]])
        group = result.setdefault(row[by], {}) if by else result
        group[(by_path[row["model_filename"]], kind)] = 1.0 / tps
    return result


def _bytes(m: CalModel, where: str, split: bool) -> float:
    """Bytes one decoded token reads from `where`: everything when all is there, else (`split`: experts on the CPU,
    the rest on the GPU) that pool's share."""
    total = 0.0
    for ld in m.loads:
        placed = ("cpu" if ld.cls == "routed_expert" else "gpu") if split else where
        if placed == where:
            total += ld.n_bytes * ld.read_share
    return total


def _active(m: CalModel) -> float:
    return sum(ld.n_elements * ld.read_share for ld in m.loads if not ld.name.startswith("token_embd."))


def _two_point(a: CalModel, b: CalModel, ta: float, tb: float) -> tuple[float, float]:
    """(fixed, per layer) seconds from two models that differ in layer count."""
    per_layer = max((tb - ta) / (b.n_layers - a.n_layers), 0.0)
    return max(ta - a.n_layers * per_layer, 0.0), per_layer


def _tiny_pair(models: list[CalModel], kind: str = "tiny") -> tuple[CalModel, CalModel] | None:
    """The two small models of `kind` (tiny or wide) that differ only in layer count, if calibration made them."""
    by_role = {m.role: m for m in models}
    pair = by_role.get(f"{kind}{TINY_LAYERS[0]}"), by_role.get(f"{kind}{TINY_LAYERS[1]}")
    return pair if all(pair) else None


def fit_decode(models: list[CalModel], times: dict, main: str, s_per_byte: float
               ) -> tuple[Factors, dict[str, float]]:
    """token_s, layer_s (tiny models, their few bytes subtracted), layer_s_wide (the wide pair, if any) as Factors,
    and seconds per byte of each medium model's type."""
    a, b = _tiny_pair(models)
    wide = _tiny_pair(models, "wide")
    per_type: dict[str, float] = {}
    f = Factors(efficiency={}, layer_s=0.0, token_s=0.0, split_s=0.0, pp_flops={})
    for _ in range(8):                 # a fixed point: the small models' bytes cost what the medium ones measure
        x = min(per_type.get(a.qtype, s_per_byte), s_per_byte)   # a noisy medium run must not eat the overhead

        def net(m: CalModel) -> float:
            return times[(m.role, "tg")] - _bytes(m, main, False) * x

        f.token_s, f.layer_s = _two_point(a, b, net(a), net(b))
        if wide:
            f.layer_s_wide = _two_point(*wide, net(wide[0]), net(wide[1]))[1]
        for m in (m for m in models if m.role.startswith("medium")):
            left = times[(m.role, "tg")] - f.token_s - m.n_layers * f.layer_cost(model_width(m.loads))
            if left > 0:
                per_type[m.qtype] = left / _bytes(m, main, False)
    return f, per_type


def fit_split(models: list[CalModel], times: dict, f: Factors, gpu_s_per_byte: dict[str, float],
              cpu_default: float) -> tuple[float, dict[str, float]]:
    """Seconds per CPU<->GPU split (tiny models) and seconds per CPU byte of each type (medium models)."""
    a, b = _tiny_pair(models)

    def extra(m: CalModel, x_cpu: float) -> float:
        known = (f.token_s + m.n_layers * f.layer_cost(model_width(m.loads))
                 + _bytes(m, "gpu", True) * gpu_s_per_byte.get(m.qtype, 0.0))
        return times[(m.role, "tg")] - known - _bytes(m, "cpu", True) * x_cpu

    per_type: dict[str, float] = {}
    split_s = 0.0
    for _ in range(3):
        x = min(per_type.get(a.qtype, cpu_default), cpu_default)
        split_s = max((extra(b, x) - extra(a, x)) / (b.n_moe_layers - a.n_moe_layers), 0.0)
        for m in (m for m in models if m.role.startswith("medium")):
            left = extra(m, 0.0) - m.n_moe_layers * split_s
            if left > 0:
                per_type[m.qtype] = left / _bytes(m, "cpu", True)
    return split_s, per_type


def fit_prompt(models: list[CalModel], times: dict, flops_default: float) -> tuple[float, float, float]:
    """Seconds per batch and per layer per batch (tiny models) and FLOP/s (median over the medium models)."""
    a, b = _tiny_pair(models)
    flops = flops_default
    batch_s = layer_s = 0.0
    for _ in range(3):
        batch = {m.role: times[(m.role, "pp")] * N_PROMPT for m in models}
        batch_s, layer_s = _two_point(a, b, batch[a.role] - 2 * N_PROMPT * _active(a) / flops,
                                      batch[b.role] - 2 * N_PROMPT * _active(b) / flops)
        rates = [2 * N_PROMPT * _active(m) / (batch[m.role] - batch_s - m.n_layers * layer_s)
                 for m in models if m.role.startswith("medium") and batch[m.role] > batch_s + m.n_layers * layer_s]
        flops = statistics.median(rates) if rates else flops
    return batch_s, layer_s, flops


def fit_factors(device: DeviceProfile, models: list[CalModel], full: dict, split: dict | None) -> Factors:
    """Solve the cost model's factors from the measured seconds per token (see the module docstring)."""
    f = default_factors(device)
    main = main_pool(device)
    bw = pool_bandwidth(device, main)
    fixed, s_per_byte = fit_decode(models, full, main, 1.0 / (bw * f.eff(main, "q8_0")))
    f.token_s, f.layer_s, f.layer_s_wide = fixed.token_s, fixed.layer_s, fixed.layer_s_wide
    for t, x in s_per_byte.items():
        f.efficiency[f"{main}:{t}"] = round(1.0 / (x * bw), 4)
    f.pp_batch_s, f.pp_layer_s, f.pp_flops[main] = fit_prompt(models, full, f.pp_flops[main])
    if split:
        f.split_s, cpu_eff, f.offload_gbs = fit_host_weights(device, models, full, split, f, s_per_byte)
        f.efficiency.update(cpu_eff)
        if f.offload_gbs:
            f.link_gbs = max(f.offload_gbs.values())
    return f


def fit_host_weights(device: DeviceProfile, models: list[CalModel], full: dict, split: dict, f: Factors,
                     gpu_s_per_byte: dict[str, float]) -> tuple[float, dict[str, float], dict[str, float]]:
    """From runs with the experts in host memory: seconds per split, each type's CPU decode efficiency
    ("cpu:TYPE") and the rate (GB/s) at which its prompt batches cost extra time."""
    cpu_bw = pool_bandwidth(device, "cpu")
    split_s, cpu_per_byte = fit_split(models, split, f, gpu_s_per_byte, 1.0 / (cpu_bw * f.eff("cpu", "q8_0")))
    efficiency = {f"cpu:{t}": round(1.0 / (x * cpu_bw), 4) for t, x in cpu_per_byte.items()}
    offload = {}
    for m in (m for m in models if m.role.startswith("medium")):
        extra = (split[(m.role, "pp")] - full[(m.role, "pp")]) * N_PROMPT - m.n_moe_layers * split_s
        if extra > 0:
            offload[m.qtype] = round(sum(ld.n_bytes for ld in m.loads if ld.cls == "routed_expert") / extra / 1e9, 2)
    return split_s, efficiency, offload


class GpuPeak:
    """Samples nvidia-smi's used memory of GPU 0 in a thread; `stop` gives the peak rise in bytes."""

    def __init__(self):

        self.read = lambda: read_nvidia_smi(links=False)
        gpus = self.read()
        self.before = (gpus[0]["memory_total_mib"] - gpus[0]["memory_free_mib"]) if gpus else 0
        self.peak = self.before
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            gpus = self.read()
            if gpus:
                self.peak = max(self.peak, gpus[0]["memory_total_mib"] - gpus[0]["memory_free_mib"])
            time.sleep(0.05)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return (self.peak - self.before) * MIB


def run_overhead(engine: Engine, model: Path, bench_args: list[str], fit_args: list[str], n_prompt: int = N_PROMPT,
                 n_gen: int = 16) -> int | None:
    """GPU memory a llama.cpp process takes beyond its own buffers (CUDA context, cuBLAS, pools): the peak use of a
    short llama-bench run minus llama.cpp's dry-run estimate of its buffers for the same flags (-c n_prompt+n_gen).
    None when llama-fit-params is missing or the run did not load."""

    est = fit_print(engine, model, ["-c", str(n_prompt + n_gen), *fit_args])
    gpu = next((v for k, v in (est or {}).items() if k != "Host"), None)
    if gpu is None:
        return None

    probe = GpuPeak()
    try:
        ran = llama_bench(engine, model, bench_args, reps=1, n_prompt=n_prompt, n_gen=n_gen)
    finally:
        used = probe.stop()
    return max(used - sum(gpu.values()), 0) if ran["ok"] else None


def gpu_overhead(engine: Engine, tiny: CalModel, threads: int | None) -> int | None:
    """The process overhead measured on the tiny model, everything on the GPU."""
    t = ["-t", str(threads)] if threads else []
    return run_overhead(engine, tiny.path, ["-ngl", "99", *t], ["-ngl", "999", "-ub", str(N_PROMPT)], n_gen=N_GEN)


def cpu_candidates(threads: int) -> list[tuple[str, int]]:
    """(llama.cpp load mode, threads) tried for expert weights in host memory next to a GPU: memory-mapped
    (llama.cpp's default) or loaded into its own (pinned) host buffers, at `threads`, three quarters and half as
    many (the thread that drives the GPU, and hyperthreads, can make fewer threads faster)."""
    counts = [threads] + sorted({threads * 3 // 4, threads // 2} - {threads}, reverse=True) if threads >= 8 else [threads]
    return [(mode, n) for n in counts for mode in ("auto", "none")]


CPU_DECODE_TIE = 0.05      # candidates this close to the fastest decode are a tie: the faster prompt wins


def measure_cpu_settings(engine: Engine, models: list[CalModel], reps: int, threads: int, say
                         ) -> tuple[dict, tuple[str, int], dict[str, dict[str, float]]]:
    """Every candidate with the experts on the CPU. The fastest decode (summed over the medium models) wins; within
    5% of it (run-to-run noise) the fastest prompt processing wins: loading into llama.cpp's own pinned buffers
    can make the copies of prompt batches several times faster. Returns the winner's times, the winner and each
    candidate's medium-model decode and prompt tokens/s for the record."""
    tried = {}
    for mode, n in cpu_candidates(threads):
        say(f"llama-bench: experts on the CPU (-ot exps=CPU), load mode {mode}, {n} threads")
        args = ["-ngl", "99", "-ot", "exps=CPU"] + (["-lm", mode] if mode != "auto" else [])
        tried[(mode, n)] = bench_models(engine, models, args, reps, n)

    best = pick_cpu_settings(tried)
    record = {f"{mode}/t{n}": {"tg": round(1.0 / _medium_s(res, "tg"), 2), "pp": round(1.0 / _medium_s(res, "pp"), 2)}
              for (mode, n), res in tried.items()}
    return tried[best], best, record


HOST_BUFFER_BACKENDS = ("cuda", "hip")    # GPU backends whose pinned host buffers --no-host bypasses


def measure_repack(engine: Engine, device: DeviceProfile, models: list[CalModel], full: dict, f: Factors,
                   choice: tuple[str, int], reps: int, say) -> tuple[dict, dict]:
    """The experts in host memory again, at the chosen load mode and threads, with and without llama.cpp's CPU
    buffers (`--no-host 0,1`: the CPU kernels' repacked layout for the types that have one) in one llama-bench
    process, seconds apart. Returns Factors.repack (`f`'s CPU efficiencies and prompt-batch rates times the paired
    ratios, see `rescaled`) and the runs in those buffers."""
    mode, n = choice
    say(f"llama-bench: experts on the CPU with and without llama.cpp's CPU buffers (--no-host 0,1), load mode {mode}, "
        f"{n} threads")
    used = [m for m in models if not m.role.startswith("wide")]
    args = ["-ngl", "99", "-ot", "exps=CPU", "--no-host", "0,1"] + (["-lm", mode] if mode != "auto" else [])
    runs = bench_models(engine, used, args, reps, n, by="no_host")
    bw = pool_bandwidth(device, main_pool(device))
    gpu_s_per_byte = {k.split(":", 1)[1]: 1.0 / (bw * v) for k, v in f.efficiency.items() if k.startswith("gpu:")}
    _, eff_pinned, offload_pinned = fit_host_weights(device, used, full, runs[False], f, gpu_s_per_byte)
    _, eff_cpu, offload_cpu = fit_host_weights(device, used, full, runs[True], f, gpu_s_per_byte)
    for name, pair in (("efficiency", (eff_pinned, eff_cpu)), ("prompt-batch rate", (offload_pinned, offload_cpu))):
        for k in sorted(unpaired(*pair)):
            say(f"  {k}: {name} not fitted in both runs of the pair (a noisy run); it keeps its calibrated value")
    return {"efficiency": rescaled(f.efficiency, eff_pinned, eff_cpu, 4),
            "offload_gbs": rescaled(f.offload_gbs, offload_pinned, offload_cpu, 2)}, runs[True]


def rescaled(calibrated: dict[str, float], paired_default: dict[str, float], paired_other: dict[str, float],
             digits: int) -> dict[str, float]:
    """`calibrated` values times other/default of a pair measured together: a host whose speed drifts between
    calibration's runs (±15% on the H100 VM) moves both of a pair alike, and the ratio stays. A key that only
    one run of the pair fitted (a fit of 0 or none) keeps its calibrated value: no change measured."""
    alone = unpaired(paired_default, paired_other)
    out = {k: round(calibrated.get(k, paired_default[k]) * paired_other[k] / paired_default[k], digits)
           for k in set(paired_default) | set(paired_other) if k not in alone}
    out.update({k: calibrated[k] for k in alone if k in calibrated})
    return out


def unpaired(a: dict[str, float], b: dict[str, float]) -> set[str]:
    """Keys that only one of a pair of fits has a value (above 0) for."""
    return {k for k in set(a) | set(b) if not (a.get(k) and b.get(k))}


def _medium_s(res: dict, kind: str) -> float:
    return sum(t for (role, k), t in res.items() if role.startswith("medium") and k == kind)


def pick_cpu_settings(tried: dict) -> tuple[str, int]:
    """The candidate with the fastest decode, or within CPU_DECODE_TIE of it the one with the fastest prompts."""
    fastest = min(_medium_s(res, "tg") for res in tried.values())
    ties = [k for k, res in tried.items() if _medium_s(res, "tg") <= fastest * (1 + CPU_DECODE_TIE)]
    return min(ties, key=lambda k: _medium_s(tried[k], "pp"))


@dataclass
class Calibration:
    """What `calibrate` measured on this host and the speed factors it fitted (saved as a calibration artifact)."""

    path: str
    device: str
    backend: str
    engine: str
    created: str
    seconds: float
    reps: int
    threads: int | None
    cpu_settings_tried: dict
    runs: dict                   # "role/pp|tg/mode" -> measured tok/s
    fit: dict                    # run -> measured and predicted tok/s under the fitted factors
    factors: Factors

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "factors"}, "factors": asdict(self.factors)}

    def summary_lines(self) -> list[str]:
        f = self.factors
        wide = f" ({f.layer_s_wide * 1e6:.1f} us if 2048 wide)" if f.layer_s_wide is not None else ""
        pool = "gpu" if self.backend != "cpu" else "cpu"
        lines = [f"calibration {self.path} ({self.seconds} s)",
                 f"  per token {f.token_s * 1e6:.0f} us + {f.layer_s * 1e6:.1f} us per layer{wide}; "
                 f"split {f.split_s * 1e6:.0f} us; prompt {f.pp_flops.get(pool, 0) / 1e12:.2f} TFLOP/s"
                 + (f"; link {f.link_gbs} GB/s" if f.link_gbs else ""),
                 "  decode efficiency: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(f.efficiency.items()))]
        for run, r in self.fit.items():
            lines.append(f"  {run:<18} tg {r['measured_tg']:>9.1f} (model {r['predicted_tg']:>9.1f})  "
                         f"pp {r['measured_pp']:>9.1f} (model {r['predicted_pp']:>9.1f})")
        return lines


def check_types(types: list[str] | None) -> None:
    """Every type to calibrate is one the project can generate or llama-quantize can make."""
    for t in types or []:
        if t not in SYNTH_TYPES + tuple(QUANTIZED_TYPES):
            raise CcmoeError(f"cannot calibrate type {t!r}", f"choose from {', '.join(SYNTH_TYPES + tuple(QUANTIZED_TYPES))}")


def calibrate(engine: Engine, device: DeviceProfile, out: Path | None = None, size_mb: int | None = None,
              types: list[str] | None = None, reps: int = 3, threads: int | None = None,
              progress=None, force: bool = False) -> Calibration:
    """Generate models, run llama-bench, fit the factors and save the calibration (by default where `place` and
    `serve` look for it, replaced; an explicit `out` only with `force`)."""
    check_types(types)
    if reps < 1:
        raise CcmoeError(f"--reps {reps} is not a positive count", "pass --reps 1 or more")
    force = force or not out
    out = Path(out) if out else calibration_path(device, engine.backend)
    check_writable(out, force=force, what="calibration")
    main = main_pool(device)
    if main == "gpu" and engine.backend == "cpu":
        raise CcmoeError(f"device {device.name} has a GPU but the engine is a CPU build",
                         f"build one with `ccmoe-run engine build --backend {device.backend}`", EXIT_ENGINE)
    size_mb = size_mb or default_size_mb(main, last_level_cache_bytes())
    types = types or (["q8_0", "q4_0"] if main == "gpu" else ["f16", "q8_0", "q4_0"])
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ccmoe-calibrate-") as tmp:
        say(f"generating calibration models ({size_mb} MB each: {', '.join(types)})")
        models = make_models(Path(tmp), size_mb, types, wide=main == "gpu", engine=engine)
        say("llama-bench: all layers on the " + main.upper())
        full = bench_models(engine, models, ["-ngl", "99" if main == "gpu" else "0"], reps, threads)
        split, cpu_choice, cpu_tried = None, None, {}
        if main == "gpu":

            split, cpu_choice, cpu_tried = measure_cpu_settings(    # the wide pair only measures layer costs
                engine, [m for m in models if not m.role.startswith("wide")], reps,
                threads or min(device.threads, environment_threads()), say)
        factors = fit_factors(device, models, full, split)
        repack = {}
        if cpu_choice:
            factors.cpu_load_mode, factors.cpu_threads = cpu_choice
            if engine.backend in HOST_BUFFER_BACKENDS:
                try:
                    factors.repack, repack = measure_repack(engine, device, models, full, factors, cpu_choice,
                                                            reps, say)
                except CcmoeError as e:         # an engine without --no-host: the lever stays off
                    say(f"no measurement with llama.cpp's CPU buffers: {e.one_line()}")
        if main == "gpu" and engine.backend == "cuda":
            measured = gpu_overhead(engine, models[0], threads)
            if measured is not None:
                factors.gpu_overhead_bytes = int(measured)
        factors.source = f"measured by calibrate ({out})"
        check = _self_check(device, factors, models, full, split)
    extra = {"device": device.name, "backend": engine.backend, "engine": engine.key or str(engine.bin_dir),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.monotonic() - started, 1),
             "reps": reps, "threads": threads, "cpu_settings_tried": cpu_tried,
             "runs": {f"{role}/{kind}/{mode}": round(1.0 / t, 2)
                      for mode, res in (("full", full), ("split", split or {}), ("split-repack", repack))
                      for (role, kind), t in res.items()},
             "fit": check}
    save_calibration(out, factors, extra, force)
    return Calibration(path=str(out), **extra, factors=factors)


def _self_check(device: DeviceProfile, f: Factors, models: list[CalModel], full: dict, split: dict | None) -> dict:
    """Predicted vs measured decode tok/s of each calibration run under the fitted factors."""
    out = {}
    main = main_pool(device)
    for mode, res in (("full", full), ("split", split)):
        if not res:
            continue
        for m in (m for m in models if (m.role, "tg") in res):
            where = {ld.name: ("cpu" if mode == "split" and ld.cls == "routed_expert" else main) for ld in m.loads}
            p = predict(m.loads, where, device, f, m.n_layers, 0.0, 0, N_PROMPT, 512, main)
            out[f"{m.role}/{mode}"] = {"measured_tg": round(1 / res[(m.role, "tg")], 1), "predicted_tg": p.decode_tps,
                                       "measured_pp": round(1 / res[(m.role, "pp")], 1), "predicted_pp": round(p.prompt_tps, 1)}
    return out
