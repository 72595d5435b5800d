"""The reference model: a small deepseek2 (DeepSeek-V3-shaped) language model trained by the project.

Multi-head latent attention with a Q LoRA, one dense leading layer, sigmoid router with an expert bias
(DeepSeek-V3's loss-free balancing), one shared expert, SwiGLU experts. The torch graph follows llama.cpp's
deepseek2 graph (checked by tests/test_reference.py), so the GGUF it writes runs in llama.cpp as trained.
Training runs on CUDA when torch sees a GPU, else on the CPU; this module needs only torch and numpy to train
(`python -m ccmoe_runtime.testmodels.reference_job` runs it on a bare GPU machine), gguf to export.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..core.errors import CcmoeError
from ..core.files import temp_beside
from ..model.tokenizer import BOS_ID, Vocab, add_vocab_to_gguf

ARCH = "deepseek2"


@dataclass
class RefConfig:
    """Shapes and optimisation settings of the reference model; the defaults made the published one."""

    vocab_size: int = 4096
    n_embd: int = 256
    n_layer: int = 12
    n_dense_lead: int = 3        # DeepSeek-V3 has 3 dense leading layers
    n_head: int = 8
    q_lora_rank: int = 256
    kv_lora_rank: int = 128
    qk_nope_dim: int = 32
    qk_rope_dim: int = 32
    v_head_dim: int = 32
    n_ff: int = 1024             # dense FFN of the leading layers
    n_expert: int = 32
    n_expert_used: int = 4
    n_expert_shared: int = 1
    n_ff_exp: int = 256          # every expert, dense FFN and most attention row a multiple of 256: k-quants apply
    routed_scale: float = 2.5
    ctx: int = 256
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    steps: int = 3000
    batch: int = 32
    seq: int = 256               # the whole context: llama.cpp scores positions up to ctx
    lr: float = 1.5e-3
    warmup: int = 100
    bias_rate: float = 1e-3      # DeepSeek-V3's expert-bias update speed (sign of the load error)
    seq_aux: float = 1e-4        # DeepSeek-V3's small sequence-wise balance loss
    seed: int = 1234
    threads: int = 2
    keep_best: bool = True       # keep the weights of the logged step with the lowest held-out loss

    @classmethod
    def from_dict(cls, d: dict) -> RefConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# What fits a 2-core CPU in ~20 minutes: the same architecture (12 layers, MLA, 32 experts top-4) at width 128,
# one dense leading layer. Its rows (128, 32) are too short for k-quants; the GPU recipe (the defaults) has 256.
CPU_RECIPE = dict(n_embd=128, n_dense_lead=1, n_head=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_dim=32,
                  qk_rope_dim=16, v_head_dim=32, n_ff=384, n_ff_exp=32, steps=1500, batch=8, lr=3e-3, warmup=50,
                  keep_best=False)


def recipe(device: str) -> RefConfig:
    """The reference recipe for a device: the defaults on CUDA, CPU_RECIPE on the CPU."""
    return RefConfig() if device == "cuda" else RefConfig(**CPU_RECIPE)


def _torch():
    try:
        import torch
    except ImportError:
        raise CcmoeError("training needs torch, which is not installed",
                         "install the extra: pip install -e '.[train]'") from None
    return torch


def pick_device(name: str = "auto") -> str:
    """'cuda' when asked for or when torch sees a GPU under 'auto', else 'cpu'."""
    torch = _torch()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CcmoeError("--device cuda: torch sees no CUDA GPU", "pass --device cpu or auto")
    return name


# ---------------------------------------------------------------- the model

def build_model(cfg: RefConfig):
    """The deepseek2 graph of llama.cpp as a torch module; forward(ids) -> (logits, aux, per-layer expert ids)."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.rms_eps)) * self.weight

    def rope(x, cos, sin):  # llama.cpp's NORM rope (deepseek2): rotate adjacent pairs
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    def lin(n_in, n_out, std):
        m = nn.Linear(n_in, n_out, bias=False)
        nn.init.normal_(m.weight, std=std)
        return m

    def swiglu(h, gate, up, down):
        return down(F.silu(gate(h)) * up(h))

    out_std = 0.02 / math.sqrt(2 * cfg.n_layer)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            d, hq = cfg.n_embd, cfg.qk_nope_dim + cfg.qk_rope_dim
            self.wq_a = lin(d, cfg.q_lora_rank, 0.02)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank)
            self.wq_b = lin(cfg.q_lora_rank, cfg.n_head * hq, 0.02)
            self.wkv_a = lin(d, cfg.kv_lora_rank + cfg.qk_rope_dim, 0.02)
            self.kv_a_norm = RMSNorm(cfg.kv_lora_rank)
            # stored as llama.cpp stores attn_k_b / attn_v_b (numpy order)
            self.wk_b = nn.Parameter(torch.randn(cfg.n_head, cfg.kv_lora_rank, cfg.qk_nope_dim) * 0.02)
            self.wv_b = nn.Parameter(torch.randn(cfg.n_head, cfg.v_head_dim, cfg.kv_lora_rank) * 0.02)
            self.wo = lin(cfg.n_head * cfg.v_head_dim, d, out_std)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q = self.wq_b(self.q_a_norm(self.wq_a(x))).view(b, t, cfg.n_head, -1)
            q_nope, q_pe = q[..., :cfg.qk_nope_dim], rope(q[..., cfg.qk_nope_dim:], cos, sin)
            kv = self.wkv_a(x)
            c = self.kv_a_norm(kv[..., :cfg.kv_lora_rank]).to(x.dtype)
            k_pe = rope(kv[..., cfg.kv_lora_rank:].unsqueeze(2), cos, sin).expand(b, t, cfg.n_head, cfg.qk_rope_dim)
            k_nope = torch.einsum("btc,hcn->bthn", c, self.wk_b.to(c.dtype))
            v = torch.einsum("btc,hvc->bthv", c, self.wv_b.to(c.dtype))
            qh = torch.cat([q_nope, q_pe.to(q_nope.dtype)], -1).transpose(1, 2)
            kh = torch.cat([k_nope, k_pe.to(k_nope.dtype)], -1).transpose(1, 2)
            att = F.scaled_dot_product_attention(qh.to(v.dtype), kh.to(v.dtype), v.transpose(1, 2), is_causal=True)
            return self.wo(att.transpose(1, 2).reshape(b, t, -1))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            d, e, f = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp
            self.router = lin(d, e, 0.02)
            self.register_buffer("bias", torch.zeros(e))        # exp_probs_b: moved by load, not by gradients
            self.gate = nn.Parameter(torch.randn(e, f, d) * 0.02)
            self.up = nn.Parameter(torch.randn(e, f, d) * 0.02)
            self.down = nn.Parameter(torch.randn(e, d, f) * out_std)
            sf = f * cfg.n_expert_shared
            self.sh_gate, self.sh_up, self.sh_down = lin(d, sf, 0.02), lin(d, sf, 0.02), lin(sf, d, out_std)

        def forward(self, h):
            n, d = h.shape
            e, f = cfg.n_expert, cfg.n_ff_exp
            probs = torch.sigmoid(self.router(h).float())
            topi = (probs + self.bias).topk(cfg.n_expert_used, dim=-1).indices    # the bias picks, never weighs
            topw = probs.gather(-1, topi)
            topw = topw / topw.sum(-1, keepdim=True).clamp(min=6.103515625e-5) * cfg.routed_scale
            w = torch.zeros_like(probs).scatter(-1, topi, topw)                   # zero for unselected experts
            # all experts as two wide matmuls: exact for the selected ones, zero-weighted for the rest
            g = (h @ self.gate.reshape(e * f, d).T.to(h.dtype)).view(n, e, f)
            u = (h @ self.up.reshape(e * f, d).T.to(h.dtype)).view(n, e, f)
            act = (F.silu(g) * u * w.unsqueeze(-1).to(g.dtype)).reshape(n, e * f)
            down = self.down.permute(1, 0, 2).reshape(d, e * f).to(h.dtype)
            out = act @ down.T + swiglu(h, self.sh_gate, self.sh_up, self.sh_down)
            # sequence-wise balance loss (DeepSeek-V3 eq. 17-19), over the whole batch
            frac = torch.bincount(topi.flatten(), minlength=e).float() * e / topi.numel()   # deterministic on CUDA
            aux = (frac * (probs / probs.sum(-1, keepdim=True)).mean(0)).sum()
            return out, aux, topi

    class Block(nn.Module):
        def __init__(self, dense: bool):
            super().__init__()
            d = cfg.n_embd
            self.attn_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)
            self.attn = Attention()
            self.dense = dense
            if dense:
                self.gate, self.up, self.down = lin(d, cfg.n_ff, 0.02), lin(d, cfg.n_ff, 0.02), lin(cfg.n_ff, d, out_std)
            else:
                self.moe = MoE()

        def forward(self, x, cos, sin):
            x = x + self.attn(self.attn_norm(x).to(x.dtype), cos, sin)
            h = self.ffn_norm(x).to(x.dtype)
            if self.dense:
                return x + swiglu(h, self.gate, self.up, self.down), None, None
            b, t, d = h.shape
            out, aux, topi = self.moe(h.reshape(b * t, d))
            return x + out.view(b, t, d), aux, topi

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            nn.init.normal_(self.embed.weight, std=0.02)
            self.blocks = nn.ModuleList(Block(i < cfg.n_dense_lead) for i in range(cfg.n_layer))
            self.norm = RMSNorm(cfg.n_embd)
            self.output = lin(cfg.n_embd, cfg.vocab_size, 0.02)

        def forward(self, ids):
            t = ids.shape[1]
            pos = torch.arange(t, dtype=torch.float32, device=ids.device)
            inv = cfg.rope_base ** (-torch.arange(0, cfg.qk_rope_dim, 2, dtype=torch.float32, device=ids.device)
                                    / cfg.qk_rope_dim)
            ang = pos[:, None] * inv[None, :]
            cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
            x = self.embed(ids)
            aux, routes = 0.0, []
            for blk in self.blocks:
                x, a, topi = blk(x, cos, sin)
                if a is not None:
                    aux, _ = aux + a, routes.append(topi)
            return self.output(self.norm(x).to(x.dtype)), aux / max(1, len(routes)), routes

    return Reference()


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------- training

