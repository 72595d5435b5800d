"""Memory: what each pool can hold and what a placement puts in it (weights, KV cache, compute, overhead)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.units import GB, MIB
from ..devices.detect import read_nvidia_smi
from ..devices.profiles import DeviceProfile
from ..model.inventory import ModelInventory, kv_bytes_per_token, summarize
from .costmodel import KV_TYPES, Factors, TensorLoad
from .layout import PoolUse, Settings

DEFAULT_MARGIN = 256 * MIB           # free memory left in each pool beyond the measured needs
TRIAL_MARGIN = 128 * MIB             # ... once a trial run has measured what the process really takes (CUDA)


def live_gpu_free_bytes(device: DeviceProfile) -> int | None:
    """Free GPU memory now (nvidia-smi), for `--device auto`: what another process holds is not ours."""
    if device.source != "auto":
        return None

    gpus = read_nvidia_smi(links=False)
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
            caps["gpu"] = min(gpu_visible_bytes(device), caps["cpu"])
    if gpu and device.backend != "cpu":
        caps["gpu"] = gpu.usable_bytes
        live = live_gpu_free_bytes(device)
        if live is not None:
            caps["gpu"] = min(caps["gpu"], live)
    return caps


def gpu_visible_bytes(device: DeviceProfile) -> int:
    """What the GPU of a unified-memory device may allocate: the BIOS carve-out under ROCm (hipMalloc stays inside
    it), else the GPU-visible size (GTT with Vulkan, Metal's working-set limit), else all of the pool."""
    uni = device.pool("unified")
    if device.backend == "hip" and uni.carve_out_gb:
        return int(uni.carve_out_gb * GB)
    return int((uni.gpu_visible_gb or uni.capacity_gb) * GB)


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


@dataclass
class SearchContext:
    """What one placement search works with."""

    inv: ModelInventory
    device: DeviceProfile
    factors: Factors
    settings: Settings
    loads: list[TensorLoad]
    main: str
    n_layers: int


def flash_mode(device: DeviceProfile, kv_type: str) -> str:
    return "on" if kv_type != "f16" else "auto"


def pool_use(cx: SearchContext, where: dict[str, str], kv_type: str, measured: dict | None,
            caps: dict[str, int]) -> dict[str, PoolUse]:
    """Bytes per pool: the placed weights, KV cache and compute buffers (measured when llama.cpp told us)."""
    s = cx.settings
    kv = int(kv_bytes_per_token(cx.inv, KV_TYPES[kv_type]) * s.ctx * s.parallel)
    margin = DEFAULT_MARGIN if s.margin_bytes is None else s.margin_bytes
    use = {p: PoolUse(p, caps.get(p, 0), margin=margin) for p in {"cpu", cx.main}}
    for ld in cx.loads:
        use[where[ld.name]].weights += ld.n_bytes
    use[cx.main].kv = kv
    compute = compute_estimate(cx.inv, s.ubatch, s.ctx * s.parallel, flash_mode(cx.device, kv_type) == "on")
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


def fits(use: dict[str, PoolUse]) -> bool:
    return all(u.total <= u.capacity for u in use.values())
