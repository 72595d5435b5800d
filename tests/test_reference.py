"""The reference model: its torch graph is llama.cpp's deepseek2 graph, its training is deterministic."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ccmoe_runtime.model.inventory import read_gguf, summarize
from ccmoe_runtime.model.tokenizer import byte_vocab

torch = pytest.importorskip("torch", reason="the training checks need the `train` extra (scripts/setup.sh --train)")

from ccmoe_runtime.testmodels.reference import (  # noqa: E402
    RefConfig,
    build_model,
    export_gguf,
    load_shards,
    load_state,
    pack_int,
    unpack_int,
    routing_summary,
    save_shards,
    state_arrays,
    train_model,
)

TINY = dict(vocab_size=512, n_embd=64, n_layer=3, n_dense_lead=1, n_head=2, q_lora_rank=32, kv_lora_rank=32,
            qk_nope_dim=16, qk_rope_dim=8, v_head_dim=16, n_ff=96, n_expert=8, n_expert_used=2, n_ff_exp=32)


def _random_model(cfg: RefConfig):
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():       # random norms, routers and expert biases too; round to F16 as the GGUF stores them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05).copy_(p.half().float())
        for blk in model.blocks:
            if not blk.dense:
                blk.moe.bias.copy_(torch.randn(cfg.n_expert) * 0.1)
    return model.eval()


def test_torch_model_matches_llama_cpp_logits(bindings, tmp_path):
    """MLA, dense lead, sigmoid router with expert bias, shared expert: same logits as llama.cpp's deepseek2."""
    cfg = RefConfig(**TINY)
    model = _random_model(cfg)
    path = export_gguf(state_arrays(model), byte_vocab(512), cfg, tmp_path / "check.gguf", {})
    s = summarize(read_gguf(path))
    assert (s.arch, s.n_expert, s.n_expert_used) == ("deepseek2", 8, 2)
    llm = bindings.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 512, size=48)]
    llm.eval(ids)
    ours = model(torch.tensor([ids]))[0][0].detach().numpy()
    theirs = np.array(llm.scores[: len(ids)])
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(ours).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


@pytest.mark.slow
def test_training_is_deterministic_and_shards_round_trip(tmp_path):
    cfg = RefConfig(**TINY, steps=3, batch=2, seq=32, warmup=1)
    tokens = np.random.default_rng(1).integers(3, 512, size=4000)
    a, log = train_model(cfg, tokens, tokens[:1000])
    b, _ = train_model(cfg, tokens, tokens[:1000])
    sa, sb = state_arrays(a), state_arrays(b)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert any(np.abs(sa[f"blocks.{i}.moe.bias"]).sum() > 0 for i in (1, 2))   # loss-free balancing moved
    save_shards(a, cfg, tmp_path / "w", {"device": "cpu"}, shard_bytes=50_000)
    state, cfg2, info = load_shards(tmp_path / "w")
    assert len(list((tmp_path / "w").glob("weights-*.npz"))) > 1 and cfg2 == cfg and info["device"] == "cpu"
    assert np.allclose(state["blocks.1.moe.gate"], sa["blocks.1.moe.gate"], atol=1e-3)


def test_routing_summary():
    uniform = routing_summary(np.full(32, 10), 1)
    assert uniform["entropy_share"] == 1.0 and uniform["top10pct_share"] == pytest.approx(3 / 32, abs=1e-3)
    skewed = routing_summary(np.array([100, 100, 100] + [1] * 29), 2)
    assert skewed["top10pct_share"] > 0.9 and skewed["entropy_share"] < 0.5


