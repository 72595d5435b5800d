"""The profile stage: llama-imatrix on calibration text, expert activation frequencies as an artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from ccmoe_runtime.compress.stats import measure_expert_stats
from ccmoe_runtime.core.artifacts import load_artifact
from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf


@pytest.fixture(scope="module")
def calib(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(corpus.heldout.read_text()[:30_000])
    return path


def test_profile_writes_frequencies_that_follow_the_skew(engine, calib, tmp_path):
    spec = SynthSpec(arch="deepseek2", n_layer=3, n_dense_lead=1, n_expert=8, n_expert_used=2, skew=3.0, seed=5)
    model = write_random_gguf(spec, tmp_path / "skewed.gguf")
    result = measure_expert_stats(engine, model, calib, tmp_path / "out", ctx=128, chunks=8, threads=2)
    doc = load_artifact(tmp_path / "out" / "skewed.expert-stats.json", "expert-stats", 1)
    assert (tmp_path / "out" / "skewed.imatrix.gguf").is_file()
    assert sorted(doc["layers"]) == ["1", "2"]                      # the MoE layers; layer 0 is dense
    for layer in doc["layers"].values():
        freq = np.array(layer["frequency"])
        assert freq.sum() == pytest.approx(2.0, abs=1e-3)           # two experts per token
        assert freq[:4].sum() > 0.8 * freq.sum()                    # the skew made experts 0-3 popular
    assert result["n_expert_used"] == 2 and doc["model_digest"] and doc["calibration_sha256"]
    with pytest.raises(CcmoeError, match="already exists"):
        measure_expert_stats(engine, model, calib, tmp_path / "out", ctx=128, chunks=8)


@pytest.mark.slow
def test_profile_cli_on_the_bundled_model(bundled_model, calib, tmp_path):
    result = run_cli("profile", str(bundled_model), "--calib", str(calib), "-o", str(tmp_path), "--ctx", "256",
                     "--chunks", "8", "--json", check=True)
    data = json.loads(result.stdout)
    assert data["n_expert"] == 8 and len(data["layers"]) == 4
    assert all(0 < layer["entropy_bits"] <= 3.0 for layer in data["layers"].values())


def test_profile_refuses_missing_calibration_text(engine, bundled_model, tmp_path):
    with pytest.raises(CcmoeError, match="does not exist"):
        measure_expert_stats(engine, bundled_model, tmp_path / "nope.txt", tmp_path / "o")
    result = run_cli("profile", str(bundled_model), "--calib", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
