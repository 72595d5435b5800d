"""Device profiles: memory pools, bandwidths and backend facts of a target machine."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import CcmoeError

GIB = 1024**3
GB = 1000**3
POOL_KINDS = ("gpu", "cpu", "unified")


@dataclass
class MemoryPool:
    """One memory the weights can live in."""

    name: str
    kind: str                      # gpu | cpu | unified
    capacity_gb: float             # installed size, GB (10^9 bytes)
    usable_fraction: float         # share a model may take after drivers and fragmentation
    bandwidth_gbs: float           # sustained read bandwidth, GB/s
    gpu_visible_gb: float | None = None  # unified memory: the part the GPU may map (a setting)

    @property
    def usable_bytes(self) -> int:
        return int(self.capacity_gb * GB * self.usable_fraction)


@dataclass
class DeviceProfile:
    """A named target machine."""

    name: str
    description: str
    backend: str                   # llama.cpp backend: cpu, cuda, metal, vulkan, hip
    threads: int
    os_reserve_gb: float           # memory left for the OS and other programs
    pools: list[MemoryPool]
    link_bandwidth_gbs: float | None = None  # CPU<->GPU copies (PCIe, or the APU's fabric)
    slow_types: list[str] = field(default_factory=list)
    unsupported_types: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what --device auto measured or assumed
    source: str = ""

    def pool(self, kind: str) -> MemoryPool | None:
        return next((p for p in self.pools if p.kind == kind), None)

    def to_dict(self) -> dict:
        return asdict(self)


def profiles_dir() -> Path:
    return Path(os.environ.get("CCMOE_PROFILES_DIR") or Path(__file__).resolve().parent.parent / "profiles")


def _parse_profile(data: dict, source: str) -> DeviceProfile:
    try:
        pools = [MemoryPool(**p) for p in data.pop("pools")]
        profile = DeviceProfile(pools=pools, source=source, **data)
    except (KeyError, TypeError) as e:
        raise CcmoeError(f"device profile {source} is malformed ({e})",
                         "compare it with profiles/cpu.toml and fix the field named") from None
    for p in profile.pools:
        if p.kind not in POOL_KINDS:
            raise CcmoeError(f"device profile {source}: pool {p.name!r} has kind {p.kind!r}",
                             f"use one of {', '.join(POOL_KINDS)}")
        if not 0 < p.usable_fraction <= 1:
            raise CcmoeError(f"device profile {source}: pool {p.name!r} usable_fraction must be in (0, 1]",
                             "fix the value")
    return profile


def load_profile_file(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise CcmoeError(f"device profile {path} is not valid TOML ({e})", "fix the file") from None
    return _parse_profile(data, str(path))


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def list_profiles() -> list[DeviceProfile]:
    return [load_profile_file(profiles_dir() / f"{n}.toml") for n in profile_names()]


def get_profile(name: str) -> DeviceProfile:
    """A profile by name, a path to a TOML file, or `auto` for this host."""
    if name == "auto":
        return detect_host()
    if name.endswith(".toml") and Path(name).is_file():
        return load_profile_file(Path(name))
    path = profiles_dir() / f"{name}.toml"
    if not path.is_file():
        raise CcmoeError(f"unknown device {name!r}",
                         f"choose one of: {', '.join(profile_names())}, auto, or a path to a profile .toml")
    return load_profile_file(path)


# ---------------------------------------------------------------- --device auto

@dataclass
class HostFacts:
    """Raw readings taken on a host; `detect_host` turns them into a profile."""

    system: str
    machine: str
    cpu_name: str
    physical_cores: int
    ram_bytes: int
    nvidia_gpus: list[dict] = field(default_factory=list)     # name, memory_total_mib, memory_free_mib
    amd_gpus: list[dict] = field(default_factory=list)        # card, device_id, vram_bytes, gtt_bytes
    apple_chip: str | None = None


def read_amd_sysfs(root: Path = Path("/sys/class/drm")) -> list[dict]:
    """AMD GPUs as the amdgpu driver reports them in sysfs (VRAM carve-out and GTT sizes)."""
    gpus = []
    for card in sorted(root.glob("card[0-9]*")):
        dev = card / "device"
        if not (dev / "mem_info_vram_total").is_file():
            continue
        vendor = (dev / "vendor").read_text().strip() if (dev / "vendor").is_file() else ""
        if vendor and vendor.lower() != "0x1002":
            continue
        gpus.append({
            "card": card.name,
            "device_id": (dev / "device").read_text().strip() if (dev / "device").is_file() else "",
            "vram_bytes": int((dev / "mem_info_vram_total").read_text().strip()),
            "gtt_bytes": int((dev / "mem_info_gtt_total").read_text().strip()) if (dev / "mem_info_gtt_total").is_file() else 0,
        })
    return gpus


def read_nvidia_smi() -> list[dict]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            gpus.append({"name": parts[0], "memory_total_mib": int(parts[1]), "memory_free_mib": int(parts[2])})
    return gpus


def _cpu_name() -> str:
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_host() -> HostFacts:
    import psutil

    facts = HostFacts(system=platform.system(), machine=platform.machine(), cpu_name=_cpu_name(),
                      physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
                      ram_bytes=psutil.virtual_memory().total)
    facts.nvidia_gpus = read_nvidia_smi()
    if facts.system == "Linux":
        facts.amd_gpus = read_amd_sysfs()
    if facts.system == "Darwin":
        facts.apple_chip = facts.cpu_name
    return facts


# Assumed figures when nothing better is measured (sources: shared device-facts, see profiles/*.toml).
ASSUMED_CPU_BANDWIDTH_GBS = 60.0      # dual-channel DDR5, measured ~60-62 GB/s
ASSUMED_STRIX_BANDWIDTH_GBS = 212.0   # Ryzen AI Max+ 395, rocm_bandwidth_test ~212-215 GB/s
ASSUMED_PCIE_GBS = 25.0               # PCIe Gen4 x16, real


def profile_from_facts(f: HostFacts) -> DeviceProfile:
    """Build a profile from readings; each assumption is written into `notes`."""
    ram_gb = f.ram_bytes / GB
    notes = [f"measured: {f.cpu_name}, {f.physical_cores} physical cores, {ram_gb:.1f} GB RAM (psutil)"]
    reserve = max(2.0, round(0.06 * ram_gb, 1))
    notes.append(f"assumed: OS reserve {reserve} GB (6% of RAM, at least 2 GB)")
    cpu_pool = MemoryPool("system-ram", "cpu", round(ram_gb, 2), 0.92, ASSUMED_CPU_BANDWIDTH_GBS)
    if f.nvidia_gpus:
        g = f.nvidia_gpus[0]
        vram_gb = g["memory_total_mib"] * 1024**2 / GB
        notes.append(f"measured: {g['name']} {g['memory_total_mib']} MiB total, {g['memory_free_mib']} MiB free (nvidia-smi)")
        notes.append(f"assumed: CPU bandwidth {ASSUMED_CPU_BANDWIDTH_GBS} GB/s, PCIe {ASSUMED_PCIE_GBS} GB/s, "
                     "GPU bandwidth 900 GB/s (run `ccmoe-run calibrate` to measure)")
        gpu = MemoryPool("vram", "gpu", round(vram_gb, 2), 0.94, 900.0)
        return DeviceProfile("auto", f"this host: {f.cpu_name} + {g['name']}", "cuda", f.physical_cores,
                             reserve, [gpu, cpu_pool], ASSUMED_PCIE_GBS, notes=notes, source="auto")
    if f.amd_gpus:
        g = max(f.amd_gpus, key=lambda x: x["gtt_bytes"] + x["vram_bytes"])
        visible = (g["vram_bytes"] + g["gtt_bytes"]) / GB
        notes.append(f"measured: amdgpu {g['card']} ({g['device_id']}) VRAM carve-out {g['vram_bytes'] / GIB:.2f} GiB, "
                     f"GTT {g['gtt_bytes'] / GIB:.2f} GiB (sysfs)")
        if g["vram_bytes"] < 0.5 * f.ram_bytes:  # an APU: the GPU maps system memory through GTT
            notes.append(f"assumed: unified LPDDR5X at {ASSUMED_STRIX_BANDWIDTH_GBS} GB/s (Strix Halo figure)")
            pool = MemoryPool("unified", "unified", round(ram_gb + g["vram_bytes"] / GB, 2), 0.95,
                              ASSUMED_STRIX_BANDWIDTH_GBS, gpu_visible_gb=round(visible, 2))
            return DeviceProfile("auto", f"this host: {f.cpu_name} (APU)", "vulkan", f.physical_cores, reserve,
                                 [pool], 84.0, slow_types=["bf16", "iq3_m", "mxfp4"], notes=notes, source="auto")
        gpu = MemoryPool("vram", "gpu", round(g["vram_bytes"] / GB, 2), 0.94, 800.0)
        notes.append("assumed: discrete AMD GPU at 800 GB/s")
        return DeviceProfile("auto", f"this host: {f.cpu_name} + AMD GPU", "hip", f.physical_cores, reserve,
                             [gpu, cpu_pool], ASSUMED_PCIE_GBS, notes=notes, source="auto")
    if f.apple_chip:
        notes.append("assumed: Metal working set 75% of RAM, 400 GB/s (M3 Max class); see profiles/apple-*.toml")
        pool = MemoryPool("unified", "unified", round(ram_gb, 2), 0.95, 400.0, gpu_visible_gb=round(0.75 * ram_gb, 2))
        return DeviceProfile("auto", f"this host: {f.apple_chip}", "metal", f.physical_cores, max(reserve, 8.0),
                             [pool], None, slow_types=["iq4_xs", "q3_k"], notes=notes, source="auto")
    notes.append(f"assumed: CPU memory bandwidth {ASSUMED_CPU_BANDWIDTH_GBS} GB/s; no GPU found")
    return DeviceProfile("auto", f"this host: {f.cpu_name}, CPU only", "cpu", f.physical_cores, reserve,
                         [cpu_pool], None, notes=notes, source="auto")


def detect_host() -> DeviceProfile:
    return profile_from_facts(read_host())