@pytest.mark.slow
def test_train_reference_exports_weights_trained_elsewhere(engine, tmp_path, monkeypatch):
    """`train-reference --weights DIR`: shards from the GPU job -> a deepseek2 GGUF llama.cpp loads, with its report."""
    from ccmoe_runtime.testmodels.corpus import Corpus, ensure_reference_corpus
    from ccmoe_runtime.testmodels.reftrain import train_reference_model

    monkeypatch.setenv("CCMOE_CACHE_DIR", str(tmp_path / "cache"))
    full = ensure_reference_corpus()
    (tmp_path / "train.txt").write_text(full.train.read_text()[:40_000])
    (tmp_path / "heldout.txt").write_text(full.heldout.read_text()[:8_000])
    tiny = Corpus(tmp_path / "train.txt", tmp_path / "heldout.txt", "test slice", "0")
    cfg = RefConfig(**TINY, steps=2, batch=2, seq=32, warmup=1)
    model, log = train_model(cfg, np.arange(3, 500).repeat(8), np.arange(3, 500))
    save_shards(model, cfg, tmp_path / "w", {"device": "cpu", "steps_run": 2, "train_seconds": 0.1, "log": log,
                                              "parameters": 1, "heldout_loss_torch": 6.0, "routing": []})
    info = train_reference_model(tmp_path / "ref.gguf", None, None, False, "cpu", tmp_path / "w", engine, tiny)
    s = summarize(read_gguf(info["output"]))
    assert (s.arch, s.n_expert, s.n_expert_used, s.n_expert_shared, s.n_dense_lead, s.n_layers) == ("deepseek2", 8, 2, 1, 1, 3)
    assert info["unigram_ppl"] > 1 and (tmp_path / "ref.reference.json").is_file()


def test_int_packing_round_trips_within_half_a_step():
    a = np.random.default_rng(0).standard_normal((3, 8, 512)).astype(np.float32)
    q, scale = pack_int(a, 63)
    assert q.dtype == np.int8 and np.abs(q).max() <= 63 and scale.shape == (3, 8, 2)
    step = np.repeat(scale.astype(np.float32), 256, axis=-1)
    assert np.all(np.abs(unpack_int(q, scale) - a) <= 0.5 * step + 1e-6)
    short = np.zeros((4, 32), np.float32)           # a row shorter than 256 and all zero: one zero scale per row
    assert np.array_equal(unpack_int(*pack_int(short, 63)), short)


@pytest.mark.slow
def test_job_shards_are_the_reference_llama_cpp_runs(bindings, tmp_path):
    """The GPU job's compact shards (7-bit per 256 + F16 scales) -> GGUF: llama.cpp's logits match the torch model
    holding the same rounded weights, for the k-quant-shaped recipe (rows of 256)."""
    from ccmoe_runtime.testmodels.reference_job import run_job

    cfg = RefConfig(**{**TINY, "n_embd": 256, "n_ff_exp": 256, "n_ff": 256, "q_lora_rank": 256, "n_dense_lead": 1})
    tokens = np.random.default_rng(2).integers(3, 512, size=6000)
    np.savez(tmp_path / "t.npz", train=tokens.astype(np.uint16), heldout=tokens[:700].astype(np.uint16))
    cfg = replace(cfg, steps=3, batch=2, seq=64, warmup=1, seed=7)
    info = run_job(str(tmp_path / "t.npz"), str(tmp_path / "w"), cfg, check_steps=2)
    assert info["determinism"]["same"] and info["steps_run"] == 3
    state, cfg2, meta = load_shards(tmp_path / "w")
    assert meta["format"]["levels"] == 63 and cfg2.n_ff_exp == 256
    model = build_model(cfg2)
    load_state(model, state)
    model.eval()
    path = export_gguf(state, byte_vocab(512), cfg2, tmp_path / "ref.gguf", {})
    llm = bindings.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 512, size=40)]
    llm.eval(ids)
    ours = model(torch.tensor([ids]))[0][0].detach().numpy()
    theirs = np.array(llm.scores[: len(ids)])
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(ours).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


@pytest.mark.slow
def test_kl_divergence_reports_error_bars(engine, bindings, tmp_path):
    """llama-perplexity's ± for top-token agreement and perplexity reach Quality (benchmarks print them)."""
    from ccmoe_runtime.compress.quality import kl_divergence, save_reference_logits
    from ccmoe_runtime.engine.tools import quantize

    cfg = RefConfig(**TINY)
    path = export_gguf(state_arrays(_random_model(cfg)), byte_vocab(512), cfg, tmp_path / "f16.gguf", {})
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} and {i % 13}" for i in range(3000)))
    ref = save_reference_logits(engine, path, text, tmp_path / "ref.kld", ctx=128, threads=2, chunks=6)
    q = kl_divergence(engine, quantize(engine, path, tmp_path / "q4.gguf", "Q4_0", []), ref, ctx=128, threads=2)
    assert q.chunks >= 5 and q.mean_kld > 0 and q.mean_kld_se > 0
    assert q.same_top_se is not None and 0 < q.same_top_se < 0.2 and q.ppl_se is not None and q.ppl_se > 0
