"""Router statistics through the bindings' eval callback, and expert pruning of deepseek2/qwen3moe GGUFs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import ccmoe_runtime.core.files as files_mod
import ccmoe_runtime.prune.prune as prune_mod
from ccmoe_runtime.compress.router import (
    load_router_stats,
    router_stats,
    save_router_stats,
)
from ccmoe_runtime.compress.stats import expert_counts
from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.engine.tools import quantize, run_imatrix
from ccmoe_runtime.model.inventory import read_gguf
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf
from ccmoe_runtime.prune.prune import (
    choose_experts,
    importance,
    prune_model,
    resolve_keep,
    write_pruned_gguf,
)


@pytest.fixture(scope="module")
def calib(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prune-calib") / "calib.txt"
    path.write_text(corpus.heldout.read_text()[:30_000])
    return path


@pytest.fixture(scope="module")
def qwen_stats(engine, qwen3moe_model, calib) -> dict:
    return router_stats(engine, qwen3moe_model, calib, ctx=128, chunks=4, threads=2)


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _fields(path: Path) -> dict:
    import gguf

    return {f.name: (f.types, f.contents()) for f in gguf.GGUFReader(str(path)).fields.values()
            if not f.name.startswith("GGUF.")}


def _runs(bindings, path: Path) -> np.ndarray:
    """llama.cpp loads the model and evaluates a prompt; returns the last logits."""
    llm = bindings.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ids = llm.tokenize(b"The best thing about life is", add_bos=True)
    llm.eval(ids)
    logits = np.array(llm.scores[len(ids) - 1])
    assert np.isfinite(logits).all() and logits.std() > 0
    return logits


def _one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccmoe-run: error:"), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def _check_sliced(src: Path, dst: Path, kept: dict[str, list[int]]) -> None:
    """Expert tensors hold exactly the kept experts' bytes; every other tensor is byte-identical."""
    before, after = _tensors(src), _tensors(dst)
    assert list(before) == list(after)
    for name, t in before.items():
        a = np.asarray(after[name].data)
        layer = name.split(".")[1] if name.startswith("blk.") else None
        if prune_mod._EXPERT_AXIS.match(name):
            ids = kept[layer]
            assert a.shape[0] == len(ids) and list(after[name].shape)[-1] == len(ids)
            assert a.tobytes() == np.asarray(t.data)[ids].tobytes(), name
        else:
            assert after[name].tensor_type == t.tensor_type and a.tobytes() == np.asarray(t.data).tobytes(), name


# ---------------------------------------------------------------- router statistics

