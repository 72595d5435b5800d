"""Sensitivity measured with ggml's quantizers on the bundled model, imatrix-weighted and usage-weighted."""

from __future__ import annotations

import numpy as np
import pytest

import ccmoe_runtime.compress.sensitivity as S
from ccmoe_runtime.compress.stats import measure_expert_stats


@pytest.fixture(scope="module")
def profiled(engine, bundled_model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    calib = out / "calib.txt"
    calib.write_text(corpus.train.read_text()[:40_000])
    return measure_expert_stats(engine, bundled_model, calib, out, ctx=256, chunks=8, threads=2)


@pytest.fixture(scope="module")
def measured(engine, bundled_model, profiled, tmp_path_factory):
    from pathlib import Path

    return S.measure_sensitivity(engine, bundled_model, Path(profiled["imatrix"]), profiled, rows_per_expert=8)


def test_every_weight_is_measured_and_norms_and_router_are_not(measured, bundled_model):
    from ccmoe_runtime.model.inventory import read_gguf

    names = set(measured["tensors"])
    for t in read_gguf(bundled_model).tensors:
        quantizable = len(t.shape) >= 2 and t.tensor_class not in ("norm", "router")
        assert (t.name in names) == quantizable, t.name
    assert set(measured["types"]) == set(S.LADDER)     # an imatrix was given, so the IQ1/IQ2 types are candidates


def test_errors_fall_along_the_k_quant_ladder_and_sizes_are_exact(measured):
    ladder = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    for name, t in measured["tensors"].items():
        errors = [t["error"][k] for k in ladder]
        assert errors == sorted(errors, reverse=True), (name, errors)
        assert t["error"]["Q8_0"] < 1e-3 < t["error"]["IQ2_S"]
        assert t["bytes"]["Q4_K"] * 8 == pytest.approx(t["n_elements"] * 4.5)
        if name not in ("token_embd.weight", "output.weight"):    # no imatrix data for these (see below)
            assert t["bytes"]["IQ2_XXS"] * 8 == pytest.approx(t["n_elements"] * 2.0625)


def test_tensors_without_imatrix_data_get_no_type_that_needs_one(measured):
    # llama-imatrix records neither token_embd (a lookup) nor output (without --process-output): ggml
    # refuses IQ1_S, IQ2_XXS and IQ2_XS there, so they must not be candidates
    for name in ("token_embd.weight", "output.weight"):
        errors = measured["tensors"][name]["error"]
        assert not {"IQ1_S", "IQ2_XXS", "IQ2_XS"} & set(errors) and {"IQ1_M", "IQ2_S", "Q2_K"} <= set(errors)
    assert "IQ1_S" in measured["tensors"]["blk.0.attn_q.weight"]["error"]


def test_routed_experts_are_weighted_by_activation_frequency(engine, bundled_model, profiled):
    from pathlib import Path

    imatrix = Path(profiled["imatrix"])
    only = {}
    for expert in (0, 5):
        freq = np.zeros(8)
        freq[expert] = 2.0
        stats = {"layers": {layer: {"frequency": freq.tolist()} for layer in profiled["layers"]}}
        result = S.measure_sensitivity(engine, bundled_model, imatrix, stats, types=("Q2_K",), rows_per_expert=8)
        only[expert] = result["tensors"]["blk.1.ffn_down_exps.weight"]
        assert result["tensors"]["blk.1.attn_q.weight"]["usage"] == 1.0
    assert only[0]["usage"] == 2.0
    assert only[0]["error"]["Q2_K"] != pytest.approx(only[5]["error"]["Q2_K"], rel=1e-3)


def test_results_are_cached_by_content(engine, bundled_model, profiled, measured, monkeypatch):
    from pathlib import Path

    def must_not_run(*args, **kwargs):
        raise AssertionError("measured again although nothing changed")

    monkeypatch.setattr(S, "tensor_errors", must_not_run)
    again = S.measure_sensitivity(engine, bundled_model, Path(profiled["imatrix"]), profiled, rows_per_expert=8)
    assert again["tensors"] == measured["tensors"]


def test_without_imatrix_the_types_that_need_one_are_left_out(engine, bundled_model):
    result = S.measure_sensitivity(engine, bundled_model, None, None, types=("IQ2_XXS", "Q2_K", "Q4_K"), rows_per_expert=4)
    assert result["types"] == ["Q2_K", "Q4_K"]


@pytest.mark.slow
def test_shipped_gaussian_error_table_is_what_ggml_measures(engine, measured):
    # the weight-less planner's error model (sensitivity.GAUSSIAN_TABLE) must be ggml's own figures
    import json

    from ccmoe_runtime.engine.ggml import Ggml

    shipped = json.loads(S.GAUSSIAN_TABLE.read_text())
    assert shipped["commit"] == engine.commit
    fresh = S.gaussian_errors(Ggml(engine), S.LADDER)
    assert fresh == pytest.approx(shipped["errors"], rel=1e-6)
    ladder = [fresh[k] for k in ("IQ1_S", "IQ2_XXS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert ladder == sorted(ladder, reverse=True)


def test_a_split_gguf_is_measured_and_identified_over_every_shard(engine, tmp_path):
    import os

    from ccmoe_runtime.compress.pipeline import plan_model
    from ccmoe_runtime.compress.quantize import build_key
    from ccmoe_runtime.devices import get_profile
    from ccmoe_runtime.model.inventory import model_digest, read_gguf
    from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf

    spec = SynthSpec(arch="qwen3moe", n_layer=3, n_expert=8, n_expert_used=2, seed=2)
    first = write_random_gguf(spec, tmp_path / "split.gguf", split_max_tensors=10)
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) > 2
    result = S.measure_sensitivity(engine, first, None, None, types=("Q4_K", "Q8_0"), rows_per_expert=2,
                                   use_cache=False)
    inv = read_gguf(first)
    quantizable = {t.name for t in inv.tensors if len(t.shape) >= 2 and t.tensor_class not in ("norm", "router")}
    assert set(result["tensors"]) == quantizable and len(quantizable) > 10    # tensors of the later shards too
    plan = plan_model(engine, inv, get_profile("strixhalo-128g"), 512, 1)
    digest, key = model_digest(first), build_key(engine, first, plan, None)
    data = bytearray(shards[-1].read_bytes())
    data[-64:] = bytes(64)                      # the last shard's last tensor changes, its size does not
    shards[-1].write_bytes(bytes(data))
    st = shards[-1].stat()
    os.utime(shards[-1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))   # even on a coarse clock
    assert model_digest(first) != digest and build_key(engine, first, plan, None) != key


@pytest.mark.slow
def test_sampling_is_bounded_by_experts_and_threads_change_nothing(engine, tmp_path):
    from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf

    spec = SynthSpec(arch="deepseek2", n_layer=2, n_dense_lead=1, n_expert=64, n_expert_used=4, seed=3)
    model = write_random_gguf(spec, tmp_path / "wide.gguf")
    args = dict(types=("Q2_K", "Q4_K"), rows_per_expert=4, use_cache=False)
    full = S.measure_sensitivity(engine, model, None, None, max_experts=64, threads=1, **args)
    few = S.measure_sensitivity(engine, model, None, None, max_experts=8, threads=1, **args)
    twice = S.measure_sensitivity(engine, model, None, None, max_experts=8, threads=2, **args)
    assert twice["tensors"] == few["tensors"]                      # deterministic whatever the thread count
    routed = [n for n, t in few["tensors"].items() if t["class"] == "routed_expert"]
    assert routed and all(few["tensors"][n]["experts_sampled"] == 8 for n in routed)
    assert "experts_sampled" not in full["tensors"][routed[0]]
    for n in routed:                # iid random experts: 8 of 64 estimate the tensor's error within a few percent
        for k in ("Q2_K", "Q4_K"):
            assert few["tensors"][n]["error"][k] == pytest.approx(full["tensors"][n]["error"][k], rel=0.1)
        assert few["tensors"][n]["bytes"] == full["tensors"][n]["bytes"]
    # an eighth of the expert rows is measured (experts_sampled above); no wall-clock comparison: on a shared
    # 2-core machine a 0.1 s run can take 0.3 s (seen in a fresh-clone run)
