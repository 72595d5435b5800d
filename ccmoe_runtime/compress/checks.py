"""Checks `compress` runs before the long work, from the inventory alone (seconds at any size): the smallest plan
fits the budget, the disk holds every stage's outputs, and whether the model fits in RAM (else passes stream
from disk, and how long that takes)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.units import GB, gb_text
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from ..model.inventory import ModelInventory, summarize
from .impact import IMPACT_MAX_BYTES
from .plan import device_budget
from .sensitivity import prior_sensitivity
from .stats import available_ram, model_reads, chunks_per_pass

DISK_READ_BYTES_PER_S = 2 * 10**9  # assumed sequential read speed of the model's disk for streamed passes
BUILD_PARAMS_PER_S = 4.8e6        # llama-quantize per core, measured: 13.9B-parameter deepseek2 Q8_0 to a 1.8-bpw
                                  # IQ1/IQ2 plan with an imatrix, 1446 s on 2 cores (benchmarks/rehearsal.py)
IMATRIX_CHUNKS = 64


@dataclass
class Check:
    """One check: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str


@dataclass
class CheckResult:
    """Every check `compress` runs before measuring, and the byte counts they compared."""

    model: str
    smallest_plan_bytes: int
    budget_bytes: int
    disk_needed_bytes: int
    disk_free_bytes: int
    model_bytes: int
    ram_available_bytes: int
    streams: bool
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        return [f"{'ok' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]


def smallest_plan_bytes(inv: ModelInventory, sensitivity: dict, excluded: tuple[str, ...]) -> tuple[int, int]:
    """Bytes of the smallest and the largest plan: fixed tensors plus each planned tensor's cheapest (dearest) type."""
    planned = sensitivity["tensors"]
    fixed = sum(t.n_bytes for t in inv.tensors if t.name not in planned)
    metadata = max(inv.file_bytes - sum(t.n_bytes for t in inv.tensors), 0)
    low = high = fixed + metadata
    for name, t in planned.items():
        sizes = [b for k, b in t["bytes"].items() if k.lower() not in excluded] or list(t["bytes"].values())
        low, high = low + min(sizes), high + max(sizes)
    return low, high


def imatrix_bytes(inv: ModelInventory) -> int:
    """An imatrix's size: a float sum and count per input column of every matrix (per expert for 3-D tensors)."""
    return sum(8 * t.shape[0] * (t.shape[2] if len(t.shape) == 3 else 1) for t in inv.tensors if len(t.shape) >= 2)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def preflight(engine: Engine, inv: ModelInventory, device: DeviceProfile, out: Path, ctx: int = 8192,
              parallel: int = 1, budget_gb: float | None = None, impact: bool | None = None,
              chunks: int = IMATRIX_CHUNKS, threads: int | None = None) -> CheckResult:
    """Fit, disk and RAM checks from the inventory; the first failing one raises (exit 4)."""
    sens = prior_sensitivity(engine, inv)
    excluded = tuple(t.lower() for t in device.unsupported_types + device.slow_types)
    budget = device_budget(inv, device, ctx, parallel, budget_gb)
    low, high = smallest_plan_bytes(inv, sens, excluded)
    output = min(high, max(budget.weights_bytes, low))
    probes = impact if impact is not None else inv.file_bytes <= IMPACT_MAX_BYTES
    needed = output + imatrix_bytes(inv) + (output if probes else 0)   # OUT, the imatrix, one probe build at a time
    free = free_bytes(Path(out).parent)
    ram = available_ram()
    streams = inv.file_bytes > ram
    passes = model_reads(inv.file_bytes, ram, chunks)
    read_s = passes * inv.file_bytes / DISK_READ_BYTES_PER_S
    build_s = summarize(inv).total_params / (BUILD_PARAMS_PER_S * (threads or os.cpu_count() or 1))
    result = CheckResult(inv.source, low, budget.weights_bytes, needed, free, inv.file_bytes, ram, streams)
    fit = low <= budget.weights_bytes
    result.checks.append(Check("fit", fit, f"the smallest plan needs {gb_text(low)}, the budget for weights is "
                                           f"{gb_text(budget.weights_bytes)}"))
    disk = needed <= free
    result.checks.append(Check("disk", disk, f"outputs need {gb_text(needed)} (model {gb_text(output)}"
                                             f"{', one probe build ' + gb_text(output) if probes else ''}), "
                                             f"{gb_text(free)} free beside {out}"))
    result.checks.append(Check("ram", True, (
        f"model {gb_text(inv.file_bytes)} > {gb_text(ram)} available: the imatrix streams it from disk "
        f"{passes} times ({chunks} chunks, {chunks_per_pass(inv.file_bytes, ram, chunks)} per batch), ~{hours(read_s)} at "
        f"{DISK_READ_BYTES_PER_S / GB:.0f} GB/s" if streams else
        f"model {gb_text(inv.file_bytes)} fits in {gb_text(ram)} available: one read, ~{hours(read_s)}")
        + f"; build ~{hours(build_s)}"))
    if not fit:
        raise CcmoeError(result.checks[0].detail.replace("the smallest", "even the smallest").replace(", the", " but the"),
                         "raise --budget-gb, shorten --ctx/--parallel, or prune more experts", EXIT_RESOURCE)
    if not disk:
        raise CcmoeError(f"not enough disk: {result.checks[1].detail}",
                         "free disk space or write -o to a larger disk", EXIT_RESOURCE)
    return result
