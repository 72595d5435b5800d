"""Placement: which tensors live in which memory pool, as llama.cpp flags (-ot, -ngl, -c, -fa, -t, -b/-ub).

Hot tensors go to the GPU first: greedy by bytes read per decoded token per byte of memory, under each pool's
capacity (weights + KV cache for ctx x parallel + compute buffers + process overhead + margin). Memory needs are
estimated, then measured with llama.cpp's own dry run (`llama-fit-params --fit-print`) when the engine has it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.units import GB, MIB
from ..devices.detect import environment_threads
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from ..engine.tools import fit_print
from ..model.experts import load_expert_stats
from ..model.inventory import (
    ModelInventory,
    kv_bytes_per_token,
    read_gguf,
    require_moe,
    summarize,
)
from .calibrate import run_overhead
from .costmodel import (
    KV_TYPES,
    Factors,
    Prediction,
    TensorLoad,
    calibration_path,
    check_kv_type,
    load_factors,
    main_pool,
    pool_bandwidth,
    predict,
    tensor_loads,
)
from .layout import Placement, PoolUse, Settings
from .memory import (
    TRIAL_MARGIN,
    SearchContext,
    fits,
    flash_mode,
    pool_capacities,
    pool_use,
)
from .rules import override_rules, rule_matches
from .startcache import cached_placement, entry_path, remember, start_key

UNCALIBRATED_NOTE = ("not calibrated: llama-server's own -b/-ub and f16 KV cache are kept, so prompts run as with its "
                     "defaults; after `ccmoe-run calibrate` they are tuned when the prediction says it pays")
UBATCH_MIN_GAIN = 1.01               # a halved -ub only when the memory it frees buys at least 1% decode speed
UBATCH_MIN_PROMPT = 0.75             # ... and keeps at least 75% of the predicted prompt speed
KV_Q8_MIN_GAIN = 1.05                # q8_0 KV only when it buys at least 5% decode speed at the planned context
_ORDER_IN_LAYER = ("ffn_down", "ffn_up", "ffn_gate")   # a partial layer keeps these on the GPU first


def _order_in_layer(name: str) -> int:
    return next((i for i, p in enumerate(_ORDER_IN_LAYER) if f".{p}" in name), len(_ORDER_IN_LAYER))


def density(ld: TensorLoad) -> float:
    """Bytes read per decoded token per byte held: what a byte of GPU memory buys."""
    return ld.read_share


def gpu_value(ld: TensorLoad, device: DeviceProfile, factors: Factors) -> float:
    """Decode seconds per token that one byte of this tensor saves on the GPU instead of in host memory: its read
    share times the difference of the two pools' time per byte for its type. A type that is slow on the CPU
    (a low-bit K or IQ quant, as a compressed plan uses) buys more per byte of GPU memory than Q8_0 does."""
    t = ld.ggml_type
    cpu = pool_bandwidth(device, "cpu") * factors.eff("cpu", t, device.slow_types)
    gpu = pool_bandwidth(device, "gpu") * factors.eff("gpu", t, device.slow_types)
    return ld.read_share * max(1.0 / cpu - 1.0 / gpu, 0.0)


def greedy(loads: list[TensorLoad], budget: int, value=None) -> dict[str, str]:
    """Fill the GPU by `value` per byte (`gpu_value`; default: density), ties by density, then later layers first,
    then down/up/gate; the rest to the CPU."""
    value = value or density
    where = {ld.name: "cpu" for ld in loads}
    left = budget
    order = sorted((ld for ld in loads if not ld.name.startswith("token_embd.")),
                   key=lambda ld: (-value(ld), -density(ld), -(ld.layer if ld.layer is not None else 10**6),
                                   _order_in_layer(ld.name), ld.name))
    for ld in order:
        if ld.n_bytes <= left:
            where[ld.name] = "gpu"
            left -= ld.n_bytes
    return where


def choose_layout(loads: list[TensorLoad], budget: int, values: list, predict_fn) -> dict[str, str]:
    """The greedy layout of each value order (refined by `drop_costly_partials`) with the fastest predicted decode.
    Density keeps whole layers together (few CPU<->GPU splits); `gpu_value` keeps the types slowest on the CPU on
    the GPU, which can spread CPU tensors over more layers: the prediction, splits included, settles it."""
    layouts = [drop_costly_partials(loads, greedy(loads, budget, v), predict_fn) for v in values]
    return max(layouts, key=lambda w: predict_fn(w).decode_tps)


def drop_costly_partials(loads, where, predict_fn) -> dict[str, str]:
    """Move a layer's few GPU experts back to the CPU when the split they add costs more than they save."""
    by_layer: dict[int, list[TensorLoad]] = {}
    for ld in loads:
        if ld.cls == "routed_expert" and ld.layer is not None:
            by_layer.setdefault(ld.layer, []).append(ld)
    for layer, lds in sorted(by_layer.items()):
        places = {where[ld.name] for ld in lds}
        others_cpu = any(where[o.name] == "cpu" for o in loads if o.layer == layer and o.cls != "routed_expert")
        if places != {"gpu", "cpu"} or others_cpu:
            continue
        trial = dict(where)
        for ld in lds:
            trial[ld.name] = "cpu"
        if predict_fn(trial).decode_tps > predict_fn(where).decode_tps:
            where = trial
    return where


