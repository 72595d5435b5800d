"""The cost model on DeepSeek shapes (MLA attention, shared expert, dense lead) and the factors it was wrong on:
types calibration did not measure, the GPU's bandwidth by card name, PCIe by link, and CPU calibration models
that decoded from the last-level cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import ccmoe_runtime.devices.detect as detect
from ccmoe_runtime.core.units import MIB
from ccmoe_runtime.engine.tools import fit_print
from ccmoe_runtime.model.inventory import kv_bytes_per_token, read_gguf, summarize
from ccmoe_runtime.model.synth import SynthSpec, layout_inventory, write_random_gguf
from ccmoe_runtime.placement.calibrate import default_size_mb
from ccmoe_runtime.placement.costmodel import Factors, default_factors, predict, tensor_loads
from ccmoe_runtime.devices import get_profile

DS = SynthSpec(arch="deepseek2", n_embd=512, n_layer=6, n_dense_lead=2, n_head=8, n_expert=16, n_expert_used=4,
               n_ff_exp=256, n_ff=1024, kv_lora_rank=192, qk_rope_dim=32, seed=7)


@pytest.fixture(scope="module")
def ds_model(tmp_path_factory) -> Path:
    return write_random_gguf(DS, tmp_path_factory.mktemp("ds") / "ds.gguf", qtype="q8_0")


@pytest.mark.slow
def test_mla_kv_cache_is_the_latent_and_rope_key_as_llama_cpp_allocates_it(engine, ds_model):
    """llama.cpp's own dry run allocates, per layer and token, kv_lora_rank + rope dims in f16 and no V cache."""
    inv = read_gguf(ds_model)
    per_token = kv_bytes_per_token(inv)
    assert per_token == DS.n_layer * (DS.kv_lora_rank + DS.qk_rope_dim) * 2
    for ctx in (4096, 32768):
        measured = fit_print(engine, ds_model, ["-c", str(ctx), "-ngl", "0"])
        assert measured, "llama-fit-params gave no memory breakdown"
        context = measured["Host"]["context"]          # MiB as printed (truncated) + 1 MiB
        assert abs(context - per_token * ctx) <= 1 * MIB, (context, per_token * ctx)


def test_shared_expert_and_dense_lead_are_read_for_every_token():
    inv = layout_inventory(DS, "BF16")
    loads = {ld.name: ld for ld in tensor_loads(inv)}
    assert len(summarize(inv).moe_layers) == DS.n_layer - DS.n_dense_lead
    for i in range(DS.n_dense_lead):
        assert loads[f"blk.{i}.ffn_up.weight"].read_share == 1.0 and loads[f"blk.{i}.ffn_up.weight"].cls == "dense_ffn"
    for i in range(DS.n_dense_lead, DS.n_layer):
        assert loads[f"blk.{i}.ffn_down_shexp.weight"].read_share == 1.0
        assert loads[f"blk.{i}.attn_kv_a_mqa.weight"].read_share == 1.0
        assert loads[f"blk.{i}.ffn_up_exps.weight"].read_share == pytest.approx(DS.n_expert_used / DS.n_expert)


def test_a_type_calibration_did_not_measure_takes_the_pools_slowest_measured_speed():
    f = Factors(efficiency={"gpu:q8_0": 3.1, "gpu:q4_0": 2.4, "cpu:q8_0": 1.3}, layer_s=1e-5, token_s=1e-4,
                split_s=5e-5, pp_flops={"gpu": 1e14, "cpu": 1e12})
    assert f.eff("gpu", "q4_k") == 2.4 and f.eff("cpu", "q6_k") == 1.3
    assert f.eff("gpu", "q8_0") == 3.1                                   # measured stays measured
    assert f.eff("gpu", "iq3_m", ["iq3_m"]) == pytest.approx(2.4 * 0.5)  # a device's slow type, not measured
    uncalibrated = default_factors(get_profile("cuda-h100-80g"))
    assert uncalibrated.eff("gpu", "q4_k") == 0.6                        # nothing measured: the default


