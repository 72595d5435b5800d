"""Cost model: predicted prompt and decode tokens/s of a placement of a GGUF's tensors on a device.

Decode is bound by bytes read per token: every dense, attention and shared tensor once, routed experts by their
activation frequency (k/E without measurements), the KV cache at the context depth; each divided by the bandwidth
of the pool holding it times a per-(pool, type) efficiency, plus a fixed cost per layer and per CPU<->GPU split.
Prompt processing is compute-bound: FLOPs over measured throughput, with CPU-resident weights copied to the GPU
over the link for batches of 32 tokens or more (llama.cpp's GGML_OP_OFFLOAD_MIN_BATCH).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..core.artifacts import load_artifact, save_artifact
from ..core.errors import CcmoeError
from ..core.paths import cache_root
from ..core.units import GB, MIB
from ..devices.detect import _cpu_name, read_nvidia_smi
from ..devices.profiles import DeviceProfile
from ..model.inventory import ModelInventory, summarize

CALIBRATION_VERSION = 1
CALIBRATION_KIND = "calibration"
OLD_CALIBRATION_KIND = "host-profile"     # what calibrations were called before 0.2
KV_TYPES = {"f16": 2.0, "q8_0": 34 / 32}
OFFLOAD_MIN_BATCH = 32          # llama.cpp copies CPU weights to the GPU for batches of at least this many tokens

# Defaults when this host has not been calibrated (`ccmoe-run calibrate`); see docs/placement.md.
DEFAULT_EFFICIENCY = {"gpu": 0.6, "cpu": 0.55}
SLOW_TYPE_EFFICIENCY = 0.5      # multiplier for a device's slow_types
DEFAULT_LAYER_S = {"cuda": 20e-6, "hip": 30e-6, "vulkan": 40e-6, "metal": 30e-6, "cpu": 15e-6}
DEFAULT_TOKEN_S = 200e-6        # sampling, output head launch, synchronisation
DEFAULT_SPLIT_S = 60e-6         # one CPU<->GPU round trip inside a decoded token
DEFAULT_PP_TFLOPS = {"cuda": 150.0, "hip": 80.0, "vulkan": 30.0, "metal": 20.0}
DEFAULT_CPU_GFLOPS_PER_THREAD = 25.0
DEFAULT_GPU_OVERHEAD = 768 * MIB     # CUDA context, cuBLAS handles and pools outside llama.cpp's own buffers
DEFAULT_HOST_OVERHEAD = 160 * MIB    # llama-server's code, threads and HTTP buffers
NARROW_WIDTH, WIDE_WIDTH = 256, 2048  # hidden sizes of calibrate's two pairs of small models (GPU hosts: both)


@dataclass
class Factors:
    """Host-specific numbers the predictor multiplies and adds; measured by `calibrate` or defaults."""

    efficiency: dict[str, float]          # "gpu:q8_0", "cpu:*" ...: achieved share of the pool's bandwidth in decode
    layer_s: float                        # per layer per decoded token (kernel launches, norms, attention)
    token_s: float                        # fixed per decoded token
    split_s: float                        # per CPU<->GPU round trip per decoded token
    pp_flops: dict[str, float]            # "gpu" / "cpu": FLOP/s in prompt processing
    pp_layer_s: float = 0.0               # per layer per prompt batch
    pp_batch_s: float = 0.0               # fixed per prompt batch
    link_gbs: float | None = None         # CPU->GPU copy rate for offloaded batches
    offload_gbs: dict[str, float] = field(default_factory=dict)   # per weight type, measured offload rate
    gpu_overhead_bytes: int = DEFAULT_GPU_OVERHEAD
    host_overhead_bytes: int = DEFAULT_HOST_OVERHEAD
    cpu_load_mode: str = "auto"           # llama.cpp --load-mode for weights in host memory next to a GPU (measured)
    cpu_threads: int | None = None        # threads for CPU-resident weights next to a GPU (measured)
    layer_s_wide: float | None = None     # layer_s of WIDE_WIDTH-wide layers (layer_s is of NARROW_WIDTH ones)
    # Host-memory experts in llama.cpp's CPU buffers instead of the GPU backend's pinned ones (llama.cpp --no-host):
    # Q4_0/Q4_K/IQ4_NL/MXFP4 (x86) are then repacked for faster CPU kernels, but prompt batches are no longer copied
    # to the GPU for them. {"efficiency": {"cpu:q4_k": ...}, "offload_gbs": {...}} as measured that way; empty: not.
    repack: dict = field(default_factory=dict)
    source: str = "defaults"

    @property
    def measured(self) -> bool:
        """Whether `calibrate` measured these factors on this host (else they are the profile's defaults)."""
        return self.source.startswith("measured")

    def layer_cost(self, width: int | None) -> float:
        """Seconds per layer per decoded token for layers `width` wide: between the two measured widths
        interpolated, outside them the nearer measurement (no extrapolation)."""
        if self.layer_s_wide is None or not width:
            return self.layer_s
        x = min(max((width - NARROW_WIDTH) / (WIDE_WIDTH - NARROW_WIDTH), 0.0), 1.0)
        return self.layer_s + x * (self.layer_s_wide - self.layer_s)

    def eff(self, where: str, ggml_type: str, slow_types: list[str] | None = None) -> float:
        """Efficiency of decode reads of `ggml_type` from `where` (gpu, cpu or unified): as measured, else the
        lowest efficiency measured in that pool (a calibrated pool's scale, not the profile's guess), else the
        default; a device's slow type not measured counts at SLOW_TYPE_EFFICIENCY of that."""
        t = ggml_type.lower()
        value = self.efficiency.get(f"{where}:{t}") or self.efficiency.get(f"{where}:*") \
            or self.pool_floor(where) or DEFAULT_EFFICIENCY.get(where, 0.5)
        if slow_types and t in [s.lower() for s in slow_types] and f"{where}:{t}" not in self.efficiency:
            value *= SLOW_TYPE_EFFICIENCY
        return value

    def pool_floor(self, where: str) -> float | None:
        """The lowest efficiency calibration measured for any type in `where`, None when it measured none."""
        measured = [v for k, v in self.efficiency.items() if k.startswith(f"{where}:") and v > 0]
        return min(measured) if measured else None

    def with_repack(self) -> "Factors":
        """These factors with host-memory weights in llama.cpp's (repacking) CPU buffers, as calibrated."""
        offload = {**self.offload_gbs, **self.repack.get("offload_gbs", {})}
        return replace(self, efficiency={**self.efficiency, **self.repack.get("efficiency", {})}, offload_gbs=offload,
                       link_gbs=max(offload.values()) if offload else self.link_gbs)


def default_factors(device: DeviceProfile) -> Factors:
    """Factors from the device profile's figures when nothing was measured."""
    gpu_flops = DEFAULT_PP_TFLOPS.get(device.backend, 0.0) * 1e12
    cpu_flops = DEFAULT_CPU_GFLOPS_PER_THREAD * 1e9 * max(device.threads, 1)
    return Factors(efficiency={}, layer_s=DEFAULT_LAYER_S.get(device.backend, 30e-6), token_s=DEFAULT_TOKEN_S,
                   split_s=DEFAULT_SPLIT_S, pp_flops={"gpu": gpu_flops or cpu_flops, "cpu": cpu_flops},
                   link_gbs=device.link_bandwidth_gbs, source=f"defaults from device profile {device.name}")


# ---------------------------------------------------------------- calibrations (artifacts of `calibrate`)

def host_fingerprint() -> dict:
    """What identifies this host for a calibration: CPU model, core count and GPU names."""
    import psutil

    return {"cpu": _cpu_name(), "cores": psutil.cpu_count(logical=False) or 0, "machine": platform.machine(),
            "gpus": [g["name"] for g in read_nvidia_smi(links=False)]}


def calibration_path(device: DeviceProfile, backend: str | None = None) -> Path:
    """Where `calibrate` stores its calibration for this device and this host (in the cache dir)."""
    fp = hashlib.sha256(json.dumps(host_fingerprint(), sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / "calibrations" / f"{device.name}-{backend or device.backend}-{fp}.json"


def save_calibration(path: Path, factors: Factors, extra: dict, force: bool = True) -> Path:
    return save_artifact(path, CALIBRATION_KIND, CALIBRATION_VERSION,
                         {"host": host_fingerprint(), "factors": asdict(factors), **extra}, force=force)


def load_calibration(path: Path) -> dict:
    """A calibration artifact (also one saved under its old kind, host-profile)."""
    try:
        return load_artifact(path, CALIBRATION_KIND, CALIBRATION_VERSION)
    except CcmoeError:
        return load_artifact(path, OLD_CALIBRATION_KIND, CALIBRATION_VERSION)


def factors_from_doc(doc: dict, source: str) -> Factors:
    f = dict(doc["factors"])
    f["source"] = source
    return Factors(**f)


def load_factors(device: DeviceProfile, path: Path | None = None) -> Factors:
    """The measured factors for this host and device when `calibrate` ran, else the profile's defaults."""

    path = Path(path) if path else calibration_path(device)
    if not path.is_file():
        return default_factors(device)
    doc = load_calibration(path)
    return factors_from_doc(doc, f"measured ({path})")


# ---------------------------------------------------------------- what a token reads

@dataclass
class TensorLoad:
    """One tensor as the cost model sees it."""

    name: str
    layer: int | None
    cls: str
    ggml_type: str
    n_bytes: int
    n_elements: int
    read_share: float                     # expected share of the tensor read per decoded token
    expert_freq: list[float] | None = None   # per expert: share of tokens routed to it (routed experts only)

    def share_for_batch(self, batch: int) -> float:
        """Share of the tensor a batch of `batch` tokens touches (an expert once, however many tokens use it)."""
        if self.expert_freq is None:
            return min(1.0, self.read_share * batch) if self.name.startswith("token_embd.") else self.read_share
        if batch <= 1:
            return self.read_share
        return sum(1.0 - (1.0 - min(f, 1.0)) ** batch for f in self.expert_freq) / len(self.expert_freq)


def layer_frequencies(stats: dict | None) -> dict[int, list[float]]:
    """Per layer, the share of tokens routed to each expert, from an expert-stats artifact."""
    if not stats:
        return {}
    return {int(k): [float(x) for x in v["frequency"]] for k, v in stats.get("layers", {}).items()}


def tensor_loads(inv: ModelInventory, stats: dict | None = None) -> list[TensorLoad]:
    """Every tensor with the share of it one decoded token reads."""
    s = summarize(inv)
    freqs = layer_frequencies(stats)
    vocab = int(inv.key("vocab_size", 0) or 0)
    loads = []
    for t in inv.tensors:
        cls, freq = t.tensor_class, None
        share = 1.0
        if cls == "routed_expert" and s.n_expert:
            freq = freqs.get(t.layer) if t.layer is not None else None
            if freq is not None and len(freq) != s.n_expert:
                freq = None
            freq = freq or [s.n_expert_used / s.n_expert] * s.n_expert
            share = sum(min(f, 1.0) for f in freq) / s.n_expert
        elif t.name.startswith("token_embd."):
            rows = vocab or (t.shape[1] if len(t.shape) > 1 else 1)
            share = 1.0 / max(rows, 1)
        loads.append(TensorLoad(t.name, t.layer, cls, t.ggml_type, t.n_bytes, t.n_elements, share, freq))
    return loads


# ---------------------------------------------------------------- predictions

@dataclass
class Prediction:
    """Predicted speed of one placement."""

    decode_tps: float                      # one stream, at the given context depth
    prompt_tps: float                      # prompt of n_prompt tokens in batches of ubatch
    depth: int
    n_prompt: int
    bytes_per_token: dict[str, float]      # pool -> bytes read per decoded token (weights + KV)
    seconds_per_token: dict[str, float] = field(default_factory=dict)   # the terms of the decode time
    splits: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def pool_bandwidth(device: DeviceProfile, where: str) -> float:
    """Bytes/s of the memory behind `where` (gpu or cpu); a unified device has one pool for both."""
    pool = device.pool(where) or device.pool("unified") or device.pools[0]
    return pool.bandwidth_gbs * GB


def main_pool(device: DeviceProfile) -> str:
    """Where llama.cpp runs the layers: the GPU (discrete or unified memory) unless the backend is the CPU."""
    return "cpu" if device.backend == "cpu" else "gpu"


def count_splits(loads: list[TensorLoad], where: dict[str, str], main: str) -> int:
    """Decoded-token round trips between backends: one per layer holding tensors off the main backend."""
    if main == "cpu":
        return 0
    layers = {ld.layer for ld in loads if ld.layer is not None and where.get(ld.name, main) != main}
    return len(layers)


def model_width(loads: list[TensorLoad]) -> int | None:
    """The model's hidden size: the length of its final norm's weight vector."""
    return next((ld.n_elements for ld in loads if ld.name == "output_norm.weight"), None)


def predict(loads: list[TensorLoad], where: dict[str, str], device: DeviceProfile, factors: Factors,
            n_layers: int, kv_bytes_per_token: float = 0.0, depth: int = 0, n_prompt: int = 512,
            ubatch: int = 512, main: str | None = None) -> Prediction:
    """Decode and prompt speed of a placement (`where`: tensor name -> gpu or cpu)."""
    main = main or main_pool(device)
    terms = {"fixed": factors.token_s + n_layers * factors.layer_cost(model_width(loads))}
    splits = count_splits(loads, where, main)
    terms["splits"] = splits * factors.split_s
    read: dict[str, float] = {}
    for ld in loads:
        pool = where.get(ld.name, main)
        b = ld.n_bytes * ld.read_share
        read[pool] = read.get(pool, 0.0) + b
        terms[pool] = terms.get(pool, 0.0) + b / (pool_bandwidth(device, pool) * factors.eff(pool, ld.ggml_type,
                                                                                             device.slow_types))
    kv = kv_bytes_per_token * depth
    if kv:
        read[main] = read.get(main, 0.0) + kv
        terms["kv"] = kv / (pool_bandwidth(device, main) * factors.eff(main, "f16"))
    decode = 1.0 / sum(terms.values())
    prompt = predict_prompt(loads, where, device, factors, n_layers, n_prompt, ubatch, main, splits,
                            sum(v for k, v in terms.items() if k != "kv"))
    return Prediction(round(decode, 2), round(prompt, 2), depth, n_prompt, {k: round(v) for k, v in read.items()},
                      {k: v for k, v in terms.items()}, splits)


def predict_prompt(loads: list[TensorLoad], where: dict[str, str], device: DeviceProfile, factors: Factors,
                   n_layers: int, n_prompt: int, ubatch: int, main: str, splits: int, pass_s: float = 0.0) -> float:
    """Prompt tokens/s: per batch, FLOPs over throughput plus the copies of CPU weights for offloaded batches, plus
    the per-token work measured on 512-token batches; never less than one pass over the weights (`pass_s`)."""
    total = 0.0
    left = n_prompt
    while left > 0:
        u = min(ubatch, left)
        left -= u
        t = (factors.pp_batch_s + n_layers * factors.pp_layer_s) * u / 512 + splits * factors.split_s
        for ld in loads:
            flops = 2.0 * u * ld.n_elements * ld.read_share if not ld.name.startswith("token_embd.") else 0.0
            pool = where.get(ld.name, main)
            rate = factors.offload_gbs.get(ld.ggml_type.lower()) or factors.link_gbs or device.link_bandwidth_gbs
            if pool == "cpu" and main != "cpu" and u >= OFFLOAD_MIN_BATCH and rate:
                link = rate * GB
                t += ld.n_bytes * ld.share_for_batch(u) / link + flops / factors.pp_flops["gpu"]
            elif pool == "cpu":
                t += flops / factors.pp_flops["cpu"]
            else:
                t += flops / factors.pp_flops["gpu"]
        total += max(t, pass_s)
    return n_prompt / total if total > 0 else 0.0


def check_kv_type(kv_type: str) -> str:
    if kv_type not in KV_TYPES:
        raise CcmoeError(f"unknown KV cache type {kv_type!r}", f"choose one of: {', '.join(KV_TYPES)}")
    return kv_type
