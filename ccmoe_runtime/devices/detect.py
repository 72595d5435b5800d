"""`--device auto`: read this host (psutil, nvidia-smi, amdgpu sysfs, macOS sysctl) and describe it as a profile."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..core.units import GB, GIB
from .profiles import DeviceProfile, MemoryPool


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
    apple_wired_limit_mb: int = 0         # sysctl iogpu.wired_limit_mb (0: macOS's default working-set limit)
    backend: str | None = None            # the backend asked for (CCMOE_BACKEND, as scripts/setup.sh builds it)


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


def read_nvidia_smi(links: bool = True) -> list[dict]:
    """NVIDIA GPUs as nvidia-smi reports them: name, total and free MiB, and (`links`) the PCIe link's generation
    and width (0 where it cannot tell: a VM may answer [N/A])."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    gpus = []
    for parts in _smi_rows(exe, "name,memory.total,memory.free"):
        if len(parts) == 3 and parts[1].isdigit():
            gpus.append({"name": parts[0], "memory_total_mib": int(parts[1]), "memory_free_mib": int(parts[2])})
    rows = _smi_rows(exe, "pcie.link.gen.max,pcie.link.width.max") if gpus and links else []
    for g, parts in zip(gpus, rows):
        g["pcie_gen"], g["pcie_width"] = (int(x) if x.isdigit() else 0 for x in (parts + ["", ""])[:2])
    return gpus


def _smi_rows(exe: str, fields: str) -> list[list[str]]:
    """One nvidia-smi --query-gpu answer, a list of fields per GPU ([] when it fails)."""
    try:
        out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [[p.strip() for p in line.split(",")] for line in out.stdout.strip().splitlines()]


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
        facts.apple_wired_limit_mb = read_wired_limit_mb()
    facts.backend = os.environ.get("CCMOE_BACKEND") or None
    return facts


def read_wired_limit_mb() -> int:
    """macOS's GPU wired-memory limit as set with `sudo sysctl iogpu.wired_limit_mb=N` (0 when unset or unknown)."""
    try:
        out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0


