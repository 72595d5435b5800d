"""Device profiles: memory pools, bandwidths and backend facts of a target machine."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomllib

from ..core.errors import CcmoeError
from ..core.files import read_text
from ..core.units import GB

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
    carve_out_gb: float | None = None    # unified APU memory: the BIOS carve-out, all that ROCm's hipMalloc sees

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
    return Path(os.environ.get("CCMOE_PROFILES_DIR") or Path(__file__).resolve().parent / "data")


def _parse_profile(data: dict, source: str) -> DeviceProfile:
    try:
        pools = [MemoryPool(**p) for p in data.pop("pools")]
        profile = DeviceProfile(pools=pools, source=source, **data)
    except (KeyError, TypeError) as e:
        raise CcmoeError(f"device profile {source} is malformed ({e})",
                         "compare it with the built-in cpu profile (`ccmoe-run devices cpu --json`) and fix the field named") from None
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
        data = tomllib.loads(read_text(Path(path), "device profile"))
    except tomllib.TOMLDecodeError as e:
        raise CcmoeError(f"device profile {path} is not valid TOML ({e})", "fix the file") from None
    return _parse_profile(data, str(path))


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def list_profiles() -> list[DeviceProfile]:
    return [load_profile_file(profiles_dir() / f"{n}.toml") for n in profile_names()]


def list_lines(profiles: list[DeviceProfile]) -> list[str]:
    """One line per profile: name, backend and memory pools."""
    lines = []
    for p in profiles:
        mem = " + ".join(f"{x.capacity_gb:g} GB {x.kind} @ {x.bandwidth_gbs:g} GB/s" for x in p.pools)
        lines.append(f"{p.name:<20} {p.backend:<7} {mem}")
    return lines + ["auto                 (this host: `ccmoe-run devices auto`)"]


def profile_lines(p: DeviceProfile) -> list[str]:
    """A profile in words: backend, threads, pools, slow types and what --device auto measured or assumed."""
    lines = [f"{p.name}: {p.description}",
             f"  backend {p.backend}, {p.threads} threads, OS reserve {p.os_reserve_gb:g} GB"
             + (f", CPU<->GPU {p.link_bandwidth_gbs:g} GB/s" if p.link_bandwidth_gbs else "")]
    for x in p.pools:
        extra = f", GPU-visible {x.gpu_visible_gb:g} GB" if x.gpu_visible_gb else ""
        extra += f" (carve-out {x.carve_out_gb:g} GB)" if x.carve_out_gb else ""
        lines.append(f"  pool {x.name}: {x.kind}, {x.capacity_gb:g} GB x {x.usable_fraction:g} usable, "
                     f"{x.bandwidth_gbs:g} GB/s{extra}")
    if p.slow_types:
        lines.append(f"  slow types: {', '.join(p.slow_types)}")
    return lines + [f"  {note}" for note in p.notes]
