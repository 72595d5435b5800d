"""Device profiles and --device auto."""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest
from conftest import run_cli

import ccmoe_runtime.devices as devices
import ccmoe_runtime.devices.detect as detect
import ccmoe_runtime.devices.profiles as D
from ccmoe_runtime.core.errors import CcmoeError

REQUIRED = {"strixhalo-128g", "apple-m4max-128g", "apple-m3ultra-512g", "cuda-rtx4090-24g", "cuda-h100-80g", "cpu"}


def test_required_profiles_load_with_sane_figures():
    profiles = {p.name: p for p in D.list_profiles()}
    assert REQUIRED <= set(profiles)
    for p in profiles.values():
        assert p.backend in ("cpu", "cuda", "metal", "vulkan", "hip")
        assert p.threads > 0 and p.os_reserve_gb > 0 and p.pools
        for pool in p.pools:
            assert pool.capacity_gb > 0 and pool.bandwidth_gbs > 0 and 0 < pool.usable_fraction <= 1
    strix = profiles["strixhalo-128g"].pool("unified")
    assert strix.gpu_visible_gb and strix.gpu_visible_gb < strix.capacity_gb
    assert profiles["cuda-rtx4090-24g"].pool("gpu").capacity_gb < profiles["cuda-rtx4090-24g"].pool("cpu").capacity_gb


def test_every_figure_cites_a_source():
    for path in D.profiles_dir().glob("*.toml"):
        lines = path.read_text().splitlines()
        assert any("Sources:" in ln for ln in lines[:6]), f"{path.name} has no Sources header"
        for i, ln in enumerate(lines):
            if re.match(r"\s*(bandwidth_gbs|capacity_gb|link_bandwidth_gbs|gpu_visible_gb|carve_out_gb)\s*=", ln):
                commented = "#" in ln or lines[i - 1].lstrip().startswith("#")
                assert commented, f"{path.name}:{i + 1} has a figure without a source comment"


def test_unknown_device_lists_the_valid_names():
    with pytest.raises(CcmoeError) as err:
        devices.get_profile("strixhalo-64g")
    assert "strixhalo-128g" in str(err.value) and "auto" in str(err.value)
    result = run_cli("devices", "strixhalo-64g")
    assert result.returncode == 2 and result.stderr.startswith("ccmoe-run: error: unknown device")


def test_auto_profile_measures_this_host():
    profile = detect.detect_host()
    ram = psutil.virtual_memory().total / D.GB
    pool = profile.pools[-1]
    assert abs(pool.capacity_gb - ram) < 0.1
    assert any(n.startswith("measured:") for n in profile.notes)
    assert any(n.startswith("assumed:") for n in profile.notes)


def _strix_sysfs(root: Path) -> Path:
    """sysfs of a Strix Halo as the amdgpu driver lays it out: 512 MiB BIOS carve-out, GTT raised to
    126976 MiB by amdgpu.gttsize (the kernel parameters in shared/device-facts.md), device 0x1586."""
    dev = root / "card1" / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1002\n")
    (dev / "device").write_text("0x1586\n")
    (dev / "mem_info_vram_total").write_text(f"{512 * 1024**2}\n")
    (dev / "mem_info_gtt_total").write_text(f"{126976 * 1024**2}\n")
    return root


def test_auto_profile_of_a_strix_halo(tmp_path):
    gpus = detect.read_amd_sysfs(_strix_sysfs(tmp_path))
    facts = detect.HostFacts("Linux", "x86_64", "AMD RYZEN AI MAX+ 395 w/ Radeon 8060S", 16, 128 * 1024**3, amd_gpus=gpus)
    profile = detect.profile_from_facts(facts)
    assert profile.backend == "vulkan" and len(profile.pools) == 1
    pool = profile.pools[0]
    assert pool.kind == "unified"
    assert 133 < pool.gpu_visible_gb < 134      # 512 MiB + 124 GiB of GTT, in GB
    assert any("sysfs" in n for n in profile.notes)


def test_auto_profile_of_an_nvidia_desktop():
    facts = detect.HostFacts("Linux", "x86_64", "AMD Ryzen 9 7950X", 16, 128 * 1024**3,
                        nvidia_gpus=[{"name": "NVIDIA GeForce RTX 4090", "memory_total_mib": 24564, "memory_free_mib": 23900}])
    profile = detect.profile_from_facts(facts)
    assert profile.backend == "cuda" and profile.pool("gpu").capacity_gb == pytest.approx(25.76, abs=0.01)
    assert profile.pool("cpu") is not None
