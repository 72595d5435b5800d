"""--imatrix: llama.cpp's GGUF and legacy .dat imatrices from the real llama-imatrix, reused by measure and sliced
by prune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from ccmoe_runtime.compress.imatrix import expert_token_counts, read_imatrix_file, write_imatrix_gguf
from ccmoe_runtime.compress.measure import load_measurements, measure_model
from ccmoe_runtime.compress.pipeline import plan_model
from ccmoe_runtime.compress.stats import STREAMED_SEQUENCES, chunks_per_pass
from ccmoe_runtime.core.units import GB
from ccmoe_runtime.devices import get_profile
from ccmoe_runtime.engine.tools import quantize, run_imatrix
from ccmoe_runtime.model.inventory import read_gguf


@pytest.fixture(scope="module")
def calib(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(corpus.train.read_text()[:40_000])
    return path


@pytest.fixture(scope="module")
def computed(engine, bundled_model, calib, tmp_path_factory):
    folder = tmp_path_factory.mktemp("computed")
    return measure_model(engine, bundled_model, calib, folder, ctx=256, chunks=8, impact=False, threads=2)


def _plan(engine, model, measured, budget_gb=0.006):
    return plan_model(engine, read_gguf(model), get_profile("strixhalo-128g"), 512, 1, budget_gb, measured)


@pytest.mark.slow
def test_a_given_imatrix_gives_the_same_measurements_and_plan_as_computing_it(engine, bundled_model, calib, computed,
                                                                             tmp_path):
    given = measure_model(engine, bundled_model, calib, tmp_path, impact=False, threads=2, imatrix=computed.imatrix)
    assert given.expert_stats["imatrix_source"] == str(computed.imatrix)        # taken, not computed again
    assert given.expert_stats["layers"].keys() == computed.expert_stats["layers"].keys()
    for layer, s in computed.expert_stats["layers"].items():
        assert given.expert_stats["layers"][layer]["counts"] == s["counts"] and sum(s["counts"]) > 0
    assert given.sensitivity["tensors"] == computed.sensitivity["tensors"]
    a = _plan(engine, bundled_model, load_measurements(Path(computed.folder), bundled_model))
    b = _plan(engine, bundled_model, load_measurements(tmp_path, bundled_model))
    assert {n: t.type for n, t in a.tensors.items()} == {n: t.type for n, t in b.tensors.items()}
    assert len({t.type for t in a.tensors.values()}) > 1              # a real choice, not one type everywhere


@pytest.mark.slow
def test_batched_chunks_give_the_same_imatrix_as_one_chunk_per_batch(engine, bundled_model, calib, computed, tmp_path):
    # a streamed model is read once per batch: 4 chunks per batch must not change what llama-imatrix collects
    batched = read_imatrix_file(run_imatrix(engine, bundled_model, calib, tmp_path / "b.gguf", ctx=256, chunks=8,
                                            threads=2, sequences=4))
    one = read_imatrix_file(computed.imatrix)
    assert batched.chunk_count == one.chunk_count == 8 and batched.sums.keys() == one.sums.keys()
    for name, s in one.sums.items():
        assert np.array_equal(batched.counts[name], one.counts[name]), name
        assert np.allclose(batched.sums[name], s, rtol=1e-3, atol=1e-6), name


def test_only_a_model_larger_than_ram_is_batched():
    # in RAM each weight is read from memory anyway; streamed, 64 chunks in batches of 8 read the disk 8 times
    assert chunks_per_pass(10 * GB, 100 * GB, 64) == 1
    assert chunks_per_pass(1000 * GB, 100 * GB, 64) == STREAMED_SEQUENCES == 8
    assert chunks_per_pass(1000 * GB, 100 * GB, 3) == 3          # never more sequences than chunks


@pytest.mark.slow
def test_legacy_dat_from_llama_imatrix_round_trips(engine, bundled_model, calib, computed, tmp_path):
    dat = run_imatrix(engine, bundled_model, calib, tmp_path / "legacy.dat", ctx=256, chunks=8, threads=2,
                      output_format="dat")
    legacy, modern = read_imatrix_file(dat), read_imatrix_file(computed.imatrix)
    assert legacy.legacy and not modern.legacy and legacy.chunk_count == modern.chunk_count == 8
    assert set(legacy.sums) == set(modern.sums)
    for name, mean in modern.means().items():
        seen = modern.counts[name] > 0           # the legacy layout stores 1 for an unused expert, as means() does
        assert np.allclose(legacy.means()[name].reshape(mean.shape)[seen] if mean.ndim > 1 else legacy.means()[name],
                           mean[seen] if mean.ndim > 1 else mean, rtol=1e-5), name
    assert not expert_token_counts(legacy) and expert_token_counts(modern)   # .dat has no per-expert counts
    converted = write_imatrix_gguf(legacy, tmp_path / "converted.imatrix.gguf")
    again = read_imatrix_file(converted)
    assert all(np.allclose(again.means()[n], m) for n, m in legacy.means().items())
    # llama-quantize takes the converted file for a type that needs an imatrix
    out = quantize(engine, bundled_model, tmp_path / "iq2.gguf", "Q8_0", ["^blk\\.0\\.ffn_up_exps\\.weight$=iq2_xxs"],
                   imatrix=converted, threads=2)
    assert {t.name: t.ggml_type for t in read_gguf(out).tensors}["blk.0.ffn_up_exps.weight"] == "IQ2_XXS"
    # measure takes the .dat: no expert statistics (nothing to derive them from), sensitivity as usual
    m = measure_model(engine, bundled_model, calib, tmp_path / "m", impact=False, threads=2, imatrix=dat)
    assert m.expert_stats is None and "IQ2_XXS" in m.sensitivity["tensors"]["blk.1.ffn_down_exps.weight"]["error"]


@pytest.mark.slow
def test_prune_slices_the_imatrix_to_the_kept_experts(engine, bundled_model, calib, computed, tmp_path):
    out = tmp_path / "pruned.gguf"
    result = run_cli("prune", str(bundled_model), "--keep", "4", "--calib", str(calib), "--chunks", "4",
                     "--imatrix", str(computed.imatrix), "-o", str(out), "--json", check=True)
    report = json.loads(result.stdout)
    sliced = read_imatrix_file(Path(report["imatrix"]))
    assert Path(report["imatrix"]) == tmp_path / "pruned.imatrix.gguf"
    whole = read_imatrix_file(computed.imatrix)
    for layer, kept in report["kept"].items():
        name = f"blk.{layer}.ffn_down_exps.weight"
        assert sliced.sums[name].shape[0] == 4
        assert np.array_equal(sliced.sums[name], whole.sums[name][kept].astype(np.float32))
        assert np.array_equal(sliced.counts[name], whole.counts[name][kept])
    # the sliced imatrix fits the pruned model: measure takes it
    m = measure_model(engine, out, calib, tmp_path / "m", impact=False, threads=2, imatrix=Path(report["imatrix"]))
    assert all(len(s["counts"]) == 4 for s in m.expert_stats["layers"].values())


@pytest.mark.slow
def test_bad_imatrix_files_are_one_line_errors(bundled_model, qwen3moe_model, tmp_path):
    text = tmp_path / "notes.dat"
    text.write_text("not an imatrix at all\n")
    short = tmp_path / "short.dat"
    short.write_bytes((3).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"blk.0")
    other = tmp_path / "other.imatrix.gguf"
    from ccmoe_runtime.compress.imatrix import Imatrix

    write_imatrix_gguf(Imatrix({"blk.0.nothing.weight": np.ones((1, 64))}, {"blk.0.nothing.weight": np.ones(1)}),
                       other)
    cases = {text: "not a llama.cpp imatrix", short: "not a llama.cpp imatrix", bundled_model: "general.type",
             other: "names no tensor"}
    for path, words in cases.items():
        out = tmp_path / path.stem
        result = run_cli("measure", str(qwen3moe_model), "--imatrix", str(path), "-o", str(out), "--no-impact")
        assert result.returncode == 2, (path, result.stderr)
        assert result.stderr.startswith("ccmoe-run: error:") and result.stderr.count("\n") == 1, result.stderr
        assert words in result.stderr, result.stderr
        assert not any(out.glob("*.json")), path            # nothing half-written
