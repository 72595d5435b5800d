"""`train-reference`: corpus -> tokens (llama.cpp's tokenizer) -> training (CUDA if present) -> deepseek2 GGUF, cached."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..core.artifacts import file_sha256
from ..core.errors import CcmoeError
from ..core.files import check_writable, write_atomic
from ..core.paths import cache_root
from ..engine.build import load_bindings
from ..model.tokenizer import Vocab, train_bpe
from .corpus import Corpus
from .reference import (
    RefConfig,
    recipe,
    evaluate,
    export_gguf,
    load_shards,
    parameter_count,
    pick_device,
    routing_stats,
    state_arrays,
    train_model,
    unigram_loss,
)
from .train import TrainConfig, tokenize_with_llama, write_vocab_only


def reference_dir() -> Path:
    return cache_root() / "reference"


def default_reference_path(device: str, seed: int, steps: int) -> Path:
    return reference_dir() / f"ccmoe-reference-ds2-{device}-s{seed}-{steps}.gguf"


def tokens_path(corpus: Corpus, vocab_size: int) -> Path:
    key = hashlib.sha256(f"{corpus.sha256}:{vocab_size}".encode()).hexdigest()[:16]
    return reference_dir() / f"tokens-{key}.npz"


def reference_tokens(corpus: Corpus, vocab_size: int, engine) -> tuple[np.ndarray, np.ndarray, Vocab]:
    """Train and held-out token ids and the BPE vocabulary, made once (train_bpe + llama.cpp) and cached."""
    path = tokens_path(corpus, vocab_size)
    if path.is_file():
        with np.load(path) as z:
            v = json.loads(str(z["vocab"]))
            return z["train"].astype(np.int64), z["heldout"].astype(np.int64), Vocab(v["pieces"], v["scores"], v["types"])
    train_text, held_text = corpus.train.read_text(), corpus.heldout.read_text()
    vocab = train_bpe(train_text, vocab_size)
    llama_cpp = load_bindings(engine)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_gguf = write_vocab_only(Path(tmp) / "vocab.gguf", vocab, TrainConfig(vocab_size=vocab_size))
        train, held = (tokenize_with_llama(llama_cpp, vocab_gguf, t) for t in (train_text, held_text))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, train=train.astype(np.uint16), heldout=held.astype(np.uint16),
                 vocab=json.dumps({"pieces": vocab.pieces, "scores": vocab.scores, "types": vocab.types}),
                 corpus=json.dumps(corpus.to_dict()))
    Path(f.name).replace(path)
    return train.astype(np.int64), held.astype(np.int64), vocab


def _train_here(cfg: RefConfig, train, held, device: str, progress) -> tuple[dict, dict]:
    started = time.monotonic()
    model, log = train_model(cfg, train, held, device, progress)
    info = {"device": device, "steps_run": max(r["step"] for r in log if "step" in r), "train_seconds": round(time.monotonic() - started, 1),
            "parameters": parameter_count(model), "log": log,
            "heldout_loss_torch": round(evaluate(model, held, cfg, device, windows=10_000), 4),
            "routing": routing_stats(model, held, cfg, device, windows=200)}
    return state_arrays(model), info


def train_reference_model(out: Path | None, steps: int | None, seed: int | None, force: bool, device: str,
                          weights: Path | None, engine, corpus: Corpus, progress=None) -> dict:
    """Train (or export `weights` trained elsewhere) into `out` (default: the cache); returns the report.

    Without --force an existing default-path model is reused, so the command is also how a user gets it."""
    device = pick_device(device)
    cfg = recipe(device)
    cfg = replace(cfg, steps=steps or cfg.steps, seed=cfg.seed if seed is None else seed)
    if cfg.steps < 1:
        raise CcmoeError(f"--steps {cfg.steps} is not a positive count", "pass --steps 1 or more")
    state = trained = None
    if weights:
        state, cfg, trained = load_shards(weights)
        device = trained["device"]
    path = Path(out) if out else default_reference_path(device, cfg.seed, cfg.steps)
    report = path.with_suffix(".reference.json")
    if out is None and path.is_file() and report.is_file() and not force:
        return {**json.loads(report.read_text()), "output": str(path), "report": str(report), "cached": True}
    check_writable(path, force, 128 << 20, "model")
    path.parent.mkdir(parents=True, exist_ok=True)
    train, held, vocab = reference_tokens(corpus, cfg.vocab_size, engine)
    if state is None:
        state, trained = _train_here(cfg, train, held, device, progress)
    info = {"config": asdict(cfg), "corpus": corpus.source, "corpus_sha256": corpus.sha256,
            "parameters": trained["parameters"], "train_tokens": int(len(train)), "heldout_tokens": int(len(held)),
            "device": trained["device"], "steps_run": trained["steps_run"],
            "heldout_loss": trained["heldout_loss_torch"], "heldout_ppl": round(math.exp(trained["heldout_loss_torch"]), 2),
            "unigram_ppl": round(math.exp(unigram_loss(train, held, cfg.vocab_size)), 2)}
    export_gguf(state, vocab, cfg, path, info)
    full = {**info, "routing": trained["routing"], "train_seconds": trained["train_seconds"], "log": trained["log"],
            "gpu": trained.get("gpu"), "sha256": file_sha256(path)}
    write_atomic(report, (json.dumps(full, indent=1) + "\n").encode())
    return {**full, "output": str(path), "report": str(report), "cached": False}