def _imatrix_one_chunk_per_batch(engine, model: Path, text: Path, out: Path, ctx: int, chunks: int) -> Path:
    """llama-imatrix evaluating one chunk per batch (-b ctx), as router_stats does."""
    cmd = [str(engine.tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
           "-b", str(ctx), "--chunks", str(chunks), "-t", "2"]
    subprocess.run(cmd, capture_output=True, check=True)
    return out


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_router_counts_equal_llama_imatrix_counts(arch, engine, calib, qwen3moe_model, deepseek2_model, tmp_path):
    model = qwen3moe_model if arch == "qwen3moe" else deepseek2_model
    stats = router_stats(engine, model, calib, ctx=128, chunks=6, threads=2)
    exact = expert_counts(_imatrix_one_chunk_per_batch(engine, model, calib, tmp_path / "im1.gguf", 128, 6))
    packed = expert_counts(run_imatrix(engine, model, calib, tmp_path / "im.gguf", ctx=128, chunks=6, threads=2))
    assert sorted(int(x) for x in stats["layers"]) == sorted(exact) == sorted(packed)
    for layer, d in stats["layers"].items():
        # Same tokens, chunks, BOS handling and micro-batches as llama-imatrix -b 128: the counts agree exactly.
        np.testing.assert_array_equal(d["counts"], exact[int(layer)])
        # By default llama-imatrix packs 2048/ctx chunks into one batch cut into 512-token micro-batches, which
        # evaluates some chunks in pieces; the different rounding flips a few near-tied routing decisions.
        c, p = np.asarray(d["counts"], dtype=float), packed[int(layer)]
        assert np.abs(c - p).sum() <= 0.01 * c.sum() and np.corrcoef(c, p)[0, 1] > 0.999
        assert sum(d["frequency"]) == pytest.approx(stats["n_expert_used"], abs=1e-4)
        assert all(0 <= s <= 3 for s in d["mean_score"]) and len(d["mean_prob"]) == stats["n_expert"]
    assert stats["tokens"] == 6 * 128
    # qwen3moe renormalises the chosen weights; deepseek2 also scales them (routed_scale 2.5)
    assert stats["score_node"] == {"qwen3moe": "ffn_moe_weights_norm", "deepseek2": "ffn_moe_weights_scaled"}[arch]
    path = save_router_stats(stats, tmp_path / "x.router-stats.json")
    assert load_router_stats(path)["layers"] == stats["layers"]


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_router_pass_of_several_chunks_at_once_counts_the_same(arch, engine, calib, qwen3moe_model, deepseek2_model):
    # A model larger than RAM is read from disk once per pass, so router_stats then decodes several chunks per
    # pass (one sequence each); the chunks, positions and BOS are the same, so the statistics must be too.
    model = qwen3moe_model if arch == "qwen3moe" else deepseek2_model
    one = router_stats(engine, model, calib, ctx=128, chunks=6, threads=2, sequences=1)
    three = router_stats(engine, model, calib, ctx=128, chunks=6, threads=2, sequences=3)
    assert three["tokens"] == one["tokens"] == 6 * 128 and sorted(three["layers"]) == sorted(one["layers"])
    for layer, d in one["layers"].items():
        np.testing.assert_array_equal(three["layers"][layer]["counts"], d["counts"])
        np.testing.assert_allclose(three["layers"][layer]["mean_score"], d["mean_score"], rtol=1e-3, atol=1e-5)


def test_router_scores_are_renormalised_weights(qwen_stats):
    """With top-2 renormalised weights, each token's two scores sum to 1: so do the per-expert score sums."""
    total = sum(np.dot(d["counts"], d["mean_score"]) for d in qwen_stats["layers"].values())
    assert total == pytest.approx(qwen_stats["tokens"] * len(qwen_stats["layers"]), rel=1e-4)


# ---------------------------------------------------------------- choosing experts

def test_importance_normalises_by_the_layer_maximum():
    layer = {"frequency": [0.5, 0.25, 1.0, 0.25], "mean_score": [0.8, 0.4, 0.2, 0.1]}
    np.testing.assert_allclose(importance(layer, 1.0), [0.5, 0.25, 1.0, 0.25])
    np.testing.assert_allclose(importance(layer, 0.0), [1.0, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(importance(layer, 0.5), [0.75, 0.375, 0.625, 0.1875])
    stats = {"layers": {"0": layer}}
    assert choose_experts(stats, [0], 4, 2, 0.5) == {0: [0, 2]}
    assert choose_experts(stats, [0], 4, 2, 1.0) == {0: [0, 2]}
    assert choose_experts(stats, [0], 4, 2, 0.0) == {0: [0, 1]}
    assert choose_experts(None, [0, 1], 8, 3, None, seed=4) == choose_experts(None, [0, 1], 8, 3, None, seed=4)
    assert resolve_keep(8, None, 0.875) == 7 and resolve_keep(8, None, 0.75) == 6 and resolve_keep(256, None, 0.75) == 192


# ---------------------------------------------------------------- pruning

def test_prune_qwen3moe_slices_experts_and_router_rows(engine, bindings, qwen3moe_model, qwen_stats, tmp_path):
    out = tmp_path / "q6.gguf"
    r = prune_model(engine, qwen3moe_model, out, keep=6, stats=qwen_stats)
    _check_sliced(qwen3moe_model, out, r.kept)
    meta = read_gguf(out).metadata
    assert meta["qwen3moe.expert_count"] == 6 and meta["qwen3moe.expert_used_count"] == 2   # round(2 x 6 / 8)
    assert meta["ccmoe.original_expert_count"] == 8 and meta["ccmoe.original_expert_used_count"] == 2
    assert json.loads(meta["ccmoe.pruning"])["alpha"] == 0.5
    before, after = _fields(qwen3moe_model), _fields(out)
    changed = {"qwen3moe.expert_count", "qwen3moe.expert_used_count"}
    assert {k: v for k, v in before.items() if k not in changed} == {k: v for k, v in after.items()
                                                                     if k in before and k not in changed}
    assert r.bytes_after < r.bytes_before and all(0 < s < 1 for s in r.kept_share.values())
    _runs(bindings, out)


def test_prune_deepseek2_keeps_shared_and_dense_and_adjusts_k(engine, bindings, deepseek2_model, calib, tmp_path):
    out = tmp_path / "d8.gguf"
    r = prune_model(engine, deepseek2_model, out, keep_ratio=0.5, calib=calib, ctx=128, chunks=4, threads=2)
    assert sorted(r.kept) == ["1", "2", "3"]                  # layer 0 is dense
    _check_sliced(deepseek2_model, out, r.kept)               # exp_probs_b, router, experts sliced; shexp intact
    t = _tensors(out)
    assert list(t["blk.1.exp_probs_b.bias"].shape) == [8] and list(t["blk.1.ffn_gate_inp.weight"].shape) == [256, 8]
    meta = read_gguf(out).metadata
    assert meta["deepseek2.expert_count"] == 8 and meta["deepseek2.expert_used_count"] == 2   # round(4 x 8 / 16)
    assert Path(r.stats).is_file() and load_router_stats(Path(r.stats))["ctx"] == 128
    _runs(bindings, out)


def test_prune_deepseek2_expert_groups_stay_valid(engine, bindings, deepseek2_model, calib, tmp_path):
    import gguf

    u32 = gguf.GGUFValueType.UINT32
    grouped = write_pruned_gguf(deepseek2_model, tmp_path / "g.gguf", {}, {
        "deepseek2.expert_group_count": (4, u32), "deepseek2.expert_group_used_count": (2, u32)})
    _runs(bindings, grouped)
    stats = router_stats(engine, grouped, calib, ctx=128, chunks=4, threads=2)
    r = prune_model(engine, grouped, tmp_path / "g8.gguf", keep=8, stats=stats)
    assert r.counts.balanced_groups and all(sum(1 for e in ids if e // 4 == g) == 2
                                                  for ids in r.kept.values() for g in range(4))
    assert read_gguf(tmp_path / "g8.gguf").metadata["deepseek2.expert_group_count"] == 4
    _runs(bindings, tmp_path / "g8.gguf")
    r = prune_model(engine, grouped, tmp_path / "g6.gguf", keep=6, stats=stats)
    meta = read_gguf(tmp_path / "g6.gguf").metadata
    assert meta["deepseek2.expert_group_count"] == 1 and meta["deepseek2.expert_group_used_count"] == 1
    assert "group-limited routing turned off" in r.counts.notes[0]
    _runs(bindings, tmp_path / "g6.gguf")


def test_quantized_experts_are_byte_sliced_and_pruning_twice_keeps_the_original_counts(
        engine, bindings, qwen3moe_model, qwen_stats, tmp_path):
    q = quantize(engine, qwen3moe_model, tmp_path / "q4.gguf", "Q4_K_M", [], threads=2)
    r1 = prune_model(engine, q, tmp_path / "q4-6.gguf", keep=6, stats=qwen_stats)
    _check_sliced(q, tmp_path / "q4-6.gguf", r1.kept)
    assert _tensors(tmp_path / "q4-6.gguf")["blk.0.ffn_up_exps.weight"].tensor_type.name == "Q4_K"
    stats6 = router_stats(engine, tmp_path / "q4-6.gguf", qwen_stats["calibration"], ctx=128, chunks=4, threads=2)
    r2 = prune_model(engine, tmp_path / "q4-6.gguf", tmp_path / "q4-4.gguf", keep=4, method="frequency", stats=stats6)
    meta = read_gguf(tmp_path / "q4-4.gguf").metadata
    assert meta["ccmoe.original_expert_count"] == 8 and meta["qwen3moe.expert_used_count"] == 1   # round(2 x 4 / 8)
    assert r2.alpha == 1.0
    pruned = json.loads(meta["ccmoe.pruned_experts"])          # ids of the unpruned model, composed over both runs
    assert all(pruned[layer] == [r1.kept[layer][i] for i in r2.kept[layer]] for layer in pruned)
    _runs(bindings, tmp_path / "q4-4.gguf")


def test_split_input_becomes_one_pruned_file(bindings, tmp_path):
    spec = SynthSpec(arch="qwen3moe", n_layer=2, n_expert=8, n_expert_used=2, seed=7)
    first = write_random_gguf(spec, tmp_path / "split.gguf", split_max_tensors=12)
    assert "-00001-of-" in first.name
    r = prune_model(None, first, tmp_path / "one.gguf", keep=5, method="random", seed=1)
    assert r.alpha is None and r.kept_share == {"0": None, "1": None}
    meta = read_gguf(tmp_path / "one.gguf").metadata
    assert not any(k.startswith("split.") for k in meta) and meta["qwen3moe.expert_count"] == 5
    assert len(read_gguf(tmp_path / "one.gguf").tensors) == len(read_gguf(first).tensors)
    _runs(bindings, tmp_path / "one.gguf")


@pytest.mark.slow
def test_bundled_model_cli_prune_generates(bundled_model, bindings, calib, tmp_path):
    out = tmp_path / "b6.gguf"
    result = run_cli("prune", str(bundled_model), "--keep-ratio", "0.75", "--calib", str(calib), "--ctx", "256",
                     "--chunks", "4", "-t", "2", "-o", str(out), check=True)
    assert "8 -> 6 experts" in result.stdout and "alpha 0.5" in result.stdout and "experts used per token 2 -> 2" in result.stdout
    stats_file = tmp_path / "ccmoe-mini-moe-f16.router-stats.json"
    assert load_router_stats(stats_file)["n_expert"] == 8
    llm = bindings.Llama(model_path=str(out), n_ctx=128, n_threads=2, verbose=False)
    text = llm.create_completion("The best thing about life is", max_tokens=12, temperature=0)["choices"][0]["text"]
    assert len(text.strip()) > 0
    again = run_cli("prune", str(bundled_model), "--keep", "4", "--stats", str(stats_file), "-o", str(tmp_path / "b4.gguf"),
                    "--json", check=True)
    data = json.loads(again.stdout)
    assert data["counts"]["experts_used_new"] == 1 and len(data["kept"]["0"]) == 4


# ---------------------------------------------------------------- bad inputs

@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(bundled_model, dense_model, calib, tmp_path):
    out = tmp_path / "x.gguf"
    cases = [(["--keep", "8"], "cannot keep 8 of 8"), (["--keep", "1"], "fewer than the 2 used"),
             (["--keep", "4", "--method", "magic"], "unknown pruning method"),
             (["--keep-ratio", "1.5"], "outside (0, 1)"), (["--keep", "4", "--keep-ratio", "0.5"], "exactly one"),
             (["--keep", "4", "--experts-used", "5"], "outside 1..4"), (["--keep", "4", "--alpha", "2"], "outside [0, 1]")]
    for args, words in cases:
        _one_line_error(run_cli("prune", str(bundled_model), *args, "--calib", str(calib), "-o", str(out)), 2, words)
    _one_line_error(run_cli("prune", str(dense_model), "--keep", "2", "--calib", str(calib), "-o", str(out)), 2, "dense")
    out.write_bytes(b"keep me")
    _one_line_error(run_cli("prune", str(bundled_model), "--keep", "4", "--method", "random", "-o", str(out)), 2,
                    "already exists")
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_no_file_is_left_when_writing_fails(engine, qwen3moe_model, qwen_stats, tmp_path, monkeypatch):
    def broken(tensor, kept):
        raise OSError("disk went away")

    monkeypatch.setattr(prune_mod, "_sliced_data", broken)
    with pytest.raises(CcmoeError, match="disk went away"):     # one line, not a traceback
        prune_model(engine, qwen3moe_model, tmp_path / "p.gguf", keep=4, stats=qwen_stats)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(files_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(CcmoeError, match="free") as e:
        prune_model(engine, qwen3moe_model, tmp_path / "p.gguf", keep=4, stats=qwen_stats)
    assert e.value.exit_code == 4 and list(tmp_path.iterdir()) == []