def _window(tokens: np.ndarray, start: int, seq: int) -> np.ndarray:
    """BOS then `seq` tokens: llama.cpp puts BOS first in every prompt and perplexity chunk."""
    return np.concatenate([[BOS_ID], tokens[start:start + seq]]).astype(np.int64)


def evaluate(model, tokens: np.ndarray, cfg: RefConfig, device: str = "cpu", windows: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over consecutive held-out windows."""
    torch = _torch()
    n = min(windows, len(tokens) // cfg.seq)
    batch = torch.from_numpy(np.stack([_window(tokens, i * cfg.seq, cfg.seq) for i in range(n)])).to(device)
    losses = []
    with torch.no_grad(), _autocast(device):
        for i in range(0, n, 16):
            chunk = batch[i:i + 16]
            logits = model(chunk[:, :-1])[0].float()
            losses.append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, cfg.vocab_size), chunk[:, 1:].reshape(-1), reduction="sum").item())
    return float(sum(losses) / (n * cfg.seq))


def _autocast(device: str):
    torch = _torch()
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def _update_bias(model, routes, cfg: RefConfig) -> None:
    """Loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded, by bias_rate."""
    torch = _torch()
    moes = [b.moe for b in model.blocks if not b.dense]
    with torch.no_grad():
        for moe, topi in zip(moes, routes):
            load = torch.bincount(topi.flatten(), minlength=cfg.n_expert).float()
            moe.bias += cfg.bias_rate * torch.sign(load.mean() - load)


def train_model(cfg: RefConfig, train_tokens: np.ndarray, heldout_tokens: np.ndarray, device: str = "cpu",
                progress=None, max_seconds: float | None = None):
    """Train from a fixed seed on `device`; returns the model and a log. Same seed and device: same weights."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS
    torch = _torch()
    torch.manual_seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_model(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    log, started, best = [], time.monotonic(), None
    every = max(1, min(250, cfg.steps // 4))
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_tokens) - cfg.seq, size=cfg.batch)
        batch = torch.from_numpy(np.stack([_window(train_tokens, s, cfg.seq) for s in starts])).to(device)
        with _autocast(device):
            logits, aux, routes = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + cfg.seq_aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _update_bias(model, routes, cfg)
        timed_out = max_seconds is not None and time.monotonic() - started > max_seconds
        if step % every == 0 or step == cfg.steps or timed_out:
            model.eval()
            held = evaluate(model, heldout_tokens, cfg, device, windows=32)
            model.train()
            log.append({"step": step, "loss": round(loss.item(), 4), "heldout_loss": round(held, 4),
                        "seconds": round(time.monotonic() - started, 1)})
            if progress:
                progress(log[-1])
            if cfg.keep_best and (best is None or held < best[0]):
                best = (held, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if timed_out:
            break
    if best is not None and best[1] != log[-1]["step"]:
        model.load_state_dict(best[2])
        log.append({"kept_step": best[1], "heldout_loss": round(best[0], 4)})
    model.eval()
    return model, log


# ---------------------------------------------------------------- weights: torch <-> llama.cpp names

def gguf_tensors(state: dict[str, np.ndarray], cfg: RefConfig) -> dict[str, np.ndarray]:
    """llama.cpp tensor names -> arrays (numpy order) from a torch state dict as float32 arrays."""
    out = {"token_embd.weight": state["embed.weight"]}
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        names = {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
                 "attn_q_a.weight": "attn.wq_a.weight", "attn_q_a_norm.weight": "attn.q_a_norm.weight",
                 "attn_q_b.weight": "attn.wq_b.weight", "attn_kv_a_mqa.weight": "attn.wkv_a.weight",
                 "attn_kv_a_norm.weight": "attn.kv_a_norm.weight", "attn_k_b.weight": "attn.wk_b",
                 "attn_v_b.weight": "attn.wv_b", "attn_output.weight": "attn.wo.weight"}
        if i < cfg.n_dense_lead:
            names.update({"ffn_gate.weight": "gate.weight", "ffn_up.weight": "up.weight", "ffn_down.weight": "down.weight"})
        else:
            names.update({"ffn_gate_inp.weight": "moe.router.weight", "exp_probs_b.bias": "moe.bias",
                          "ffn_gate_exps.weight": "moe.gate", "ffn_up_exps.weight": "moe.up",
                          "ffn_down_exps.weight": "moe.down", "ffn_gate_shexp.weight": "moe.sh_gate.weight",
                          "ffn_up_shexp.weight": "moe.sh_up.weight", "ffn_down_shexp.weight": "moe.sh_down.weight"})
        out.update({b + k: state[p + v] for k, v in names.items()})
    out["output_norm.weight"] = state["norm.weight"]
    out["output.weight"] = state["output.weight"]
    return out


def _keeps_f32(name: str) -> bool:
    return name.endswith("norm.weight") or name.endswith(".bias") or name.endswith("ffn_gate_inp.weight")


def state_arrays(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def pack_int(a: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Round a weight to integers in [-levels, levels] per block of 256 along its rows (or per row when shorter
    or not a multiple of 256) with one F16 scale each; returns (int8 values, f16 scales)."""
    n = a.shape[-1]
    block = 256 if n % 256 == 0 else n
    x = a.reshape(-1, block).astype(np.float32)
    scale = (np.abs(x).max(axis=1, keepdims=True) / levels).astype(np.float16)
    s32 = scale.astype(np.float32)
    q = np.where(s32 > 0, np.round(x / np.where(s32 > 0, s32, 1)), 0).clip(-levels, levels).astype(np.int8)
    return q.reshape(a.shape), scale.reshape(*a.shape[:-1], n // block)


def unpack_int(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 weight `pack_int` stored."""
    n, nb = q.shape[-1], scale.shape[-1]
    x = q.reshape(-1, n // nb).astype(np.float32) * scale.reshape(-1, 1).astype(np.float32)
    return x.reshape(q.shape)


def compact_state(state: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
    """Weights as `pack_int` pairs (name + '.q', name + '.scale'); norms, router and expert bias stay float32."""
    out = {}
    for k, v in state.items():
        if _keeps_f32(k) or v.ndim < 2 or k.endswith("router.weight"):
            out[k] = v.astype(np.float32)
        else:
            out[k + ".q"], out[k + ".scale"] = pack_int(v, levels)
    return out


def expand_state(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 state dict `compact_state` stored; plain arrays pass through (the older F16 shards)."""
    out = {}
    for k, v in packed.items():
        if k.endswith(".q"):
            out[k[:-2]] = unpack_int(v, packed[k[:-2] + ".scale"])
        elif not k.endswith(".scale"):
            out[k] = v.astype(np.float32)
    return out


def save_shards(model, cfg: RefConfig, out_dir: Path, info: dict, shard_bytes: int = 14 << 20,
                levels: int = 63) -> list[Path]:
    """The weights as 7-bit integers (`levels` 63) per 256 with F16 scales in zlib-compressed .npz shards of at
    most `shard_bytes` each, plus config.json. These rounded weights are the reference (load_shards reads them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, a in compact_state(state_arrays(model), levels).items():
        if cur and size + a.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = a, size + a.nbytes
    shards.append(cur)
    paths = []
    for i, s in enumerate(shards):
        paths.append(out_dir / f"weights-{i:02d}.npz")
        np.savez_compressed(paths[-1], **s)
    fmt = {"weights": f"int{levels.bit_length() + 1} per 256 (or per row) with f16 scales, zlib", "levels": levels}
    (out_dir / "config.json").write_text(json.dumps({"config": asdict(cfg), "format": fmt, **info}, indent=1) + "\n")
    return paths


def load_shards(in_dir: Path) -> tuple[dict[str, np.ndarray], RefConfig, dict]:
    """Weights, config and training info from `save_shards`' folder."""
    in_dir = Path(in_dir)
    if not (in_dir / "config.json").is_file():
        raise CcmoeError(f"{in_dir} holds no config.json of trained reference weights",
                         "pass the folder written by `python -m ccmoe_runtime.testmodels.reference_job`")
    meta = json.loads((in_dir / "config.json").read_text())
    packed = {}
    for p in sorted(in_dir.glob("weights-*.npz")):
        with np.load(p) as z:
            packed.update({k: z[k] for k in z.files})
    return expand_state(packed), RefConfig.from_dict(meta.pop("config")), meta


def load_state(model, state: dict[str, np.ndarray]) -> None:
    """Put a float32 state dict (from load_shards) into a torch model of the same config."""
    torch = _torch()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


def model_metadata(w, cfg: RefConfig, name: str) -> None:
    """deepseek2 keys as llama.cpp's converter writes them for an MLA model."""
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.n_dense_lead)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_dim + cfg.qk_rope_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_dim)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_expert_shared_count(cfg.n_expert_shared)
    w.add_expert_feed_forward_length(cfg.n_ff_exp)
    w.add_expert_weights_scale(cfg.routed_scale)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def export_gguf(state: dict[str, np.ndarray], vocab: Vocab, cfg: RefConfig, path: Path, info: dict,
                name: str = "ccmoe-reference-ds2") -> Path:
    """Write the weights as an F16 deepseek2 GGUF (norms, router and expert bias F32), atomically."""
    import gguf

    path = Path(path)
    tmp = temp_beside(path)
    w = gguf.GGUFWriter(str(tmp), ARCH)
    model_metadata(w, cfg, name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    add_vocab_to_gguf(w, vocab)
    w.add_string("ccmoe.training", json.dumps(info, sort_keys=True))
    for k, v in gguf_tensors(state, cfg).items():
        w.add_tensor(k, v.astype(np.float32) if _keeps_f32(k) else v.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- router statistics

def routing_stats(model, tokens: np.ndarray, cfg: RefConfig, device: str = "cpu", windows: int = 64) -> list[dict]:
    """Per MoE layer: routing entropy (bits, and share of log2 n_expert), top-10%-experts token share, unused experts."""
    torch = _torch()
    n = min(windows, len(tokens) // cfg.seq)
    counts = None
    with torch.no_grad(), _autocast(device):
        for i in range(0, n, 16):
            ids = torch.from_numpy(np.stack([_window(tokens, j * cfg.seq, cfg.seq) for j in range(i, min(n, i + 16))]))
            routes = model(ids[:, :-1].to(device))[2]
            c = np.stack([np.bincount(r.cpu().numpy().ravel(), minlength=cfg.n_expert) for r in routes])
            counts = c if counts is None else counts + c
    return [routing_summary(row, cfg.n_dense_lead + i) for i, row in enumerate(counts)]


def routing_summary(counts: np.ndarray, layer: int) -> dict:
    """Entropy and concentration of one layer's expert-selection counts."""
    p = counts / counts.sum()
    nz = p[p > 0]
    ent = float(-(nz * np.log2(nz)).sum())
    top = max(1, round(0.1 * len(p)))
    return {"layer": layer, "entropy_bits": round(ent, 3), "entropy_share": round(ent / math.log2(len(p)), 3),
            "top10pct_share": round(float(np.sort(p)[::-1][:top].sum()), 3), "unused": int((counts == 0).sum())}


def unigram_loss(train_tokens: np.ndarray, heldout_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of an add-one unigram model of the training tokens on the held-out tokens."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout_tokens[1:]].mean())
