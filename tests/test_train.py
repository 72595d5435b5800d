"""The bundled model: its training code matches llama.cpp, its tokenizer is llama.cpp's, its text is English."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from ccmoe_runtime.engine.server import LlamaServer, ServerConfig, complete
from ccmoe_runtime.engine.tools import run_perplexity
from ccmoe_runtime.model.inventory import read_gguf, summarize
from ccmoe_runtime.model.tokenizer import byte_vocab, train_bpe
from ccmoe_runtime.testmodels.corpus import Corpus

torch = pytest.importorskip("torch", reason="the training checks need the `train` extra (scripts/setup.sh --train)")

from ccmoe_runtime.testmodels.train import (  # noqa: E402
    TrainConfig,
    build_model,
    export_gguf,
    train_bundled,
)


def test_torch_model_matches_llama_cpp_logits(bindings, tmp_path):
    """The training graph is llama.cpp's qwen3moe graph: same logits for the same weights and tokens."""
    cfg = TrainConfig(vocab_size=512, n_layer=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():      # random norms and routers too; round to F16 as the GGUF stores them
            p.add_(torch.randn_like(p) * 0.05).copy_(p.half().float())
    model.eval()
    path = export_gguf(model, byte_vocab(512), cfg, tmp_path / "check.gguf", {})
    llm = bindings.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 512, size=48)]
    llm.eval(ids)
    ours = model(torch.tensor([ids]))[0][0].detach().numpy()
    theirs = np.array(llm.scores[: len(ids)])
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(ours).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


def test_bundled_vocab_round_trips_through_llama_cpp(bindings, bundled_model, corpus):
    llm = bindings.Llama(model_path=str(bundled_model), vocab_only=True, verbose=False)
    text = corpus.heldout.read_text()[:5000]
    ids = llm.tokenize(text.encode(), add_bos=False)
    assert len(ids) < len(text) / 2            # the merges compress English text (~2.5 chars a token)
    assert llm.detokenize(ids).decode() == " " + text or llm.detokenize(ids).decode().lstrip(" ") == text


def test_bundled_model_is_a_trained_moe(bundled_model):
    inv = read_gguf(bundled_model)
    s = summarize(inv)
    assert (s.arch, s.n_expert, s.n_expert_used) == ("qwen3moe", 8, 2)
    info = json.loads(inv.metadata["ccmoe.training"])
    assert info["corpus"].startswith("Debian package fortunes")
    assert info["heldout_ppl"] < info["unigram_ppl"] / 3


@pytest.mark.slow
def test_bundled_model_beats_unigram_on_heldout_text(engine, bundled_model, corpus):
    """llama-perplexity on the held-out text, against the training report's unigram baseline."""
    out = run_perplexity(engine, ["-m", str(bundled_model), "-f", str(corpus.heldout), "-c", "256", "-b", "256",
                                  "-t", "2", "--chunks", "60"], str(bundled_model), last_line="Final estimate")
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    assert m, out[-2000:]
    ppl = float(m.group(1))
    info = json.loads(read_gguf(bundled_model).metadata["ccmoe.training"])
    assert ppl < info["unigram_ppl"] / 3, (ppl, info["unigram_ppl"])


def test_bundled_model_writes_english(engine, bundled_model, corpus):
    words = set(re.findall(r"[a-z]+", corpus.train.read_text().lower()))
    with LlamaServer(engine, ServerConfig(model=bundled_model, ctx=256, threads=2)) as server:
        text = complete(server.base_url, "The best thing about life is", n_predict=48)["choices"][0]["text"]
    generated = re.findall(r"[a-z]+", text.lower())
    assert len(generated) >= 8, text
    known = sum(w in words for w in generated) / len(generated)
    assert known > 0.85, (known, text)


@pytest.mark.slow
def test_training_is_deterministic(engine, corpus, tmp_path):
    small = tmp_path / "corpus"
    small.mkdir()
    (small / "train.txt").write_text(corpus.train.read_text()[:60_000])
    (small / "heldout.txt").write_text(corpus.heldout.read_text()[:10_000])
    tiny = Corpus(small / "train.txt", small / "heldout.txt", "test slice", "0")
    cfg = TrainConfig(vocab_size=400, n_embd=64, n_layer=1, n_head=2, n_head_kv=1, head_dim=32, n_ff_exp=64,
                      steps=4, batch=4, seq=32, warmup=2)
    a = train_bundled(tmp_path / "a.gguf", cfg, engine, tiny)
    b = train_bundled(tmp_path / "b.gguf", cfg, engine, tiny)
    assert a["sha256"] == b["sha256"]
    assert a["log"][-1]["loss"] < math.log(cfg.vocab_size) + 0.5


def test_bpe_prefers_frequent_merges():
    vocab = train_bpe("the cat the hat the bat " * 50, 300)
    assert "\u2581the" in vocab.pieces
    pieces = vocab.pieces
    assert vocab.scores[pieces.index("\u2581the")] < 0 and len(pieces) <= 300