# Assumed figures when nothing better is measured (sources: shared device-facts, see devices/data/*.toml).
ASSUMED_CPU_BANDWIDTH_GBS = 60.0      # dual-channel DDR5, measured ~60-62 GB/s
ASSUMED_STRIX_BANDWIDTH_GBS = 212.0   # Ryzen AI Max+ 395, rocm_bandwidth_test ~212-215 GB/s
ASSUMED_PCIE_GBS = 25.0               # PCIe Gen4 x16, real
ASSUMED_GPU_BANDWIDTH_GBS = 900.0     # an NVIDIA card not in NVIDIA_BANDWIDTH_GBS
# Real PCIe x16 copy rates by generation: Gen4 ~25 GB/s, Gen5 ~50 (shared/device-facts.md); each generation doubles
# the per-lane rate (PCI-SIG), so Gen3 is half of Gen4. Scaled by the link's width.
PCIE_X16_GBS = {3: 12.5, 4: 25.0, 5: 50.0, 6: 100.0}
# Memory bandwidth (GB/s) by nvidia-smi name, first match wins (case-insensitive substrings, all must appear).
NVIDIA_BANDWIDTH_GBS = (
    (("h200",), 4800.0, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e"),
    (("h100", "nvl"), 3900.0, "NVIDIA H100 datasheet: H100 NVL 3.9 TB/s"),
    (("h100", "pcie"), 2000.0, "NVIDIA H100 datasheet: H100 PCIe 2.0 TB/s"),
    (("h100",), 3350.0, "NVIDIA H100 datasheet: H100 SXM 3.35 TB/s"),
    (("a100", "80gb", "pcie"), 1935.0, "NVIDIA A100 datasheet: 80 GB PCIe 1,935 GB/s"),
    (("a100", "80gb"), 2039.0, "NVIDIA A100 datasheet: 80 GB SXM 2,039 GB/s"),
    (("a100",), 1555.0, "NVIDIA A100 datasheet: 40 GB 1,555 GB/s"),
    (("rtx 5090",), 1792.0, "NVIDIA: RTX 5090 1,792 GB/s (shared/device-facts.md)"),
    (("rtx 4090",), 1008.0, "NVIDIA: RTX 4090 1,008 GB/s (shared/device-facts.md)"),
    (("rtx 3090",), 936.0, "NVIDIA: RTX 3090 936 GB/s (shared/device-facts.md)"),
)


# Strix Halo's backends (shared/device-facts.md): Vulkan RADV maps the whole GTT pool and is usually best for decode;
# ROCm's hipMalloc stays inside the BIOS carve-out (unless unified memory is enabled), is better at prompts, and
# loads large models without mmap (mmap loading can hang).
APU_BACKEND_NOTES = {
    "vulkan": "Vulkan maps the carve-out and GTT ({visible:.1f} GB); ROCm (CCMOE_BACKEND=hip) would see only the "
              "{carve:.1f} GB carve-out",
    "hip": "ROCm sees only the {carve:.1f} GB BIOS carve-out (Vulkan maps {visible:.1f} GB with GTT); models load "
           "without mmap (-lm none) under ROCm",
}


def nvidia_bandwidth(name: str) -> tuple[float, str] | None:
    """(GB/s, source) of an NVIDIA card by its nvidia-smi name; None for a card the table does not know."""
    low = name.lower()
    return next(((bw, src) for words, bw, src in NVIDIA_BANDWIDTH_GBS if all(w in low for w in words)), None)


def pcie_gbs(gen: int, width: int) -> float | None:
    """Real CPU<->GPU copy rate of a PCIe link (None when nvidia-smi did not tell the generation)."""
    if gen not in PCIE_X16_GBS:
        return None
    return round(PCIE_X16_GBS[gen] * (width or 16) / 16, 1)


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
        known = nvidia_bandwidth(g["name"])
        gpu_bw = known[0] if known else ASSUMED_GPU_BANDWIDTH_GBS
        notes.append(f"GPU bandwidth {gpu_bw:g} GB/s ({known[1]})" if known else
                     f"assumed: GPU bandwidth {gpu_bw:g} GB/s ({g['name']} is not in the card table)")
        link = pcie_gbs(g.get("pcie_gen", 0), g.get("pcie_width", 0))
        notes.append(f"measured: PCIe Gen{g['pcie_gen']} x{g.get('pcie_width') or 16} (nvidia-smi), ~{link:g} GB/s real"
                     if link else f"assumed: PCIe {ASSUMED_PCIE_GBS:g} GB/s (Gen4 x16; nvidia-smi did not tell the link)")
        notes.append(f"assumed: CPU bandwidth {ASSUMED_CPU_BANDWIDTH_GBS:g} GB/s (run `ccmoe-run calibrate` to measure)")
        gpu = MemoryPool("vram", "gpu", round(vram_gb, 2), 0.94, gpu_bw)
        return DeviceProfile("auto", f"this host: {f.cpu_name} + {g['name']}", "cuda", f.physical_cores,
                             reserve, [gpu, cpu_pool], link or ASSUMED_PCIE_GBS, notes=notes, source="auto")
    if f.amd_gpus:
        g = max(f.amd_gpus, key=lambda x: x["gtt_bytes"] + x["vram_bytes"])
        visible = (g["vram_bytes"] + g["gtt_bytes"]) / GB
        notes.append(f"measured: amdgpu {g['card']} ({g['device_id']}) VRAM carve-out {g['vram_bytes'] / GIB:.2f} GiB, "
                     f"GTT {g['gtt_bytes'] / GIB:.2f} GiB (sysfs)")
        if g["vram_bytes"] < 0.5 * f.ram_bytes:  # an APU: the GPU maps system memory through GTT
            backend = "hip" if f.backend == "hip" else "vulkan"
            notes.append(f"assumed: unified LPDDR5X at {ASSUMED_STRIX_BANDWIDTH_GBS} GB/s (Strix Halo figure)")
            notes.append(APU_BACKEND_NOTES[backend].format(carve=g["vram_bytes"] / GB, visible=visible))
            pool = MemoryPool("unified", "unified", round(ram_gb + g["vram_bytes"] / GB, 2), 0.95,
                              ASSUMED_STRIX_BANDWIDTH_GBS, gpu_visible_gb=round(visible, 2),
                              carve_out_gb=round(g["vram_bytes"] / GB, 2))
            return DeviceProfile("auto", f"this host: {f.cpu_name} (APU)", backend, f.physical_cores, reserve,
                                 [pool], 84.0, slow_types=["bf16", "iq3_m", "mxfp4"], notes=notes, source="auto")
        gpu = MemoryPool("vram", "gpu", round(g["vram_bytes"] / GB, 2), 0.94, 800.0)
        notes.append("assumed: discrete AMD GPU at 800 GB/s")
        return DeviceProfile("auto", f"this host: {f.cpu_name} + AMD GPU", "hip", f.physical_cores, reserve,
                             [gpu, cpu_pool], ASSUMED_PCIE_GBS, notes=notes, source="auto")
    if f.apple_chip:
        notes.append("assumed: 400 GB/s (M3 Max class); see the apple-* profiles")
        if f.apple_wired_limit_mb:
            visible = f.apple_wired_limit_mb * 1024**2 / GB
            notes.append(f"measured: GPU wired-memory limit {f.apple_wired_limit_mb} MB (sysctl iogpu.wired_limit_mb)")
        else:
            visible = 0.75 * ram_gb
            notes.append("assumed: Metal working set 75% of RAM (macOS's default above 36 GB); "
                         "`sudo sysctl iogpu.wired_limit_mb=N` raises it until reboot (leave 8-16 GB for macOS)")
        pool = MemoryPool("unified", "unified", round(ram_gb, 2), 0.95, 400.0, gpu_visible_gb=round(visible, 2))
        return DeviceProfile("auto", f"this host: {f.apple_chip}", "metal", f.physical_cores, max(reserve, 8.0),
                             [pool], None, slow_types=["iq4_xs", "q3_k"], notes=notes, source="auto")
    notes.append(f"assumed: CPU memory bandwidth {ASSUMED_CPU_BANDWIDTH_GBS} GB/s; no GPU found")
    return DeviceProfile("auto", f"this host: {f.cpu_name}, CPU only", "cpu", f.physical_cores, reserve,
                         [cpu_pool], None, notes=notes, source="auto")


def detect_host() -> DeviceProfile:
    """This host as a profile (CCMOE_BACKEND=hip makes an AMD APU a ROCm device instead of a Vulkan one)."""
    return profile_from_facts(read_host())


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the CPU's largest cache level (Linux sysfs), None where it cannot be read."""
    best: tuple[int, int] | None = None
    for index in root.glob("index[0-9]*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit() and (best is None or level > best[0]):
            best = (level, int(digits) * unit)
    return best[1] if best else None


def environment_threads() -> int:
    """CPU threads this process may use (its affinity mask), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def host_runs(device: DeviceProfile) -> str | None:
    """Why this host cannot run `device`'s backend (None when it can): a CUDA profile without an NVIDIA GPU,
    Metal off macOS, ROCm/Vulkan without an AMD GPU."""
    needs = {"cuda": ("an NVIDIA GPU (nvidia-smi)", lambda: bool(read_nvidia_smi())),
             "metal": ("macOS on Apple Silicon", lambda: platform.system() == "Darwin"),
             "hip": ("an AMD GPU (amdgpu)", lambda: bool(read_amd_sysfs())),
             "vulkan": ("a Vulkan GPU", lambda: bool(read_amd_sysfs()) or bool(read_nvidia_smi()))}
    if device.backend not in needs or device.source == "auto":
        return None
    what, present = needs[device.backend]
    return None if present() else f"device {device.name} needs {what}, which this host does not have"