def _predict(cx: SearchContext, where: dict[str, str], kv_type: str, depth: int) -> Prediction:
    return predict(cx.loads, where, cx.device, cx.factors, cx.n_layers,
                   kv_bytes_per_token(cx.inv, KV_TYPES[kv_type]), depth, cx.settings.n_prompt,
                   cx.settings.ubatch, cx.main)


def _llama_args(cx: SearchContext, where: dict[str, str], kv_type: str) -> tuple[list[str], list[str]]:
    """(-ot rules, llama-fit-params flags) for a placement."""
    cpu = [n for n, w in where.items() if w == "cpu" and not n.startswith("token_embd.")] if cx.main == "gpu" else []
    rules = override_rules(cpu)
    s = cx.settings
    args = ["-c", str(s.ctx * s.parallel), "-np", str(s.parallel), "-ngl", "999" if cx.main == "gpu" else "0",
            "-b", str(s.batch), "-ub", str(s.ubatch), "-fa", flash_mode(cx.device, kv_type)]
    if rules:
        args += ["-ot", ",".join(rules)]
    if kv_type != "f16":
        args += ["-ctk", kv_type, "-ctv", kv_type]
    return rules, args


def _place_once(cx: SearchContext, kv_type: str, engine: Engine | None, model: Path | None,
                caps: dict[str, int]) -> tuple[dict[str, str], dict[str, PoolUse], str]:
    """Greedy placement for one KV type, refined with llama.cpp's measured memory when available."""
    if cx.main == "cpu":
        where = {ld.name: "cpu" for ld in cx.loads}
        measured = fit_print(engine, model, _llama_args(cx, where, kv_type)[1]) if engine and model else None
        return where, pool_use(cx, where, kv_type, measured, caps), "llama-fit-params" if measured else "estimate"
    empty = pool_use(cx, {ld.name: "cpu" for ld in cx.loads}, kv_type, None, caps)["gpu"]
    budget = empty.capacity - empty.kv - empty.compute - empty.overhead - empty.margin
    source = "estimate"
    where: dict[str, str] = {}
    use: dict[str, PoolUse] = {}
    fitting = None
    for _ in range(8):
        where = choose_layout(cx.loads, budget, [density, lambda ld: gpu_value(ld, cx.device, cx.factors)],
                              lambda w: _predict(cx, w, kv_type, cx.settings.depth))
        measured = fit_print(engine, model, _llama_args(cx, where, kv_type)[1]) if engine and model else None
        use = pool_use(cx, where, kv_type, measured, caps)
        if not measured:
            break
        source = "llama-fit-params"
        if fits(use):
            fitting = (where, use)
        slack = use["gpu"].capacity - use["gpu"].total
        movable = [ld.n_bytes for ld in cx.loads if where[ld.name] == "cpu" and not ld.name.startswith("token_embd.")]
        if slack >= 0 and (not movable or min(movable) > slack):
            break                                      # nothing left on the CPU fits into what is free
        budget += slack if slack >= 0 else slack - 32 * MIB   # over: step back a little further than the excess
    if fitting and not fits(use):
        where, use = fitting
    return where, use, source


