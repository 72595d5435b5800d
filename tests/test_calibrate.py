"""Calibration: the fit recovers known factors from times the cost model itself produced, and `ccmoe-run calibrate`
measures this host with llama-bench and writes the host profile that `place` and `serve` then use."""

from __future__ import annotations

import json

import gguf
import pytest
from conftest import run_cli

import ccmoe_runtime.placement.calibrate as C
from ccmoe_runtime.devices import get_profile
from ccmoe_runtime.model.inventory import read_gguf
from ccmoe_runtime.placement.calibrate import N_PROMPT, fit_factors, make_models
from ccmoe_runtime.placement.costmodel import (
    CALIBRATION_KIND,
    default_factors,
    load_factors,
    predict,
)


@pytest.fixture(scope="module")
def cal_models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("cal"), 20, ["q8_0", "q4_0"], wide=False)


@pytest.fixture(scope="module")
def gpu_cal_models(tmp_path_factory):
    """What calibration generates on a GPU host: wide medium models and the wide pair beside the tiny one."""
    return make_models(tmp_path_factory.mktemp("cal-gpu"), 20, ["q8_0", "q4_0"], wide=True)


def _times(device, truth, models, split: bool) -> dict:
    """What llama-bench would measure if the cost model were exact."""
    out = {}
    for m in models:
        where = {ld.name: ("cpu" if split and ld.cls == "routed_expert" else
                           "gpu" if device.backend != "cpu" else "cpu") for ld in m.loads}
        p = predict(m.loads, where, device, truth, m.n_layers, 0.0, 0, N_PROMPT, N_PROMPT)
        out[(m.role, "tg")] = 1.0 / p.decode_tps
        out[(m.role, "pp")] = 1.0 / p.prompt_tps
    return out


def _truth(device):
    f = default_factors(device)
    f.token_s, f.layer_s, f.split_s, f.pp_layer_s, f.pp_batch_s = 90e-6, 30e-6, 50e-6, 150e-6, 1e-3
    f.efficiency = {"gpu:q8_0": 0.8, "gpu:q4_0": 0.7, "cpu:q8_0": 0.6, "cpu:q4_0": 0.5}
    f.pp_flops = {"gpu": 80e12, "cpu": 1e12}
    f.offload_gbs = {"q8_0": 10.0, "q4_0": 40.0}
    return f


@pytest.mark.parametrize("device_name", ["cuda-h100-80g", "cpu"])
def test_fit_recovers_the_factors_that_made_the_times(cal_models, device_name):
    device = get_profile(device_name)
    truth = _truth(device)
    full = _times(device, truth, cal_models, split=False)
    split = _times(device, truth, cal_models, split=True) if device.backend != "cpu" else None
    f = fit_factors(device, cal_models, full, split)
    main = "gpu" if device.backend != "cpu" else "cpu"
    assert f.token_s == pytest.approx(truth.token_s, rel=0.02) and f.layer_s == pytest.approx(truth.layer_s, rel=0.02)
    for t in ("q8_0", "q4_0"):
        assert f.efficiency[f"{main}:{t}"] == pytest.approx(truth.efficiency[f"{main}:{t}"], rel=0.02)
    assert f.pp_flops[main] == pytest.approx(truth.pp_flops[main], rel=0.05)
    if split:
        assert f.split_s == pytest.approx(truth.split_s, rel=0.05)
        assert f.efficiency["cpu:q4_0"] == pytest.approx(0.5, rel=0.02)
        assert f.offload_gbs["q4_0"] == pytest.approx(40.0, rel=0.1)


@pytest.mark.slow
def test_wide_layers_cost_what_the_wide_pair_measures_and_not_bandwidth(gpu_cal_models):
    """Times made with a per-layer cost that grows with width: the fit finds both layer costs and the true
    bandwidth; without the wide pair, the wide medium models' extra layer time would be read as slow memory."""
    device = get_profile("cuda-h100-80g")
    truth = _truth(device)
    truth.layer_s_wide = 55e-6
    assert {m.role for m in gpu_cal_models} >= {"tiny2", "tiny12", "wide2", "wide12"}
    full = _times(device, truth, gpu_cal_models, split=False)
    split = _times(device, truth, [m for m in gpu_cal_models if not m.role.startswith("wide")], split=True)
    f = fit_factors(device, gpu_cal_models, full, split)
    assert f.layer_s == pytest.approx(30e-6, rel=0.02) and f.layer_s_wide == pytest.approx(55e-6, rel=0.02)
    assert f.efficiency["gpu:q8_0"] == pytest.approx(0.8, rel=0.02)
    assert f.split_s == pytest.approx(truth.split_s, rel=0.05)
    assert f.layer_cost(1152) == pytest.approx((f.layer_s + f.layer_s_wide) / 2)     # halfway between the widths
    assert f.layer_cost(7168) == f.layer_s_wide and f.layer_cost(64) == f.layer_s      # no extrapolation
    narrow_only = fit_factors(device, [m for m in gpu_cal_models if not m.role.startswith("wide")], full, split)
    assert narrow_only.layer_s_wide is None and narrow_only.efficiency["gpu:q8_0"] < 0.7


