"""Train the bundled default model: a small qwen3moe language model on the project's English corpus.

The architecture follows llama.cpp's qwen3moe graph exactly (RMSNorm, per-head Q/K norm, NEOX RoPE,
GQA attention, softmax router with top-k and renormalised weights, SwiGLU experts), so the GGUF it
writes runs in llama.cpp with the quality measured here. Needs the optional `train` extra (torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.errors import CcmoeError
from ..core.files import check_writable, temp_beside, write_atomic
from ..engine.build import load_bindings
from ..model.sources import bundled_model_path
from ..model.tokenizer import BOS_ID, Vocab, add_vocab_to_gguf, train_bpe

ARCH = "qwen3moe"


@dataclass
class TrainConfig:
    """Shapes and optimisation settings of the bundled model; the defaults made ccmoe_runtime/testmodels/bundled/ccmoe-mini-moe."""

    vocab_size: int = 2048
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 256
    ctx: int = 256
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    steps: int = 1200
    batch: int = 12
    seq: int = 256    # the whole context: llama.cpp scores positions up to ctx
    lr: float = 3e-3
    warmup: int = 30
    aux_loss: float = 0.01
    seed: int = 1234
    threads: int = 2


def _torch():
    try:
        import torch
    except ImportError:
        raise CcmoeError("training needs torch, which is not installed",
                         "install the extra: pip install -e '.[train]'") from None
    return torch


def model_metadata(writer, cfg: TrainConfig, name: str) -> None:
    """Architecture keys llama.cpp's qwen3moe loader reads."""
    writer.add_name(name)
    writer.add_context_length(cfg.ctx)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.n_ff_exp * cfg.n_expert_used)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_expert_count(cfg.n_expert)
    writer.add_expert_used_count(cfg.n_expert_used)
    writer.add_expert_feed_forward_length(cfg.n_ff_exp)


