"""Planning under a byte budget from measured sensitivity, and the llama-quantize type file it writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import ccmoe_runtime.compress.plan as P
from ccmoe_runtime.compress.sensitivity import measure_sensitivity
from ccmoe_runtime.compress.stats import measure_expert_stats
from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.model.inventory import read_gguf


@pytest.fixture(scope="module")
def measured(engine, bundled_model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    calib = out / "calib.txt"
    calib.write_text(corpus.train.read_text()[:40_000])
    prof = measure_expert_stats(engine, bundled_model, calib, out, ctx=256, chunks=8, threads=2)
    return Path(prof["imatrix"]), measure_sensitivity(engine, bundled_model, Path(prof["imatrix"]), prof, rows_per_expert=8)


def _budget(n_bytes: int) -> P.Budget:
    return P.Budget("test", n_bytes, 0, 0, 0, n_bytes)


def test_hull_drops_dominated_and_concave_options():
    opts = [("a", 100, 1.0), ("b", 200, 0.5), ("c", 250, 0.6), ("d", 300, 0.45), ("e", 400, 0.1)]
    hull = P._hull(opts)
    assert [o[0] for o in hull] == ["a", "b", "e"]   # c is dominated, d lies above the b-e segment


@pytest.mark.slow
def test_plans_fit_and_more_bytes_buy_less_error(bundled_model, measured):
    inv = read_gguf(bundled_model)
    _, sens = measured
    errors = []
    for gb in (0.004, 0.006, 0.009):
        plan = P.make_plan(inv, sens, _budget(int(gb * 1e9)))
        assert plan.total_bytes <= gb * 1e9
        assert set(plan.tensors) == set(sens["tensors"])
        errors.append(plan.total_error)
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.slow
def test_impossible_budget_names_the_minimum(bundled_model, measured):
    with pytest.raises(CcmoeError, match=r"even the smallest plan needs [\d.]+ MB but the budget for weights is 1.0 MB"):
        P.make_plan(read_gguf(bundled_model), measured[1], _budget(1_000_000))


@pytest.mark.slow
def test_llama_quantize_applies_the_plan(engine, bundled_model, measured, tmp_path):
    imatrix, sens = measured
    plan = P.make_plan(read_gguf(bundled_model), sens, _budget(5_000_000))
    types_file = tmp_path / "types.txt"
    types_file.write_text("\n".join(P.tensor_type_lines(plan)) + "\n")
    out = tmp_path / "planned.gguf"
    done = subprocess.run([str(engine.tool("llama-quantize")), "--imatrix", str(imatrix), "--tensor-type-file",
                           str(types_file), str(bundled_model), str(out), "Q8_0", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    built = {t.name: t for t in read_gguf(out).tensors}
    for name, t in plan.tensors.items():
        assert built[name].ggml_type == t.type, name
    assert sum(t.n_bytes for t in built.values()) == pytest.approx(plan.total_bytes, rel=0.01)
