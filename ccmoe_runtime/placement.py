"""Placement: which tensors live in which memory pool, as llama.cpp flags (-ot, -ngl, -c, -fa, -t, -b/-ub).

Hot tensors go to the GPU first: greedy by bytes read per decoded token per byte of memory, under each pool's
capacity (weights + KV cache for ctx x parallel + compute buffers + process overhead + margin). Memory needs are
estimated, then measured with llama.cpp's own dry run (`llama-fit-params --fit-print`) when the engine has it.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .costmodel import (KV_TYPES, MIB, Factors, Prediction, TensorLoad, check_kv_type, main_pool, pool_bandwidth,
                        predict, tensor_loads)
from .devices import GB, DeviceProfile
from .engine import Engine
from .errors import EXIT_RESOURCE, CcmoeError
from .inventory import ModelInventory, summarize
from .plan import kv_bytes_per_token

PLACEMENT_VERSION = 1
PLACEMENT_KIND = "placement"
MAX_OVERRIDES = 4096                 # llama.cpp's limit on tensor buffer overrides
DEFAULT_MARGIN = 256 * MIB           # free memory left in each pool beyond the measured needs
TRIAL_MARGIN = 128 * MIB             # ... once a trial run has measured what the process really takes (CUDA)
UBATCH_MIN_GAIN = 1.01               # a halved -ub only when the memory it frees buys at least 1% decode speed
UBATCH_MIN_PROMPT = 0.75             # ... and keeps at least 75% of the predicted prompt speed
KV_Q8_MIN_GAIN = 1.05                # q8_0 KV only when it buys at least 5% decode speed at the planned context
_ORDER_IN_LAYER = ("ffn_down", "ffn_up", "ffn_gate")   # a partial layer keeps these on the GPU first


@dataclass
class Settings:
    """What the user asks of a placement."""

    ctx: int = 4096                  # context per slot
    parallel: int = 1
    kv_type: str = "auto"            # f16, q8_0 or auto
    batch: int = 2048
    ubatch: int = 512
    threads: int | None = None
    margin_bytes: int | None = None  # None: DEFAULT_MARGIN, TRIAL_MARGIN after a trial run
    ubatch_auto: bool = True         # may halve -ub when weights stay in host memory and that frees GPU room
    depth: int | None = None         # context depth the decode prediction is for (default: ctx)
    n_prompt: int = 512
    load_mode: str | None = None     # llama.cpp --load-mode; None: calibration's choice for host-memory weights
    cpu_repack: bool | None = None   # host-memory weights in llama.cpp's CPU buffers (--no-host); None: when faster


@dataclass
class PoolUse:
    """Bytes one pool holds under a placement."""

    where: str                       # gpu | cpu
    capacity: int
    weights: int = 0
    kv: int = 0
    compute: int = 0
    overhead: int = 0
    margin: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead + self.margin

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass
class Placement:
    """A placement as plain data: where each tensor lives, the llama.cpp flags, memory and predicted speed."""

    model: str
    device: str
    backend: str
    settings: Settings
    kv_type: str
    flash_attn: str
    n_gpu_layers: int
    threads: int
    tensors: dict[str, str]          # tensor name -> gpu | cpu
    overrides: list[str]             # -ot rules, first match wins
    memory: dict[str, PoolUse]
    predicted: Prediction
    predicted_empty: Prediction      # decode at an empty context (what llama-bench tg measures)
    memory_source: str               # "llama-fit-params" or "estimate" (+ " and a trial run")
    factors_source: str
    load_mode: str = "auto"          # llama.cpp --load-mode (none: host-memory weights in llama.cpp's own buffers)
    cpu_repack: bool = False         # --no-host: host-memory weights in llama.cpp's CPU buffers, repacked where it can
    notes: list[str] = field(default_factory=list)

    def server_args(self) -> list[str]:
        """llama-server flags (besides model, host, port, ctx and parallel, which ServerConfig sets)."""
        args = self.common_args()
        return args[:2] + ["--fit", "off"] + args[2:]

    def common_args(self, rule_separator: str = ",") -> list[str]:
        """The placement's flags as every llama.cpp tool spells them (no context, no threads); llama-bench
        separates -ot rules with ';' instead of ',' and gives --no-host a value."""
        args = ["-ngl", str(self.n_gpu_layers), "-fa", self.flash_attn,
                "-b", str(self.settings.batch), "-ub", str(self.settings.ubatch)]
        if self.overrides:
            args += ["-ot", rule_separator.join(self.overrides)]
        if self.kv_type != "f16":
            args += ["-ctk", self.kv_type, "-ctv", self.kv_type]
        if self.load_mode != "auto":
            args += ["-lm", self.load_mode]
        if self.cpu_repack:
            args += ["--no-host", "1"] if rule_separator == ";" else ["--no-host"]
        return args

    def launch_args(self) -> list[str]:
        """All llama-server flags of the placement, context, slots and threads included."""
        s = self.settings
        return ["-c", str(s.ctx * s.parallel), "-np", str(s.parallel), "-t", str(self.threads), *self.server_args()]

    def bench_args(self) -> list[str]:
        """The same placement as llama-bench flags."""
        return self.common_args(rule_separator=";")

    @property
    def has_host_weights(self) -> bool:
        """Some weights (besides token_embd) stay in host memory while the layers run on a GPU."""
        return self.n_gpu_layers > 0 and bool(self.overrides)

    @property
    def cpu_expert_tensors(self) -> list[str]:
        """The routed-expert tensors that stay in host memory."""
        return [n for n, w in self.tensors.items() if w == "cpu" and "_exps" in n]

    @property
    def cpu_expert_layers(self) -> int:
        """How many layers keep at least one routed-expert tensor in host memory (--n-cpu-moe's unit)."""
        return len({int(n.split(".")[1]) for n in self.cpu_expert_tensors})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = {k: v.to_dict() for k, v in self.memory.items()}
        d["server_args"] = self.launch_args()
        d["bench_args"] = self.bench_args()
        return d


# ---------------------------------------------------------------- -ot rules

def _digits(a: int, b: int) -> str:
    return str(a) if a == b else f"[{a}-{b}]"


def _same_length(a: str, b: str) -> list[str]:
    """Patterns matching exactly the digit strings from a to b (same length, a <= b)."""
    if a == b:
        return [a]
    if len(a) == 1:
        return [_digits(int(a), int(b))]
    if a[0] == b[0]:
        return [a[0] + p for p in _same_length(a[1:], b[1:])]
    n = len(a) - 1
    out, first, last = [], int(a[0]), int(b[0])
    if a[1:] != "0" * n:
        out += [a[0] + p for p in _same_length(a[1:], "9" * n)]
        first += 1
    if b[1:] != "9" * n:
        last -= 1
    if first <= last:
        out.append(_digits(first, last) + "[0-9]" * n)
    if b[1:] != "9" * n:
        out += [b[0] + p for p in _same_length("0" * n, b[1:])]
    return out


def int_range_patterns(lo: int, hi: int) -> list[str]:
    """Regex alternatives matching exactly the integers lo..hi (no leading zeros)."""
    if lo > hi:
        return []
    if len(str(lo)) < len(str(hi)):
        top = 10 ** len(str(lo)) - 1
        return int_range_patterns(lo, top) + int_range_patterns(top + 1, hi)
    return _same_length(str(lo), str(hi))


def runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as maximal runs (first, last)."""
    out: list[tuple[int, int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def layers_pattern(layers: list[int]) -> str:
    parts = [p for lo, hi in runs(layers) for p in int_range_patterns(lo, hi)]
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def override_rules(cpu_tensors: list[str], buffer: str = "CPU") -> list[str]:
    """Compact -ot rules putting exactly these tensors in `buffer`: one rule per group of tensor kinds that sit
    on the same layers, e.g. blk\\.([0-9]|1[0-7])\\.(ffn_up_exps|ffn_gate_exps)\\.weight=CPU."""
    by_kind: dict[str, list[int]] = {}
    rules = []
    for name in sorted(cpu_tensors):
        m = re.match(r"^blk\.(\d+)\.(.+)$", name)
        if m:
            by_kind.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            rules.append(f"^{re.escape(name)}$={buffer}")
    by_layers: dict[tuple[int, ...], list[str]] = {}
    for kind, layers in sorted(by_kind.items()):
        by_layers.setdefault(tuple(sorted(layers)), []).append(kind)
    for layers, kinds in sorted(by_layers.items()):
        stems = [k.removesuffix(".weight") for k in kinds]
        if all(k.endswith(".weight") for k in kinds):
            body = (stems[0] if len(stems) == 1 else "(" + "|".join(stems) + ")") + r"\.weight"
        else:
            body = "(" + "|".join(re.escape(k) for k in kinds) + ")"
        rules.insert(0, rf"blk\.{layers_pattern(list(layers))}\.{body}={buffer}")
    if len(rules) > MAX_OVERRIDES:
        raise CcmoeError(f"the placement needs {len(rules)} tensor overrides, llama.cpp allows {MAX_OVERRIDES}",
                         "report this model; fewer distinct tensor kinds per layer would help")
    return rules


def rule_matches(rules: list[str], names: list[str]) -> set[str]:
    """Names the rules send somewhere (regex search, as llama.cpp does)."""
    patterns = [re.compile(r.rsplit("=", 1)[0]) for r in rules]
    return {n for n in names if any(p.search(n) for p in patterns)}


# ---------------------------------------------------------------- memory

def live_gpu_free_bytes(device: DeviceProfile) -> int | None:
    """Free GPU memory now (nvidia-smi), for `--device auto`: what another process holds is not ours."""
    if device.source != "auto":
        return None
    from .devices import read_nvidia_smi

    gpus = read_nvidia_smi()
    return gpus[0]["memory_free_mib"] * MIB if gpus else None


def pool_capacities(device: DeviceProfile) -> dict[str, int]:
    """Bytes llama.cpp may use per placement target: gpu (discrete or GPU-visible unified) and cpu."""
    reserve = int(device.os_reserve_gb * GB)
    caps: dict[str, int] = {}
    gpu, cpu, uni = device.pool("gpu"), device.pool("cpu"), device.pool("unified")
    if cpu:
        caps["cpu"] = max(cpu.usable_bytes - reserve, 0)
    if uni:
        caps["cpu"] = max(uni.usable_bytes - reserve, 0)
        if device.backend != "cpu":
            visible = int((uni.gpu_visible_gb or uni.capacity_gb) * GB)
            caps["gpu"] = min(visible, caps["cpu"])
    if gpu and device.backend != "cpu":
        caps["gpu"] = gpu.usable_bytes
        live = live_gpu_free_bytes(device)
        if live is not None:
            caps["gpu"] = min(caps["gpu"], live)
    return caps


def compute_estimate(inv: ModelInventory, ubatch: int, n_ctx: int, flash: bool) -> int:
    """llama.cpp's compute buffer for one batch, estimated from the shapes (activations, logits, attention)."""
    s = summarize(inv)
    n_embd = int(inv.key("embedding_length", 0) or 0)
    n_vocab = int(inv.key("vocab_size", 0) or 0) or next((t.shape[1] for t in inv.tensors
                                                          if t.name == "token_embd.weight"), 0)
    n_head = int(inv.key("attention.head_count", 1) or 1)
    n_ff_exp = int(inv.key("expert_feed_forward_length", 0) or 0)
    n_ff = int(inv.key("feed_forward_length", 0) or 0)
    act = ubatch * 4 * (n_vocab + 8 * n_embd + 3 * s.n_expert_used * n_ff_exp + 2 * n_ff)
    attn = ubatch * n_head * 4 * (256 if flash else n_ctx)
    return int(1.25 * (act + attn)) + 16 * MIB


def fit_print(engine: Engine, model: Path, args: list[str]) -> dict[str, dict[str, int]] | None:
    """llama.cpp's own dry-run memory estimate (bytes of model, context and compute per device), or None when
    the engine has no llama-fit-params."""
    if not engine.has_tool("llama-fit-params"):
        return None
    cmd = [str(engine.tool("llama-fit-params")), "-m", str(model), "--fit-print", "on", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            found[parts[0]] = {k: int(v) * MIB + MIB for k, v in zip(("model", "context", "compute"), parts[1:])}
    return found if out.returncode == 0 and found else None


# ---------------------------------------------------------------- placing

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


@dataclass
class _Context:
    """What one placement search works with."""

    inv: ModelInventory
    device: DeviceProfile
    factors: Factors
    settings: Settings
    loads: list[TensorLoad]
    main: str
    n_layers: int


def _predict(cx: _Context, where: dict[str, str], kv_type: str, depth: int) -> Prediction:
    return predict(cx.loads, where, cx.device, cx.factors, cx.n_layers,
                   kv_bytes_per_token(cx.inv, KV_TYPES[kv_type]), depth, cx.settings.n_prompt,
                   cx.settings.ubatch, cx.main)


def _flash(device: DeviceProfile, kv_type: str) -> str:
    return "on" if kv_type != "f16" else "auto"


def _llama_args(cx: _Context, where: dict[str, str], kv_type: str) -> tuple[list[str], list[str]]:
    """(-ot rules, llama-fit-params flags) for a placement."""
    cpu = [n for n, w in where.items() if w == "cpu" and not n.startswith("token_embd.")] if cx.main == "gpu" else []
    rules = override_rules(cpu)
    s = cx.settings
    args = ["-c", str(s.ctx * s.parallel), "-np", str(s.parallel), "-ngl", "999" if cx.main == "gpu" else "0",
            "-b", str(s.batch), "-ub", str(s.ubatch), "-fa", _flash(cx.device, kv_type)]
    if rules:
        args += ["-ot", ",".join(rules)]
    if kv_type != "f16":
        args += ["-ctk", kv_type, "-ctv", kv_type]
    return rules, args


def _memory(cx: _Context, where: dict[str, str], kv_type: str, measured: dict | None,
            caps: dict[str, int]) -> dict[str, PoolUse]:
    """Bytes per pool: the placed weights, KV cache and compute buffers (measured when llama.cpp told us)."""
    s = cx.settings
    kv = int(kv_bytes_per_token(cx.inv, KV_TYPES[kv_type]) * s.ctx * s.parallel)
    margin = DEFAULT_MARGIN if s.margin_bytes is None else s.margin_bytes
    use = {p: PoolUse(p, caps.get(p, 0), margin=margin) for p in {"cpu", cx.main}}
    for ld in cx.loads:
        use[where[ld.name]].weights += ld.n_bytes
    use[cx.main].kv = kv
    compute = compute_estimate(cx.inv, s.ubatch, s.ctx * s.parallel, _flash(cx.device, kv_type) == "on")
    use[cx.main].compute = compute
    if cx.main == "gpu":
        use["gpu"].overhead = cx.factors.gpu_overhead_bytes
        use["cpu"].compute = compute // 4
    use["cpu"].overhead += cx.factors.host_overhead_bytes
    if measured:
        gpu_name = next((k for k in measured if k != "Host"), None)
        if cx.main == "gpu" and gpu_name:
            m = measured[gpu_name]
            use["gpu"].kv, use["gpu"].compute = m["context"], m["compute"]
            use["gpu"].weights = max(use["gpu"].weights, m["model"])
        if "Host" in measured:
            m = measured["Host"]
            use["cpu"].compute = m["compute"] + (m["context"] if cx.main == "gpu" else 0)
            if cx.main == "cpu":
                use["cpu"].kv = m["context"]
    if "gpu" in use and cx.device.pool("unified"):
        use["cpu"].capacity = max(caps.get("cpu", 0) - use["gpu"].total, 0)
    return use


def _fits(use: dict[str, PoolUse]) -> bool:
    return all(u.total <= u.capacity for u in use.values())


def _place_once(cx: _Context, kv_type: str, engine: Engine | None, model: Path | None,
                caps: dict[str, int]) -> tuple[dict[str, str], dict[str, PoolUse], str]:
    """Greedy placement for one KV type, refined with llama.cpp's measured memory when available."""
    if cx.main == "cpu":
        where = {ld.name: "cpu" for ld in cx.loads}
        measured = fit_print(engine, model, _llama_args(cx, where, kv_type)[1]) if engine and model else None
        return where, _memory(cx, where, kv_type, measured, caps), "llama-fit-params" if measured else "estimate"
    empty = _memory(cx, {ld.name: "cpu" for ld in cx.loads}, kv_type, None, caps)["gpu"]
    budget = empty.capacity - empty.kv - empty.compute - empty.overhead - empty.margin
    source = "estimate"
    where: dict[str, str] = {}
    use: dict[str, PoolUse] = {}
    fitting = None
    for _ in range(8):
        where = choose_layout(cx.loads, budget, [density, lambda ld: gpu_value(ld, cx.device, cx.factors)],
                              lambda w: _predict(cx, w, kv_type, cx.settings.depth))
        measured = fit_print(engine, model, _llama_args(cx, where, kv_type)[1]) if engine and model else None
        use = _memory(cx, where, kv_type, measured, caps)
        if not measured:
            break
        source = "llama-fit-params"
        if _fits(use):
            fitting = (where, use)
        slack = use["gpu"].capacity - use["gpu"].total
        movable = [ld.n_bytes for ld in cx.loads if where[ld.name] == "cpu" and not ld.name.startswith("token_embd.")]
        if slack >= 0 and (not movable or min(movable) > slack):
            break                                      # nothing left on the CPU fits into what is free
        budget += slack if slack >= 0 else slack - 32 * MIB   # over: step back a little further than the excess
    if fitting and not _fits(use):
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
    cx = _Context(inv, device, factors, settings, tensor_loads(inv, stats), main_pool(device), s.n_layers)
    caps = pool_capacities(device)
    if not caps:
        raise CcmoeError(f"device {device.name} has no memory pool to place weights in", "fix the device profile")
    kv_types = ["f16", "q8_0"] if settings.kv_type == "auto" else [check_kv_type(settings.kv_type)]
    best = None
    for kv_type in kv_types:
        where, use, source = _place_once(cx, kv_type, engine, model, caps)
        pred = _predict(cx, where, kv_type, depth)
        better = best is None or (_fits(use) and not _fits(best[2])) or \
            (_fits(use) == _fits(best[2]) and pred.decode_tps > best[3].decode_tps * KV_Q8_MIN_GAIN)
        if better:
            best = (kv_type, where, use, pred, source)
    kv_type, where, use, pred, source = best
    if not _fits(use):
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
                     flash_attn=_flash(device, kv_type), n_gpu_layers=999 if cx.main == "gpu" else 0,
                     threads=_threads(settings, device, factors, hybrid), tensors=where, overrides=rules, memory=use,
                     predicted=pred, predicted_empty=_predict(cx, where, kv_type, 0), memory_source=source,
                     factors_source=factors.source, load_mode=_load_mode(settings, factors, hybrid),
                     cpu_repack=bool(settings.cpu_repack) and hybrid, notes=uncalibrated_types(cx.loads, where, factors))


def uncalibrated_types(loads: list[TensorLoad], where: dict[str, str], factors: Factors) -> list[str]:
    """A note naming the weight types this host's calibration did not measure in the pool that holds them (their
    speed is the profile's guess), with the command that measures them."""
    if not factors.source.startswith("measured"):
        return []
    missing = sorted({ld.ggml_type.lower() for ld in loads if ld.ggml_type.lower() != "f32"
                      and not ld.name.startswith("token_embd.")          # one row read per token
                      and f"{where.get(ld.name, 'gpu')}:{ld.ggml_type.lower()}" not in factors.efficiency
                      and ld.n_bytes * ld.read_share > 0})
    if not missing:
        return []
    measured = sorted({k.split(":")[1] for k in factors.efficiency})
    return [f"no calibrated speed for {', '.join(missing)} on this host (guessed from the profile): "
            f"`ccmoe-run calibrate --types {','.join(measured + missing)}` measures them"]


def _load_mode(settings: Settings, factors: Factors, hybrid: bool) -> str:
    """The user's load mode, else the one calibration measured best for weights in host memory next to a GPU."""
    return settings.load_mode or (factors.cpu_load_mode if hybrid else "auto")


def _threads(settings: Settings, device: DeviceProfile, factors: Factors, hybrid: bool) -> int:
    """The user's count, else the measured best for host-memory experts next to a GPU, else the profile's; never
    more than this process may use."""
    if settings.threads:
        return settings.threads
    from .serve import environment_threads

    wanted = factors.cpu_threads if hybrid and factors.cpu_threads else device.threads
    return max(1, min(wanted, environment_threads()))


TRIAL_BACKOFFS = (128 * MIB, 512 * MIB)   # after a failed trial run: GPU memory held back, least first


def tune_by_trial(first: Placement, inv: ModelInventory, device: DeviceProfile, factors: Factors,
                  settings: Settings, engine: Engine, model: Path, stats: dict | None) -> Placement:
    """Run the placement once (llama-bench, 512-token prompt, 16 tokens) and measure the GPU memory the process
    takes beyond llama.cpp's own buffers; place again with that overhead instead of the calibrated one, and keep
    the new placement only when it runs too. A first placement that does not run is placed again with more GPU
    memory held back, in steps (TRIAL_BACKOFFS), and the first of those that runs is kept."""
    from .calibrate import run_overhead

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


def _check_rules(rules: list[str], where: dict[str, str], cx: _Context) -> None:
    """The -ot rules select exactly the tensors placed on the CPU (token_embd is there anyway)."""
    if cx.main != "gpu":
        return
    want = {n for n, w in where.items() if w == "cpu" and not n.startswith("token_embd.")}
    got = rule_matches(rules, [n for n in where if not n.startswith("token_embd.")])
    if want != got:
        raise CcmoeError(f"internal error: -ot rules select {len(got)} tensors, the placement {len(want)}",
                         "report this model to the ccmoe-runtime developers")


# ---------------------------------------------------------------- artifact and summary

def save_placement(p: Placement, path: Path) -> Path:
    from .artifacts import save_artifact

    return save_artifact(path, PLACEMENT_KIND, PLACEMENT_VERSION, p.to_dict())


def load_placement(path: Path) -> dict:
    from .artifacts import load_artifact

    return load_artifact(path, PLACEMENT_KIND, PLACEMENT_VERSION)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _short(name: str) -> str:
    return name.split(".", 2)[2].removesuffix(".weight") if name.startswith("blk.") else name.removesuffix(".weight")


def layer_rows(p: Placement) -> list[tuple[str, str]]:
    """One row per run of layers placed alike: ("0-17", "GPU: attn_*, ... | CPU: ffn_up_exps, ...")."""
    layers: dict[int, dict[str, list[str]]] = {}
    for name, w in p.tensors.items():
        m = re.match(r"^blk\.(\d+)\.", name)
        if m:
            layers.setdefault(int(m.group(1)), {"gpu": [], "cpu": []})[w].append(_short(name))
    rows: list[tuple[list[int], str]] = []
    for layer in sorted(layers):
        d = layers[layer]
        text = " | ".join(f"{w.upper()}: {_compact(sorted(d[w]))}" for w in ("gpu", "cpu") if d[w])
        if rows and rows[-1][1] == text and rows[-1][0][-1] == layer - 1:
            rows[-1][0].append(layer)
        else:
            rows.append(([layer], text))
    return [(f"{r[0][0]}" if len(r[0]) == 1 else f"{r[0][0]}-{r[0][-1]}", r[1]) for r in rows]


def _compact(names: list[str]) -> str:
    """attn_q, attn_k, attn_v -> attn_{k,q,v}; ffn_up_exps, ffn_gate_exps -> ffn_{gate,up}_exps."""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        m = re.match(r"^(attn|ffn)_([a-z0-9]+)(.*)$", n)
        key = (m.group(1), m.group(3)) if m else (n, "")
        groups.setdefault(key, []).append(m.group(2) if m else "")
    out = []
    for (head, tail), mids in groups.items():
        mids = [x for x in mids if x]
        out.append(f"{head}_{mids[0]}{tail}" if len(mids) == 1 else f"{head}_{{{','.join(mids)}}}{tail}" if mids else head)
    return ", ".join(out)


def summary_lines(p: Placement) -> list[str]:
    """A readable summary: flags, memory per pool, predicted speed, and where each layer's tensors live."""
    s = p.settings
    lines = [f"placement of {Path(p.model).name} on {p.device} ({p.backend}): ctx {s.ctx} x {s.parallel} slot(s), "
             f"KV {p.kv_type}, flash attention {p.flash_attn}, {p.threads} threads, -b {s.batch} -ub {s.ubatch}"]
    for u in p.memory.values():
        lines.append(f"  {u.where.upper():<4} {_gb(u.total)} of {_gb(u.capacity)}: weights {_gb(u.weights)}, "
                     f"KV {_gb(u.kv)}, compute {_gb(u.compute)}, overhead {_gb(u.overhead)}, margin {_gb(u.margin)}")
    lines.append(f"  memory from {p.memory_source}; speed factors from {p.factors_source}")
    if s.load_mode:
        lines.append(f"  --load-mode {p.load_mode}: as asked")
    elif p.load_mode != "auto":
        lines.append(f"  --load-mode {p.load_mode}: host-memory weights in llama.cpp's own buffers (chosen by calibration)")
    lines += [f"  note: {n}" for n in p.notes]
    pe, pf = p.predicted_empty, p.predicted
    lines.append(f"  predicted: prompt {pe.prompt_tps:,.0f} tok/s ({pe.n_prompt}-token prompt), generation "
                 f"{pe.decode_tps:,.1f} tok/s (empty context), {pf.decode_tps:,.1f} tok/s at {pf.depth} tokens")
    reads = ", ".join(f"{k.upper()} {_gb(v)}" for k, v in pf.bytes_per_token.items())
    lines.append(f"  bytes read per generated token at {pf.depth} tokens: {reads}; CPU<->GPU splits {pf.splits}")
    if p.overrides:
        lines.append(f"  -ot {','.join(p.overrides)}")
    lines.append("  layers  where")
    lines += [f"  {span:<7} {text}" for span, text in layer_rows(p)]
    other = {_short(n): w for n, w in p.tensors.items() if not n.startswith("blk.")}
    if other:
        lines.append("  other   " + ", ".join(f"{n} {w.upper()}" for n, w in sorted(other.items())))
    return lines


def repredict(p: Placement, inv: ModelInventory, device: DeviceProfile, factors: Factors, n_prompt: int, depth: int,
              stats: dict | None = None) -> Prediction:
    """The placement's predicted speed for another prompt length and context depth (e.g. a warm-up request)."""
    factors = factors.with_repack() if p.cpu_repack else factors
    return predict(tensor_loads(inv, stats), p.tensors, device, factors, summarize(inv).n_layers,
                   kv_bytes_per_token(inv, KV_TYPES[p.kv_type]), depth, max(n_prompt, 1), p.settings.ubatch,
                   main_pool(device))