@pytest.mark.slow
def test_calibrate_command_writes_the_host_profile_that_place_uses(engine, bundled_model, tmp_path):
    out = tmp_path / "host.json"
    result = run_cli("calibrate", "--device", "auto", "--size-mb", "20", "--types", "q8_0,q4_k", "--reps", "1",
                     "-t", "2", "-o", str(out), "--json", check=True, timeout=600)
    doc = json.loads(out.read_text())
    assert doc["schema"].endswith(CALIBRATION_KIND) and doc["version"] == 1 and doc["backend"] == "cpu"
    assert doc["factors"]["efficiency"].get("cpu:q8_0", 0) > 0 and doc["factors"]["token_s"] >= 0
    assert doc["factors"]["efficiency"].get("cpu:q4_k", 0) > 0          # made by llama-quantize, measured alike
    assert {"tiny2/tg/full", "tiny12/tg/full", "medium-q8_0/pp/full", "medium-q4_k/tg/full"} <= set(doc["runs"])
    assert json.loads(result.stdout)["path"] == str(out)
    factors = load_factors(get_profile("auto"), out)
    assert factors.source.startswith("measured") and factors.efficiency == doc["factors"]["efficiency"]
    placed = run_cli("place", str(bundled_model), "--device", "auto", "--host-profile", str(out), check=True)
    assert f"speed factors from measured ({out})" in placed.stdout
    # the bundled model is F16, which this calibration did not measure: place says so and how to measure it
    assert "no calibrated speed for f16 on this host" in placed.stdout
    assert "`ccmoe-run calibrate --types q4_k,q8_0,f16`" in placed.stdout
    bad = run_cli("calibrate", "--types", "q8_0,fp8", "-o", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "cannot calibrate type 'fp8'" in bad.stderr and "iq2_xxs" in bad.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_types_that_need_an_imatrix_are_made_with_a_flat_one(engine, tmp_path):
    from ccmoe_runtime.model.synth import write_random_gguf
    from ccmoe_runtime.placement.calibrate import requantized, tiny_spec

    source = write_random_gguf(tiny_spec(2), tmp_path / "tiny-q8_0.gguf", qtype="q8_0")
    imatrix = C.write_flat_imatrix(source, tmp_path / "flat.imatrix.gguf")
    entries = {t.name for t in gguf.GGUFReader(str(imatrix)).tensors}
    assert "blk.0.ffn_down_exps.weight.in_sum2" in entries and "blk.1.attn_q.weight.counts" in entries
    out = requantized(engine, source, tmp_path / "tiny-iq1_s.gguf", "iq1_s")
    types = {t.name: t.ggml_type for t in read_gguf(out).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "IQ1_S" and types["blk.1.attn_output.weight"] == "IQ1_S"
    assert not source.exists() and not (tmp_path / "tiny-q8_0.imatrix.gguf").exists()   # nothing left behind


@pytest.mark.slow
def test_quantized_calibration_models_hold_every_weight_in_their_type(engine, tmp_path):
    models = make_models(tmp_path, 80, ["q2_k", "iq4_xs"], wide=False, engine=engine)
    for m in (m for m in models if m.role.startswith("medium")):
        weights = {ld.ggml_type.lower() for ld in m.loads if ld.cls not in ("norm", "router")}   # F32 as llama.cpp keeps them
        assert weights == {m.qtype}, (m.role, weights)
        size = sum(ld.n_bytes for ld in m.loads)
        assert 0.6 * 80e6 < size < 1.5 * 80e6               # about the 80 MB asked for, in the type's own bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(m.path.name for m in models)   # no Q8_0 sources left


# Experts on the CPU of the H100 host, medium models, tokens/s (two calibrations on the H100 host, 2026-11):
# llama.cpp's default mmap vs --load-mode none (its own pinned buffers), 16 threads, two calibrations.
H100_SPLIT = {("auto", 16): {"medium-q8_0": (300.41, 3266.79), "medium-q4_0": (240.11, 13372.8)},
              ("none", 16): {"medium-q8_0": (279.98, 15566.9), "medium-q4_0": (210.65, 33458.9)}}


def test_host_memory_settings_pick_the_fastest_decode_and_break_ties_by_prompt_speed():
    from ccmoe_runtime.placement.calibrate import pick_cpu_settings

    def times(runs: dict) -> dict:
        return {(role, kind): 1.0 / tps for role, (tg, pp) in runs.items() for kind, tps in (("tg", tg), ("pp", pp))}

    tried = {k: times(v) for k, v in H100_SPLIT.items()}
    assert pick_cpu_settings(tried) == ("auto", 16)           # decode 12% faster memory-mapped: decode wins
    close = dict(tried)
    close[("none", 16)] = times({r: (tg * 1.08, pp) for r, (tg, pp) in H100_SPLIT[("none", 16)].items()})
    assert pick_cpu_settings(close) == ("none", 16)           # within 5%: pinned buffers' 2.5-5x prompt speed wins
    close[("auto", 8)] = times({r: (tg * 0.7, pp * 2) for r, (tg, pp) in H100_SPLIT[("auto", 16)].items()})
    assert pick_cpu_settings(close) == ("none", 16)           # a much slower decode never wins on prompts


@pytest.mark.parametrize("default, other, want", [
    ({"cpu:q4_0": 0.4}, {"cpu:q4_0": 0.6}, {"cpu:q4_0": 0.75}),     # the pair's ratio 1.5 times the calibrated 0.5
    ({"cpu:q4_0": 0.4}, {}, {"cpu:q4_0": 0.5}),                      # only one run fitted it: no change measured
    ({}, {"cpu:q4_0": 0.6}, {"cpu:q4_0": 0.5}),                      # the same, the other way round
    ({"cpu:q4_0": 0.4}, {"cpu:q4_0": 0.0}, {"cpu:q4_0": 0.5}),       # a fit of 0 is a failed fit, not a dead type
    ({"cpu:q5_0": 0.4}, {}, {}),                                     # nothing calibrated to keep
])
def test_rescaled_keeps_the_calibrated_value_where_the_pair_is_incomplete(default, other, want):
    assert C.rescaled({"cpu:q4_0": 0.5}, default, other, 4) == want


@pytest.mark.slow
def test_the_fit_recovers_what_llama_cpp_cpu_buffers_change(cal_models, engine):
    """The runs with --no-host give each type's CPU efficiency and prompt-batch rate in those buffers (Factors.repack)
    from times the cost model made with known values, also when the host slowed down between calibration's runs
    (the pair measured together carries the ratio); and measure_repack runs llama-bench with `--no-host 0,1`."""
    device = get_profile("cuda-h100-80g")
    truth = _truth(device)
    full = _times(device, truth, cal_models, split=False)
    f = fit_factors(device, cal_models, full, _times(device, truth, cal_models, split=True))
    repacked = _truth(device)
    repacked.efficiency.update({"cpu:q4_0": 0.9})                   # Q4_0 repacked: faster CPU decode ...
    repacked.offload_gbs = {"q8_0": 8.0, "q4_0": 2.0}               # ... but its prompt batches stay on the CPU
    bw = C.pool_bandwidth(device, "gpu")
    gpu_s_per_byte = {k.split(":")[1]: 1 / (bw * v) for k, v in f.efficiency.items() if k.startswith("gpu:")}
    _, eff, offload = C.fit_host_weights(device, cal_models, full, _times(device, repacked, cal_models, split=True),
                                         f, gpu_s_per_byte)
    assert eff["cpu:q4_0"] == pytest.approx(0.9, rel=0.03) and eff["cpu:q8_0"] == pytest.approx(0.6, rel=0.03)
    assert offload["q4_0"] == pytest.approx(2.0, rel=0.05) and offload["q8_0"] == pytest.approx(8.0, rel=0.05)
    # later, the host's CPU part runs 20% slower for both runs of the pair: the ratio still gives the truth
    slow, slow_repacked = _truth(device), repacked
    for t in (slow, slow_repacked):
        t.efficiency = {k: v * (0.8 if k.startswith("cpu:") else 1.0) for k, v in t.efficiency.items()}
    _, eff_a, _ = C.fit_host_weights(device, cal_models, full, _times(device, slow, cal_models, split=True), f,
                                     gpu_s_per_byte)
    _, eff_b, _ = C.fit_host_weights(device, cal_models, full, _times(device, slow_repacked, cal_models, split=True),
                                     f, gpu_s_per_byte)
    assert eff_b["cpu:q4_0"] < 0.9 * 0.9                            # alone, the drift reads as 14% less
    paired = C.rescaled(f.efficiency, eff_a, eff_b, 4)
    assert paired["cpu:q4_0"] == pytest.approx(0.9, rel=0.05) and paired["cpu:q8_0"] == pytest.approx(0.6, rel=0.03)
    f.repack = {"efficiency": paired, "offload_gbs": offload}
    with_repack = f.with_repack()
    assert with_repack.eff("cpu", "q4_0") > f.eff("cpu", "q4_0")
    assert with_repack.efficiency["gpu:q8_0"] == f.efficiency["gpu:q8_0"] and with_repack.offload_gbs == offload
    measured, runs = C.measure_repack(engine, device, cal_models, full, f, ("auto", 2), 1, lambda _m: None)
    assert set(measured) == {"efficiency", "offload_gbs"} and {r for r, _ in runs} == {m.role for m in cal_models}
    assert all(t > 0 for t in runs.values())
    assert set(measured["efficiency"]) == {"cpu:q8_0", "cpu:q4_0"}