def write_vocab_only(path: Path, vocab: Vocab, cfg: TrainConfig) -> Path:
    """A GGUF with metadata and vocabulary only, for tokenizing with llama.cpp."""
    import gguf

    w = gguf.GGUFWriter(str(path), ARCH)
    model_metadata(w, cfg, "vocab-only")
    add_vocab_to_gguf(w, vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokenize_with_llama(llama_cpp, vocab_gguf: Path, text: str) -> np.ndarray:
    """Token ids exactly as llama.cpp will produce them at inference (no BOS)."""
    llm = llama_cpp.Llama(model_path=str(vocab_gguf), vocab_only=True, verbose=False)
    # one call for the whole text, as llama-perplexity does (each call adds SentencePiece's leading space)
    return np.asarray(llm.tokenize(text.encode(), add_bos=False, special=False), dtype=np.int32)


# ---------------------------------------------------------------- the model

def build_model(cfg: TrainConfig):
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.rms_eps)) * self.weight

    def rope(x, cos, sin):  # NEOX style: rotate the two halves of each head
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d, hd = cfg.n_embd, cfg.head_dim
            self.attn_norm = RMSNorm(d)
            self.wq = nn.Linear(d, cfg.n_head * hd, bias=False)
            self.wk = nn.Linear(d, cfg.n_head_kv * hd, bias=False)
            self.wv = nn.Linear(d, cfg.n_head_kv * hd, bias=False)
            self.wo = nn.Linear(cfg.n_head * hd, d, bias=False)
            self.q_norm = RMSNorm(hd)
            self.k_norm = RMSNorm(hd)
            self.ffn_norm = RMSNorm(d)
            self.router = nn.Linear(d, cfg.n_expert, bias=False)
            std = 0.02
            self.gate = nn.Parameter(torch.randn(cfg.n_expert, cfg.n_ff_exp, d) * std)
            self.up = nn.Parameter(torch.randn(cfg.n_expert, cfg.n_ff_exp, d) * std)
            self.down = nn.Parameter(torch.randn(cfg.n_expert, d, cfg.n_ff_exp) * std / math.sqrt(2 * cfg.n_layer))

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            h = self.attn_norm(x)
            q = self.q_norm(self.wq(h).view(b, t, cfg.n_head, cfg.head_dim))
            k = self.k_norm(self.wk(h).view(b, t, cfg.n_head_kv, cfg.head_dim))
            v = self.wv(h).view(b, t, cfg.n_head_kv, cfg.head_dim)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            group = cfg.n_head // cfg.n_head_kv
            k = k.repeat_interleave(group, dim=2)
            v = v.repeat_interleave(group, dim=2)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            x = x + self.wo(att.transpose(1, 2).reshape(b, t, -1))
            h = self.ffn_norm(x).reshape(b * t, -1)
            probs = torch.softmax(self.router(h).float(), dim=-1)
            topw, topi = probs.topk(cfg.n_expert_used, dim=-1)
            topw = topw / topw.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for e in range(cfg.n_expert):
                rows, slot = (topi == e).nonzero(as_tuple=True)
                if rows.numel() == 0:
                    continue
                he = h[rows]
                y = (F.silu(he @ self.gate[e].T) * (he @ self.up[e].T)) @ self.down[e].T
                out.index_add_(0, rows, y * topw[rows, slot].unsqueeze(-1))
            # Switch-style load balancing: fraction routed x mean probability, per expert
            frac = torch.zeros(cfg.n_expert).index_add_(0, topi.flatten(), torch.ones(topi.numel())) / topi.numel()
            aux = cfg.n_expert * (frac * probs.mean(0)).sum()
            return x + out.view(b, t, -1), aux

    class MiniMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            nn.init.normal_(self.embed.weight, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.norm = RMSNorm(cfg.n_embd)
            self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            for blk in self.blocks:
                for lin in (blk.wq, blk.wk, blk.wv, blk.router):
                    nn.init.normal_(lin.weight, std=0.02)
                nn.init.normal_(blk.wo.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(self.output.weight, std=0.02)

        def forward(self, ids):
            t = ids.shape[1]
            pos = torch.arange(t, dtype=torch.float32)
            inv = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
            ang = pos[:, None] * inv[None, :]
            cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
            x = self.embed(ids)
            aux = 0.0
            for blk in self.blocks:
                x, a = blk(x, cos, sin)
                aux = aux + a
            return self.output(self.norm(x)), aux / cfg.n_layer

    return MiniMoE()


# ---------------------------------------------------------------- training and export

def _window(tokens: np.ndarray, start: int, seq: int) -> np.ndarray:
    """BOS then `seq` tokens: llama.cpp puts BOS first in every prompt and perplexity chunk."""
    return np.concatenate([[BOS_ID], tokens[start:start + seq]]).astype(np.int64)


def _batches(tokens: np.ndarray, cfg: TrainConfig, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(tokens) - cfg.seq, size=cfg.batch)
        yield np.stack([_window(tokens, s, cfg.seq) for s in starts])


def evaluate(model, tokens: np.ndarray, cfg: TrainConfig, windows: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over consecutive windows of held-out tokens."""
    torch = _torch()
    n = min(windows, len(tokens) // cfg.seq)
    losses = []
    with torch.no_grad():
        for i in range(n):
            chunk = torch.from_numpy(_window(tokens, i * cfg.seq, cfg.seq))[None]
            logits, _ = model(chunk[:, :-1])
            losses.append(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:]).item())
    return float(np.mean(losses))


def train_model(cfg: TrainConfig, train_tokens: np.ndarray, heldout_tokens: np.ndarray, progress=None):
    """Train from a fixed seed; returns the model and a log of (step, train loss, held-out loss)."""
    torch = _torch()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.05)
    rng = np.random.default_rng(cfg.seed)
    batches = _batches(train_tokens, cfg, rng)
    log = []
    started = time.monotonic()
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = torch.from_numpy(next(batches))
        logits, aux = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + cfg.aux_loss * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps:
            model.eval()
            held = evaluate(model, heldout_tokens, cfg, windows=16)
            model.train()
            log.append({"step": step, "loss": round(loss.item(), 4), "heldout_loss": round(held, 4),
                        "seconds": round(time.monotonic() - started, 1)})
            if progress:
                progress(log[-1])
    return model, log


def export_gguf(model, vocab: Vocab, cfg: TrainConfig, path: Path, info: dict, name: str = "ccmoe-mini-moe") -> Path:
    """Write the trained weights as an F16 qwen3moe GGUF (norms in F32), atomically."""
    import gguf

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = temp_beside(path)
    w = gguf.GGUFWriter(str(tmp), ARCH)
    model_metadata(w, cfg, name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    add_vocab_to_gguf(w, vocab)
    w.add_string("ccmoe.training", json.dumps(info, sort_keys=True))
    f16 = lambda a: a.astype(np.float16)  # noqa: E731
    w.add_tensor("token_embd.weight", f16(sd["embed.weight"]))
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "attn_norm.weight"])
        w.add_tensor(b + "attn_q.weight", f16(sd[p + "wq.weight"]))
        w.add_tensor(b + "attn_k.weight", f16(sd[p + "wk.weight"]))
        w.add_tensor(b + "attn_v.weight", f16(sd[p + "wv.weight"]))
        w.add_tensor(b + "attn_output.weight", f16(sd[p + "wo.weight"]))
        w.add_tensor(b + "attn_q_norm.weight", sd[p + "q_norm.weight"])
        w.add_tensor(b + "attn_k_norm.weight", sd[p + "k_norm.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "ffn_norm.weight"])
        w.add_tensor(b + "ffn_gate_inp.weight", sd[p + "router.weight"])
        w.add_tensor(b + "ffn_gate_exps.weight", f16(sd[p + "gate"]))
        w.add_tensor(b + "ffn_up_exps.weight", f16(sd[p + "up"]))
        w.add_tensor(b + "ffn_down_exps.weight", f16(sd[p + "down"]))
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    w.add_tensor("output.weight", f16(sd["output.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def unigram_loss(train_tokens: np.ndarray, heldout_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of an add-one unigram model of the training tokens on the held-out tokens."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout_tokens[1:]].mean())


def train_bundled(out_path: Path, cfg: TrainConfig, engine, corpus, progress=None) -> dict:
    """The whole recipe: vocabulary, llama.cpp tokenization, training, GGUF export. Returns a report."""

    llama_cpp = load_bindings(engine)
    train_text = corpus.train.read_text()
    held_text = corpus.heldout.read_text()
    vocab = train_bpe(train_text, cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_gguf = write_vocab_only(Path(tmp) / "vocab.gguf", vocab, cfg)
        train_tokens = tokenize_with_llama(llama_cpp, vocab_gguf, train_text)
        held_tokens = tokenize_with_llama(llama_cpp, vocab_gguf, held_text)
    started = time.monotonic()
    model, log = train_model(cfg, train_tokens, held_tokens, progress)
    model.eval()
    held_loss = evaluate(model, held_tokens, cfg, windows=10_000)
    seconds = round(time.monotonic() - started, 1)
    # what goes into the GGUF is deterministic, so the same seed and thread count give the same file
    info = {"config": asdict(cfg), "corpus": corpus.source, "corpus_sha256": corpus.sha256,
            "train_tokens": int(len(train_tokens)), "heldout_tokens": int(len(held_tokens)),
            "heldout_loss": round(held_loss, 4), "heldout_ppl": round(math.exp(held_loss), 2),
            "unigram_ppl": round(math.exp(unigram_loss(train_tokens, held_tokens, cfg.vocab_size)), 2)}
    export_gguf(model, vocab, cfg, out_path, info)
    return {**info, "train_seconds": seconds, "log": log,
            "sha256": hashlib.sha256(Path(out_path).read_bytes()).hexdigest()}


def train_bundled_model(out: Path | None, steps: int | None, force: bool, engine, corpus, progress=None) -> dict:
    """`train-bundled`: retrain the bundled model into `out` (default: the package's), with its report beside it."""
    out = Path(out) if out else bundled_model_path()
    check_writable(out, force, 64 << 20, "model")
    report = out.with_suffix(".train.json")
    check_writable(report, True, what="training report")
    cfg = TrainConfig() if steps is None else TrainConfig(steps=steps)
    if cfg.steps < 1:
        raise CcmoeError(f"--steps {cfg.steps} is not a positive count", "pass --steps 1 or more")
    info = train_bundled(out, cfg, engine, corpus, progress)
    write_atomic(report, (json.dumps(info, indent=1) + "\n").encode())
    return {**info, "output": str(out), "report": str(report)}
