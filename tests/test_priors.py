"""Measured class priors: folding an impact artifact, the shipped deepseek2 table, and the planner reading it."""

from __future__ import annotations

import pytest

from ccmoe_runtime.compress.priors import band_of, prior_impact, priors_from_impact


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