def place(inv: ModelInventory, device: DeviceProfile, factors: Factors, settings: Settings,
          engine: Engine | None = None, model: Path | None = None, stats: dict | None = None,
          trial: bool = False) -> Placement:
    """The placement that maximises predicted decode tokens/s under every pool's capacity.

    `trial`: on CUDA, when weights stay in host memory, measure the GPU memory a run of the placement really takes
    and place again with it (see `tune_by_trial`)."""
    first = _place(inv, device, factors, settings, engine, model, stats)
    if settings.cpu_repack is not False and first.has_host_weights and (factors.repack or settings.cpu_repack):
        first, factors, settings = _with_repack(first, inv, device, factors, settings, engine, model, stats)
    if trial and engine is not None and model is not None and engine.backend == "cuda" and first.has_host_weights:
        return tune_by_trial(first, inv, device, factors, settings, engine, model, stats)
    return first


REPACK_MIN_GAIN = 1.05    # llama.cpp's CPU buffers only when they buy at least 5% predicted decode speed


def _with_repack(first: Placement, inv: ModelInventory, device: DeviceProfile, factors: Factors, settings: Settings,
                 engine: Engine | None, model: Path | None, stats: dict | None
                 ) -> tuple[Placement, Factors, Settings]:
    """The placement with host-memory weights in llama.cpp's CPU buffers (--no-host: repacked for the CPU
    kernels where the type has a repacked layout, but prompt batches no longer copied to the GPU for them), when
    asked, or when calibration predicts at least REPACK_MIN_GAIN more decode speed; with its factors and settings."""
    f2, s2 = factors.with_repack(), replace(settings, cpu_repack=True)
    second = _place(inv, device, f2, s2, engine, model, stats)
    a, b = first.predicted_empty, second.predicted_empty
    compared = (f"predicted decode {b.decode_tps:.1f} vs {a.decode_tps:.1f} tok/s, prompt {b.prompt_tps:,.0f} vs "
                f"{a.prompt_tps:,.0f} tok/s with pinned buffers")
    if settings.cpu_repack:
        second.notes.append(f"--no-host as asked: {compared}")
        return second, f2, s2
    if b.decode_tps >= a.decode_tps * REPACK_MIN_GAIN:
        second.notes.append(f"--no-host: host-memory experts in llama.cpp's CPU buffers, repacked for its CPU "
                            f"kernels ({compared}; --no-cpu-repack keeps the pinned ones)")
        return second, f2, s2
    return first, factors, settings