def test_unmeasured_types_read_at_the_calibrated_pools_scale():
    """A calibrated host whose q8_0/q4_0 reads ran at 1.8x/1.5x the profile's bandwidth predicts a Q4_K model's reads
    as fast as the same bytes in Q4_0, not at the 0.6 default (2.5x slower)."""
    device = get_profile("cuda-h100-80g")
    loads = tensor_loads(layout_inventory(DS, "BF16"))
    as_q4_k = [replace(ld, ggml_type="q4_k") for ld in loads]
    as_q4_0 = [replace(ld, ggml_type="q4_0") for ld in loads]
    f = default_factors(device)
    f.efficiency = {"gpu:q8_0": 1.8, "gpu:q4_0": 1.5}
    gpu = {ld.name: "gpu" for ld in loads}
    p = predict(as_q4_k, gpu, device, f, DS.n_layer)
    assert p.decode_tps == pytest.approx(predict(as_q4_0, gpu, device, f, DS.n_layer).decode_tps, rel=1e-6)
    f.efficiency = {}
    before = predict(as_q4_k, gpu, device, f, DS.n_layer)          # what the 0.6 default made of it
    assert before.seconds_per_token["gpu"] == pytest.approx(p.seconds_per_token["gpu"] * 1.5 / 0.6)


@pytest.mark.parametrize("name,bandwidth", [("NVIDIA H200", 4800.0), ("NVIDIA H100 80GB HBM3", 3350.0),
                                            ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H100 NVL", 3900.0),
                                            ("NVIDIA GeForce RTX 4090", 1008.0), ("NVIDIA A100-SXM4-80GB", 2039.0),
                                            ("NVIDIA GeForce RTX 3090", 936.0), ("NVIDIA GeForce RTX 5090", 1792.0)])
def test_auto_takes_the_gpu_bandwidth_from_the_card_name(name, bandwidth):
    facts = detect.HostFacts("Linux", "x86_64", "Intel Xeon", 16, 128 * 1024**3,
                             nvidia_gpus=[{"name": name, "memory_total_mib": 81559, "memory_free_mib": 81000,
                                           "pcie_gen": 5, "pcie_width": 16}])
    profile = detect.profile_from_facts(facts)
    assert profile.pool("gpu").bandwidth_gbs == bandwidth
    assert profile.link_bandwidth_gbs == 50.0
    assert any("datasheet" in n or "device-facts" in n for n in profile.notes)


def test_an_unknown_card_or_link_is_an_assumption_said_so():
    facts = detect.HostFacts("Linux", "x86_64", "Intel Xeon", 16, 64 * 1024**3,
                             nvidia_gpus=[{"name": "NVIDIA L4", "memory_total_mib": 23034, "memory_free_mib": 22000}])
    profile = detect.profile_from_facts(facts)
    assert profile.pool("gpu").bandwidth_gbs == detect.ASSUMED_GPU_BANDWIDTH_GBS
    assert profile.link_bandwidth_gbs == detect.ASSUMED_PCIE_GBS
    assert sum(n.startswith("assumed: GPU bandwidth") or n.startswith("assumed: PCIe") for n in profile.notes) == 2
    assert detect.pcie_gbs(4, 8) == 12.5 and detect.pcie_gbs(3, 16) == 12.5 and detect.pcie_gbs(0, 16) is None


def _cache_sysfs(root: Path, sizes: dict[int, str]) -> Path:
    """/sys/devices/system/cpu/cpu0/cache as Linux lays it out (this host's: L1 48K, L2 2048K, L3 307200K)."""
    for i, (level, size) in enumerate(sizes.items()):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_cpu_calibration_models_outgrow_the_last_level_cache(tmp_path):
    llc = detect.last_level_cache_bytes(_cache_sysfs(tmp_path, {1: "48K", 2: "2048K", 3: "307200K"}))
    assert llc == 307200 * 1024
    assert default_size_mb("cpu", llc) == 1258 and default_size_mb("gpu", llc) == 1500
    assert default_size_mb("cpu", None) == 200 and default_size_mb("cpu", 8 * 1024**2) == 200
    assert detect.last_level_cache_bytes(tmp_path / "absent") is None
