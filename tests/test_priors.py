"""Measured class priors: folding an impact artifact, the shipped deepseek2 table, and the planner reading it."""

from __future__ import annotations

import pytest

from ccmoe_runtime.compress.priors import band_of, class_priors, prior_impact, priors_from_impact


def test_priors_fold_impact_by_kind_and_depth():
    impact = {"impact": {"blk.0.ffn_down.weight": 1.0, "blk.1.ffn_down_exps.weight": 2.0,
                         "blk.2.ffn_down_exps.weight": 4.0, "output.weight": 0.5}, "reference_kld": 0.01, "ctx": 256}
    p = priors_from_impact(impact, 3, "test", bands=3)
    exps = p["kinds"]["ffn_down_exps"]
    assert exps["total"] == 6.0 and exps["layers"] == 2
    assert exps["depth"] == [1.0, round(2 / 3, 4), round(4 / 3, 4)]     # band 0 has no MoE layer: neutral
    assert prior_impact(p, "blk.2.ffn_down_exps.weight", 2, 3, 2) == pytest.approx(6.0 / 2 * 4 / 3, rel=1e-3)
    assert prior_impact(p, "output.weight", None, 3, 0) == 0.5
    assert prior_impact(p, "blk.0.attn_q.weight", 0, 3, 1) is None          # not measured, no alias target
    assert band_of(60, 61) == 2 and band_of(0, 61) == 0



def test_deepseek2_priors_ship_every_class_of_the_architecture():
    p = class_priors("deepseek2")
    assert p is not None and class_priors("qwen3moe") is None
    for kind in ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output", "ffn_gate_exps",
                 "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_down",
                 "token_embd", "output"):
        assert p["kinds"][kind]["total"] > 0, kind


def test_weightless_deepseek_plan_uses_the_measured_priors(engine):
    from ccmoe_runtime.compress.sensitivity import prior_sensitivity
    from ccmoe_runtime.model.synth import builtin_inventory

    inv = builtin_inventory("deepseek-v3-pruned192")
    sens = prior_sensitivity(engine, inv)
    p = class_priors("deepseek2")
    t = sens["tensors"]["blk.30.ffn_down_exps.weight"]
    assert t["usage"] == pytest.approx(prior_impact(p, "blk.30.ffn_down_exps.weight", 30, 61, 58))
    assert "measured class priors" in sens["prior"]


@pytest.mark.slow
def test_without_probe_builds_a_deepseek2_model_is_planned_on_class_priors(engine, deepseek2_model, corpus, tmp_path,
                                                                           monkeypatch):
    import ccmoe_runtime.compress.measure as M
    from ccmoe_runtime.compress.pipeline import plan_model
    from ccmoe_runtime.devices import get_profile
    from ccmoe_runtime.model.inventory import read_gguf

    def no_probes(*args, **kwargs):
        raise AssertionError("probe builds ran for a model above IMPACT_MAX_BYTES")

    monkeypatch.setattr(M, "IMPACT_MAX_BYTES", 1)          # every model is "too large to probe"
    monkeypatch.setattr(M, "measure_impact", no_probes)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus.train.read_text()[:20_000])
    m = M.measure_model(engine, deepseek2_model, calib, tmp_path / "m", ctx=128, chunks=4, threads=2)
    assert m.impact["prior"] and set(m.impact["impact"]) == set(m.sensitivity["tensors"])
    assert all(v > 0 for v in m.impact["impact"].values())
    loaded = M.load_measurements(tmp_path / "m", deepseek2_model)
    plan = plan_model(engine, read_gguf(deepseek2_model), get_profile("strixhalo-128g"), 512, 1, 0.02, loaded)
    assert plan.objective == "predicted KLD"