def _place(inv: ModelInventory, device: DeviceProfile, factors: Factors, settings: Settings,
           engine: Engine | None, model: Path | None, stats: dict | None) -> Placement:
    """The placement at the asked -ub and, when weights stay in host memory, at half of it: a smaller compute
    buffer can leave room for one more tensor on the GPU (decode speed bought with some prompt speed)."""
    first = _place_at(inv, device, factors, settings, engine, model, stats)
    if not (settings.ubatch_auto and first.has_host_weights and settings.ubatch >= 128):
        return first
    if not factors.measured:                      # an uncalibrated prompt prediction cannot justify a slower -ub
        first.notes.append(UNCALIBRATED_NOTE)
        return first
    half = replace(settings, ubatch=settings.ubatch // 2)
    second = _place_at(inv, device, factors, half, engine, model, stats)
    a, b = first.predicted_empty, second.predicted_empty
    if b.decode_tps >= a.decode_tps * UBATCH_MIN_GAIN and b.prompt_tps >= a.prompt_tps * UBATCH_MIN_PROMPT:
        second.notes.append(f"-ub {half.ubatch}: its smaller compute buffer leaves room for more weights on the GPU "
                            f"(predicted decode {b.decode_tps:.1f} vs {a.decode_tps:.1f} tok/s, prompt "
                            f"{b.prompt_tps:,.0f} vs {a.prompt_tps:,.0f} tok/s at -ub {settings.ubatch})")
        return second
    return first


def _place_at(inv: ModelInventory, device: DeviceProfile, factors: Factors, settings: Settings,
              engine: Engine | None, model: Path | None, stats: dict | None) -> Placement:
    s = summarize(inv)
    if settings.depth is None:                    # a slot never holds more than the model was trained for
        ctx_train = int(inv.key("context_length", 0) or 0)
        settings = replace(settings, depth=min(settings.ctx, ctx_train or settings.ctx))
    depth = settings.depth
    cx = SearchContext(inv, device, factors, settings, tensor_loads(inv, stats), main_pool(device), s.n_layers)
    caps = pool_capacities(device)
    if not caps:
        raise CcmoeError(f"device {device.name} has no memory pool to place weights in", "fix the device profile")
    kv_types = ["f16", "q8_0"] if settings.kv_type == "auto" else [check_kv_type(settings.kv_type)]
    best = None
    for kv_type in kv_types:
        if best and fits(best[2]) and not factors.measured:
            break                                 # uncalibrated: llama-server's f16 KV cache whenever it fits
        where, use, source = _place_once(cx, kv_type, engine, model, caps)
        pred = _predict(cx, where, kv_type, depth)
        faster = factors.measured and pred.decode_tps > best[3].decode_tps * KV_Q8_MIN_GAIN if best else True
        better = best is None or (fits(use) and not fits(best[2])) or (fits(use) == fits(best[2]) and faster)
        if better:
            best = (kv_type, where, use, pred, source)
    kv_type, where, use, pred, source = best
    if not fits(use):
        over = "; ".join(f"{u.where} needs {u.total / GB:.2f} GB of {u.capacity / GB:.2f} GB"
                         for u in use.values() if u.total > u.capacity)
        raise CcmoeError(f"{Path(inv.source).name} does not fit {device.name} at --ctx {settings.ctx} x --parallel "
                         f"{settings.parallel} ({over})",
                         "shorten --ctx or --parallel, use a smaller (more compressed) model, or a larger device",
                         EXIT_RESOURCE)
    rules, _ = _llama_args(cx, where, kv_type)
    _check_rules(rules, where, cx)
    hybrid = bool(rules)                          # -ot rules exist only for host-memory weights next to a GPU
    return Placement(model=inv.source, device=device.name, backend=device.backend, settings=settings, kv_type=kv_type,
                     flash_attn=flash_mode(device, kv_type), n_gpu_layers=999 if cx.main == "gpu" else 0,
                     threads=_threads(settings, device, factors, hybrid), tensors=where, overrides=rules, memory=use,
                     predicted=pred, predicted_empty=_predict(cx, where, kv_type, 0), memory_source=source,
                     factors_source=factors.source, load_mode=_load_mode(settings, factors, hybrid, device),
                     cpu_repack=bool(settings.cpu_repack) and hybrid,
                     notes=uncalibrated_types(cx.loads, where, factors) + device_notes(device, where))


def uncalibrated_types(loads: list[TensorLoad], where: dict[str, str], factors: Factors) -> list[str]:
    """A note naming the weight types this host's calibration did not measure in the pool that holds them (their
    speed is taken as the pool's slowest measured type), with the command that measures them."""
    if not factors.source.startswith("measured"):
        return []
    missing = sorted({ld.ggml_type.lower() for ld in loads if ld.ggml_type.lower() != "f32"
                      and not ld.name.startswith("token_embd.")          # one row read per token
                      and f"{where.get(ld.name, 'gpu')}:{ld.ggml_type.lower()}" not in factors.efficiency
                      and ld.n_bytes * ld.read_share > 0})
    if not missing:
        return []
    measured = sorted({k.split(":")[1] for k in factors.efficiency})
    return [f"no calibrated speed for {', '.join(missing)} on this host (taken as the slowest type "
            f"measured in their pool): "
            f"`ccmoe-run calibrate --types {','.join(measured + missing)}` measures them"]


def _load_mode(settings: Settings, factors: Factors, hybrid: bool, device: DeviceProfile) -> str:
    """The user's load mode; under ROCm none (mmap loading of large models can hang there: shared/device-facts.md);
    else the one calibration measured best for weights in host memory next to a GPU."""
    if settings.load_mode:
        return settings.load_mode
    if device.backend == "hip":
        return "none"
    return factors.cpu_load_mode if hybrid else "auto"


def device_notes(device: DeviceProfile, where: dict[str, str]) -> list[str]:
    """What this device's memory rules mean for the placement: ROCm's carve-out, ROCm's loading without mmap, and
    Metal's wired-memory limit when it leaves weights to the CPU, each with what lifts it."""
    notes = []
    uni = device.pool("unified")
    if device.backend == "hip":
        notes.append("-lm none: under ROCm models load without mmap (mmap loading of large models can hang)")
    if device.backend == "hip" and uni and uni.carve_out_gb and (uni.gpu_visible_gb or 0) > uni.carve_out_gb:
        notes.append(f"ROCm allocates only inside the {uni.carve_out_gb:g} GB BIOS carve-out: Vulkan (GTT, "
                     f"{uni.gpu_visible_gb:g} GB GPU-visible) or a larger carve-out in the firmware puts more on the GPU")
    host = [n for n, w in where.items() if w == "cpu" and not n.startswith("token_embd.")]
    if device.backend == "metal" and uni and host:
        limit_mb = int((uni.capacity_gb - max(device.os_reserve_gb, 8.0)) * 1e9 / 2**20)
        notes.append(f"Metal's GPU working-set limit ({uni.gpu_visible_gb or uni.capacity_gb:g} GB) leaves {len(host)} "
                     f"tensors to the CPU: `sudo sysctl iogpu.wired_limit_mb={limit_mb}` raises it until reboot "
                     f"(leaving {max(device.os_reserve_gb, 8.0):g} GB for macOS), then place again")
    return notes


def _threads(settings: Settings, device: DeviceProfile, factors: Factors, hybrid: bool) -> int:
    """The user's count, else the measured best for host-memory experts next to a GPU, else the profile's; never
    more than this process may use."""
    if settings.threads:
        return settings.threads

    wanted = factors.cpu_threads if hybrid and factors.cpu_threads else device.threads
    return max(1, min(wanted, environment_threads()))


TRIAL_BACKOFFS = (128 * MIB, 512 * MIB)   # after a failed trial run: GPU memory held back, least first


def tune_by_trial(first: Placement, inv: ModelInventory, device: DeviceProfile, factors: Factors,
                  settings: Settings, engine: Engine, model: Path, stats: dict | None) -> Placement:
    """Run the placement once (llama-bench, 512-token prompt, 16 tokens) and measure the GPU memory the process
    takes beyond llama.cpp's own buffers; place again with that overhead instead of the calibrated one, and keep
    the new placement only when it runs too. A first placement that does not run is placed again with more GPU
    memory held back, in steps (TRIAL_BACKOFFS), and the first of those that runs is kept."""

    def overhead(p: Placement) -> int | None:
        return run_overhead(engine, model, p.bench_args() + ["-t", str(p.threads)], p.common_args())

    measured = overhead(first)
    if measured is None:
        return _back_off(first, inv, device, factors, settings, engine, model, stats, overhead)
    note = f"trial run: the process took {measured / MIB:.0f} MiB of GPU memory beyond llama.cpp's buffers " \
           f"({factors.gpu_overhead_bytes / MIB:.0f} MiB assumed)"
    tighter = settings if settings.margin_bytes is not None else replace(settings, margin_bytes=TRIAL_MARGIN)
    if measured >= factors.gpu_overhead_bytes and tighter is settings:
        first.notes.append(note)
        return first
    second = _place(inv, device, replace(factors, gpu_overhead_bytes=measured), tighter, engine, model, stats)
    if second.tensors == first.tensors:
        first.notes.append(note + "; no further tensor fits")
        return first
    if overhead(second) is None:
        first.notes.append(note + "; the tighter placement did not run, the first one is kept")
        return first
    second.memory_source += " and a trial run"
    margin = f" and a {TRIAL_MARGIN // MIB} MiB margin" if tighter is not settings else ""
    second.notes.append(note + f"; placed again with the measured overhead{margin}, and that placement ran")
    return second


def _back_off(first: Placement, inv: ModelInventory, device: DeviceProfile, factors: Factors, settings: Settings,
              engine: Engine, model: Path, stats: dict | None, overhead) -> Placement:
    """The placement with the least more GPU memory held back (TRIAL_BACKOFFS) whose trial run runs; the last
    step's when none does (then `serve` reports the server's own error)."""
    tried = first
    for step in TRIAL_BACKOFFS:
        bumped = replace(factors, gpu_overhead_bytes=factors.gpu_overhead_bytes + step)
        try:
            p = _place(inv, device, bumped, settings, engine, model, stats)
        except CcmoeError:                            # what must stay on the GPU no longer fits: stop here
            break
        if p.tensors == tried.tensors:
            continue                                  # the same layout as one that did not run
        tried = p
        if overhead(p) is not None:
            p.notes.append(f"a trial run of the first placement failed; placed again with {step // MIB} MiB more "
                           f"GPU memory held back, and that placement ran")
            return p
    tried.notes.append("a trial run of the first placement failed, and no placement with more GPU memory held "
                       f"back (up to {TRIAL_BACKOFFS[-1] // MIB} MiB) ran")
    return tried


def _check_rules(rules: list[str], where: dict[str, str], cx: SearchContext) -> None:
    """The -ot rules select exactly the tensors placed on the CPU (token_embd is there anyway)."""
    if cx.main != "gpu":
        return
    want = {n for n, w in where.items() if w == "cpu" and not n.startswith("token_embd.")}
    got = rule_matches(rules, [n for n in where if not n.startswith("token_embd.")])
    if want != got:
        raise CcmoeError(f"internal error: -ot rules select {len(got)} tensors, the placement {len(want)}",
                         "report this model to the ccmoe-runtime developers")


def repredict(p: Placement, inv: ModelInventory, device: DeviceProfile, factors: Factors, n_prompt: int, depth: int,
              stats: dict | None = None) -> Prediction:
    """The placement's predicted speed for another prompt length and context depth (e.g. a warm-up request)."""
    factors = factors.with_repack() if p.cpu_repack else factors
    return predict(tensor_loads(inv, stats), p.tensors, device, factors, summarize(inv).n_layers,
                   kv_bytes_per_token(inv, KV_TYPES[p.kv_type]), depth, max(n_prompt, 1), p.settings.ubatch,
                   main_pool(device))


@dataclass
class PlacedModel:
    """A placement with what it was made from: the model's inventory, the speed factors and expert statistics, and
    what the start cache did (off, stored: placed and kept, hit: taken from it without measuring)."""

    inventory: ModelInventory
    factors: Factors
    stats: dict | None
    placement: Placement
    start_cache: str = "off"
    start_key: str | None = None


def place_model(engine: Engine | None, model: Path, device: DeviceProfile, settings: Settings,
                stats_file: Path | None = None, calibration: Path | None = None, trial: bool = False,
                start_cache: bool = False) -> PlacedModel:
    """Place the GGUF at `model` on `device`: memory measured with the engine's dry run when there is one, speed
    factors from this host's calibration (or `calibration`), expert usage from `stats_file` (else uniform). With
    `start_cache`, a placement made before from the same inputs is reused (see startcache.py)."""
    check_settings(settings)
    inv = read_gguf(model)
    require_moe(summarize(inv), str(model))
    stats = load_expert_stats(stats_file) if stats_file else None
    factors = load_factors(device, calibration)
    if not start_cache:
        return PlacedModel(inv, factors, stats, place(inv, device, factors, settings, engine, model, stats, trial=trial))
    key = start_key(model, engine, device, settings, calibration or calibration_path(device), stats_file, trial)
    hit = cached_placement(key)
    if hit is not None:
        hit.notes.append(f"placement from the start cache ({entry_path(key)}): no dry run or trial run this time")
        return PlacedModel(inv, factors, stats, hit, "hit", key)
    placed = place(inv, device, factors, settings, engine, model, stats, trial=trial)
    stored = remember(key, placed)
    return PlacedModel(inv, factors, stats, placed, "stored" if stored else "off", key)


def check_settings(settings: Settings) -> None:
    """What llama.cpp cannot run: a context under 16 tokens, no request slot, a batch under 1."""
    if settings.ctx < 16:
        raise CcmoeError(f"--ctx {settings.ctx} is below llama.cpp's minimum of 16 tokens", "pass --ctx 16 or more")
    if settings.parallel < 1:
        raise CcmoeError(f"--parallel {settings.parallel} leaves no request slot", "pass --parallel 1 or more")
    if settings.ubatch < 1 or settings.batch < 1:
        raise CcmoeError(f"-ub {settings.ubatch} / -b {settings.batch} must be positive", "pass --ubatch 1 or more")
