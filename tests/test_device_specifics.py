"""What a device's memory rules mean for a placement, on recorded host data where the hardware cannot exist here:
Strix Halo's carve-out (all ROCm sees) against GTT (what Vulkan maps), ROCm's loading without mmap, and Apple's
GPU wired-memory limit (iogpu.wired_limit_mb)."""

from __future__ import annotations

from pathlib import Path

import pytest

import ccmoe_runtime.devices.detect as detect
import ccmoe_runtime.placement.layout as L
import ccmoe_runtime.placement.search as P
from ccmoe_runtime.core.units import GB
from ccmoe_runtime.devices import get_profile
from ccmoe_runtime.model.synth import SynthSpec, layout_inventory
from ccmoe_runtime.placement.costmodel import default_factors
from ccmoe_runtime.placement.memory import pool_capacities

# A deepseek2 of ~100 GB in BF16: more than a 96 GB carve-out holds, less than the 124 GB that GTT lets Vulkan map.
BIG = SynthSpec(arch="deepseek2", n_embd=4096, n_layer=42, n_dense_lead=1, n_head=32, n_expert=64, n_expert_used=6,
                n_ff_exp=1536, n_ff=8192, q_lora_rank=1024, kv_lora_rank=512, qk_rope_dim=64)


def _strix_sysfs(root: Path, carve_mib: int, gtt_mib: int) -> Path:
    """sysfs of a Strix Halo as the amdgpu driver lays it out (device 0x1586)."""
    dev = root / "card1" / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1002\n")
    (dev / "device").write_text("0x1586\n")
    (dev / "mem_info_vram_total").write_text(f"{carve_mib * 1024**2}\n")
    (dev / "mem_info_gtt_total").write_text(f"{gtt_mib * 1024**2}\n")
    return root


@pytest.mark.parametrize("backend", [None, "hip"])
def test_rocm_on_strix_halo_sees_only_the_carve_out(tmp_path, backend):
    gpus = detect.read_amd_sysfs(_strix_sysfs(tmp_path, 512, 126976))
    facts = detect.HostFacts("Linux", "x86_64", "AMD RYZEN AI MAX+ 395 w/ Radeon 8060S", 16, 128 * 1024**3,
                             amd_gpus=gpus, backend=backend)
    profile = detect.profile_from_facts(facts)
    pool = profile.pool("unified")
    assert profile.backend == (backend or "vulkan") and pool.carve_out_gb == pytest.approx(0.54, abs=0.01)
    gpu = pool_capacities(profile)["gpu"]
    if backend == "hip":
        assert gpu == int(pool.carve_out_gb * GB) and any("sees only the 0.5 GB BIOS carve-out" in n for n in profile.notes)
    else:
        assert gpu > 120 * GB and any("ROCm (CCMOE_BACKEND=hip) would see only" in n for n in profile.notes)


def test_a_model_over_the_carve_out_spills_to_the_cpu_under_rocm_and_fits_the_gpu_under_vulkan():
    inv = layout_inventory(BIG, "BF16")
    assert 96 * GB < sum(t.n_bytes for t in inv.tensors) < 110 * GB
    settings = L.Settings(ctx=4096, kv_type="f16")
    vulkan, rocm = get_profile("strixhalo-128g"), get_profile("strixhalo-128g-rocm")
    on_vulkan = P.place(inv, vulkan, default_factors(vulkan), settings)
    on_rocm = P.place(inv, rocm, default_factors(rocm), settings)
    assert not on_vulkan.has_host_weights and on_vulkan.load_mode == "auto"
    assert on_rocm.has_host_weights and on_rocm.memory["gpu"].total <= 96 * GB < on_vulkan.memory["gpu"].total
    assert on_rocm.load_mode == "none" and "-lm" in on_rocm.server_args()
    assert on_rocm.server_args()[on_rocm.server_args().index("-lm") + 1] == "none"
    assert any("BIOS carve-out" in n for n in on_rocm.notes) and any("without mmap" in n for n in on_rocm.notes)
    assert on_rocm.memory["gpu"].weights > 0.8 * on_vulkan.memory["gpu"].weights


def test_apple_wired_limit_is_read_and_a_placement_it_limits_says_how_to_raise_it():
    base = dict(system="Darwin", machine="arm64", cpu_name="Apple M4 Max", physical_cores=16, ram_bytes=128 * 1024**3,
                apple_chip="Apple M4 Max")
    default = detect.profile_from_facts(detect.HostFacts(**base))
    raised = detect.profile_from_facts(detect.HostFacts(**base, apple_wired_limit_mb=122880))
    assert default.pool("unified").gpu_visible_gb == pytest.approx(0.75 * 128 * 1024**3 / GB, abs=0.01)
    assert raised.pool("unified").gpu_visible_gb == pytest.approx(122880 * 1024**2 / GB, abs=0.01)
    assert any("iogpu.wired_limit_mb" in n and n.startswith("measured") for n in raised.notes)
    assert any("iogpu.wired_limit_mb=N" in n for n in default.notes)
    inv = layout_inventory(BIG, "BF16")
    settings = L.Settings(ctx=4096, kv_type="f16")
    limited = P.place(inv, default, default_factors(default), settings)     # ~103 GB visible: experts spill
    lifted = P.place(inv, raised, default_factors(raised), settings)
    assert limited.has_host_weights and any("sudo sysctl iogpu.wired_limit_mb=" in n for n in limited.notes)
    assert not any("iogpu" in n for n in lifted.notes)
    assert lifted.memory["gpu"].weights > limited.memory["gpu"].weights
