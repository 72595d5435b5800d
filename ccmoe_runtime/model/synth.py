"""Models the project makes for itself: random-weight MoE GGUFs and weight-less inventories of real models."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.errors import CcmoeError
from ..core.files import (
    check_writable,
    disk_full_error,
    make_parent,
    output_lock,
    read_text,
    temp_beside,
)
from .inventory import ModelInventory, TensorInfo
from .tokenizer import add_vocab_to_gguf, byte_vocab

SYNTH_ARCHS = ("deepseek2", "qwen3moe")


@dataclass
class SynthSpec:
    """Shapes of a generated MoE model (llama.cpp names). Fields unused by an architecture are ignored."""

    arch: str = "qwen3moe"
    name: str = "ccmoe-synth"
    vocab_size: int = 512
    ctx: int = 4096
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2          # qwen3moe (deepseek2's MLA stores one latent KV head)
    head_dim: int = 64          # qwen3moe
    n_expert: int = 16
    n_expert_used: int = 4
    n_ff_exp: int = 256
    # deepseek2 only
    n_dense_lead: int = 1
    n_ff: int = 512             # dense FFN of the leading layers
    n_expert_shared: int = 1
    q_lora_rank: int = 128
    kv_lora_rank: int = 128
    qk_nope_dim: int = 64
    qk_rope_dim: int = 32
    v_head_dim: int = 64
    routed_scale: float = 2.5
    # expert usage: 0 = uniform; larger values make low-numbered experts more popular
    skew: float = 0.0
    seed: int = 0

    def check(self) -> None:
        positive = {"--layers": self.n_layer, "--embd": self.n_embd, "--experts": self.n_expert,
                    "--expert-ff": self.n_ff_exp, "heads": self.n_head, "vocabulary": self.vocab_size}
        for name, value in positive.items():
            if value < 1:
                raise CcmoeError(f"{name} {value} must be at least 1", f"pass a positive {name}")
        if self.n_embd % 32:
            raise CcmoeError(f"--embd {self.n_embd} is not a multiple of 32 (ggml's block size)", "pass e.g. --embd 256")
        if self.arch not in SYNTH_ARCHS:
            raise CcmoeError(f"cannot generate architecture {self.arch!r}", f"choose one of: {', '.join(SYNTH_ARCHS)}")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise CcmoeError(f"experts used per token ({self.n_expert_used}) must be between 1 and the expert count ({self.n_expert})",
                             "fix --experts-used")
        if self.arch == "qwen3moe" and self.n_head % self.n_head_kv:
            raise CcmoeError("n_head must be a multiple of n_head_kv", "fix the head counts")


# A tensor of the layout: name, shape in ggml order, and whether it stays F32 (norms, biases).
Layout = list[tuple[str, tuple[int, ...], bool]]


def tensor_layout(s: SynthSpec) -> Layout:
    """Every tensor the llama.cpp loader expects for this spec: the one source of names and shapes."""
    s.check()
    out: Layout = [("token_embd.weight", (s.n_embd, s.vocab_size), False)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (s.n_embd,), True))
        if s.arch == "qwen3moe":
            out += [(b + "attn_q.weight", (s.n_embd, s.n_head * s.head_dim), False),
                    (b + "attn_k.weight", (s.n_embd, s.n_head_kv * s.head_dim), False),
                    (b + "attn_v.weight", (s.n_embd, s.n_head_kv * s.head_dim), False),
                    (b + "attn_output.weight", (s.n_head * s.head_dim, s.n_embd), False),
                    (b + "attn_q_norm.weight", (s.head_dim,), True),
                    (b + "attn_k_norm.weight", (s.head_dim,), True)]
        else:
            out += [(b + "attn_q_a_norm.weight", (s.q_lora_rank,), True),
                    (b + "attn_kv_a_norm.weight", (s.kv_lora_rank,), True),
                    (b + "attn_q_a.weight", (s.n_embd, s.q_lora_rank), False),
                    (b + "attn_q_b.weight", (s.q_lora_rank, s.n_head * (s.qk_nope_dim + s.qk_rope_dim)), False),
                    (b + "attn_kv_a_mqa.weight", (s.n_embd, s.kv_lora_rank + s.qk_rope_dim), False),
                    (b + "attn_k_b.weight", (s.qk_nope_dim, s.kv_lora_rank, s.n_head), False),
                    (b + "attn_v_b.weight", (s.kv_lora_rank, s.v_head_dim, s.n_head), False),
                    (b + "attn_output.weight", (s.n_head * s.v_head_dim, s.n_embd), False)]
        out.append((b + "ffn_norm.weight", (s.n_embd,), True))
        if s.arch == "deepseek2" and i < s.n_dense_lead:
            out += [(b + "ffn_gate.weight", (s.n_embd, s.n_ff), False),
                    (b + "ffn_up.weight", (s.n_embd, s.n_ff), False),
                    (b + "ffn_down.weight", (s.n_ff, s.n_embd), False)]
            continue
        out += [(b + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), False),
                (b + "ffn_gate_exps.weight", (s.n_embd, s.n_ff_exp, s.n_expert), False),
                (b + "ffn_up_exps.weight", (s.n_embd, s.n_ff_exp, s.n_expert), False),
                (b + "ffn_down_exps.weight", (s.n_ff_exp, s.n_embd, s.n_expert), False)]
        if s.arch == "deepseek2":
            sh = s.n_ff_exp * s.n_expert_shared
            out += [(b + "exp_probs_b.bias", (s.n_expert,), True),
                    (b + "ffn_gate_shexp.weight", (s.n_embd, sh), False),
                    (b + "ffn_up_shexp.weight", (s.n_embd, sh), False),
                    (b + "ffn_down_shexp.weight", (sh, s.n_embd), False)]
    out += [("output_norm.weight", (s.n_embd,), True), ("output.weight", (s.n_embd, s.vocab_size), False)]
    return out


def add_metadata(w, s: SynthSpec) -> None:
    """Architecture keys as llama.cpp's converters write them."""
    import gguf

    w.add_name(s.name)
    w.add_context_length(s.ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_head_count(s.n_head)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_expert_feed_forward_length(s.n_ff_exp)
    w.add_vocab_size(s.vocab_size)
    if s.arch == "qwen3moe":
        w.add_feed_forward_length(s.n_ff_exp * s.n_expert_used)
        w.add_head_count_kv(s.n_head_kv)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        return
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count_kv(1)
    w.add_leading_dense_block_count(s.n_dense_lead)
    w.add_q_lora_rank(s.q_lora_rank)
    w.add_kv_lora_rank(s.kv_lora_rank)
    w.add_key_length(s.kv_lora_rank + s.qk_rope_dim)
    w.add_value_length(s.kv_lora_rank)
    w.add_key_length_mla(s.qk_nope_dim + s.qk_rope_dim)
    w.add_value_length_mla(s.v_head_dim)
    w.add_rope_dimension_count(s.qk_rope_dim)
    w.add_expert_shared_count(s.n_expert_shared)
    w.add_expert_weights_scale(s.routed_scale)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _popularity(s: SynthSpec) -> np.ndarray:
    """Per-expert offset: expert 0 most popular, the last least, scaled by `skew`."""
    return s.skew * np.linspace(1.0, -1.0, s.n_expert)


def _tensor_data(name: str, shape: tuple[int, ...], s: SynthSpec, rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    np_shape = tuple(reversed(shape))
    if name.endswith("norm.weight"):
        return np.ones(np_shape, dtype=np.float32)
    if name.endswith("exp_probs_b.bias"):
        return (0.5 * _popularity(s)).astype(np.float32)
    std = 1.0 if name == "token_embd.weight" else 1.0 / np.sqrt(shape[0])   # unit-RMS embeddings, as after a norm
    data = (rng.standard_normal(np_shape, dtype=np.float32) * std)
    if name == "token_embd.weight" and s.skew > 0:
        data += u[None, :] * np.sqrt(s.n_embd)                # a direction every token shares...
    elif name.endswith("ffn_gate_inp.weight") and s.skew > 0:
        data -= (data @ u)[:, None] * u[None, :]                 # ...along which only the popularity counts:
        data += _popularity(s)[:, None] * u[None, :] * std      # routers favour low-numbered experts
    return data.astype(np.float16)


def write_random_gguf(s: SynthSpec, path: Path, force: bool = False, split_max_tensors: int = 0,
                      qtype: str = "f16", rules: list[tuple[str, str]] | None = None) -> Path:
    """A deterministic random-weight MoE GGUF (F16 weights, F32 norms) that llama.cpp loads and runs.

    With `split_max_tensors` it is written as shards (`NAME-00001-of-0000N.gguf`); the first is returned.
    With another `qtype` (Q8_0, K, IQ ...) or per-tensor `rules` the weights are written directly as random blocks
    (see `write_quantized_gguf`), so a model of tens of GB needs neither an F16 copy nor the memory for one."""
    path = Path(path)
    layout = tensor_layout(s)        # checks the spec before anything is written
    if qtype not in SYNTH_TYPES:
        raise CcmoeError(f"cannot generate weights of type {qtype!r}", f"choose one of: {', '.join(SYNTH_TYPES)}")
    check_writable(path, force, estimated_bytes(layout, qtype), what="model")
    make_parent(path)
    with output_lock(path):
        if qtype != "f16" or rules:
            return write_quantized_gguf(s, path, qtype, rules)
        return _write_f16(s, path, layout, split_max_tensors)


def estimated_bytes(layout: Layout, qtype: str) -> int:
    """About what the generated file takes on disk (the weights in `qtype`, norms in F32)."""
    per = 2.0 if qtype == "f16" else block_shape(qtype)[1] / block_shape(qtype)[0]
    return int(sum(int(np.prod(shape)) * (4 if f32 else per) for _, shape, f32 in layout)) + (1 << 20)


def _write_f16(s: SynthSpec, path: Path, layout: Layout, split_max_tensors: int) -> Path:
    """F16 weights through gguf-py's writer, staged in a private folder beside `path` (shards moved at the end)."""
    import gguf

    rng = np.random.default_rng(s.seed)
    u = rng.standard_normal(s.n_embd).astype(np.float32)
    u /= np.linalg.norm(u)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        w = gguf.GGUFWriter(str(staging / path.name), s.arch, split_max_tensors=split_max_tensors)
        add_metadata(w, s)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        add_vocab_to_gguf(w, byte_vocab(s.vocab_size))
        w.add_string("ccmoe.synth_spec", str(asdict(s)))
        for name, shape, _ in layout:
            w.add_tensor(name, _tensor_data(name, shape, s, rng, u))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        written = sorted(staging.iterdir())
        for f in written:
            f.replace(path.parent / f.name)
        return path.parent / written[0].name
    except OSError as e:
        raise disk_full_error(path, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- quantized generation

# Types written directly as random blocks: every quant, sub-scale and grid index a random byte (all are valid), the
# block's scale fields set so that the weights have the wanted standard deviation (measured once per type with
# gguf-py's dequantizer). Byte offsets of the f16 scale fields in a block, from ggml-common.h.
_SCALE_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "iq4_nl": (0,),
                 "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,),
                 "iq2_xxs": (0,), "iq2_xs": (0,), "iq2_s": (0,), "iq3_xxs": (0,), "iq3_s": (0,), "iq1_s": (0,),
                 "iq4_xs": (0,), "iq1_m": (), "mxfp4": ()}   # iq1_m: f16 in 4 nibbles; mxfp4: one E8M0 byte
SYNTH_TYPES = ("f16", *_SCALE_FIELDS)
_FILE_TYPES = {"q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M", "q3_k": "MOSTLY_Q3_K_M", "q2_k": "MOSTLY_Q2_K",
               "mxfp4": "MOSTLY_MXFP4_MOE"}
_POOL_BLOCKS = 1 << 20          # at most this many random blocks drawn per type and reused (shifted) for every tensor
_CHUNK_BLOCKS = 1 << 18         # blocks written per call
_STD_SAMPLE = 4096              # blocks dequantized to measure a type's standard deviation at scale 1


def _ggml_qtype(qtype: str):
    import gguf

    return gguf.GGMLQuantizationType[qtype.upper()]


def _file_type(qtype: str):
    import gguf

    name = _FILE_TYPES.get(qtype, f"MOSTLY_{qtype.upper()}")
    return getattr(gguf.LlamaFileType, name, gguf.LlamaFileType.GUESSED)


def block_shape(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    import gguf

    return gguf.GGML_QUANT_SIZES[_ggml_qtype(qtype)]


def _set_scale(blocks: np.ndarray, qtype: str, scale: float, offset: float = 0.0) -> None:
    """Write `scale` into every block's scale field and `scale * offset` into its offset field (the min of
    Q4_1/Q5_1/K types), in place."""
    if qtype == "mxfp4":                       # E8M0: 2^(e - 127), the nearest power of two
        blocks[:, 0] = int(np.clip(127 + round(np.log2(scale)), 1, 254))
        return
    if qtype == "iq1_m":                       # the top nibble of each of the four uint16 sub-scale words
        bits = np.array([scale], dtype=np.float16).view(np.uint16)[0]
        words = blocks[:, 48:56].view(np.uint16)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((int(bits) >> (4 * i)) & 0xF) << 12)
        return
    for off, value in zip(_SCALE_FIELDS[qtype], (scale, scale * offset)):
        blocks[:, off:off + 2] = np.array([value], dtype=np.float16).view(np.uint8)


class _BlockPool:
    """Random blocks of one type, the min (offset) that centres their weights and the scale that gives them a
    standard deviation of 1."""

    def __init__(self, qtype: str, n_blocks: int, rng: np.random.Generator):
        self.qtype = qtype
        _, size = block_shape(qtype)
        self.blocks = rng.integers(0, 256, size=(max(n_blocks, 1), size), dtype=np.uint8)
        if qtype == "q8_0":
            self.blocks[:, 2:][self.blocks[:, 2:] == 128] = 129    # int8 -128 is outside llama.cpp's symmetric range
        self.offset = 0.0
        if len(_SCALE_FIELDS.get(qtype, ())) == 2:                 # weights = scale * (A + offset * B): no mean
            a = self._sample(0.0)
            b = self._sample(1.0) - a
            self.offset = float(-a.mean() / b.mean()) if b.mean() else 0.0
        self.unit_std = float(np.std(self._sample(self.offset)))

    def _sample(self, offset: float) -> np.ndarray:
        """The first _STD_SAMPLE blocks' weights at scale 1 and this offset."""
        from gguf import quants

        sample = self.blocks[:_STD_SAMPLE].copy()
        _set_scale(sample, self.qtype, 1.0, offset)
        return quants.dequantize(sample, _ggml_qtype(self.qtype))

    def write(self, fout, n_blocks: int, std: float, offset: int) -> None:
        """Stream `n_blocks` blocks (from `offset`, wrapping) scaled to weights of standard deviation `std`."""
        pool = len(self.blocks)
        done = 0
        while done < n_blocks:
            start = (offset + done) % pool
            count = min(_CHUNK_BLOCKS, n_blocks - done, pool - start)
            chunk = self.blocks[start:start + count].copy()
            _set_scale(chunk, self.qtype, std / self.unit_std, self.offset)
            fout.write(chunk.data)
            done += count


def read_tensor_types(path: Path) -> list[tuple[str, str]]:
    """(regex, type) rules from a file of `regex=type` lines, llama-quantize's --tensor-type-file format."""
    rules = []
    for line in read_text(path, "tensor-types file").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, qtype = line.rpartition("=")
        if not sep or qtype.lower() not in SYNTH_TYPES:
            raise CcmoeError(f"{path}: cannot read {line[:80]!r} as regex=type with a type synth writes",
                             f"use one of: {', '.join(SYNTH_TYPES)}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise CcmoeError(f"{path}: {pattern[:80]!r} is not a regular expression ({e})", "fix the pattern") from None
        rules.append((pattern, qtype.lower()))
    return rules


def _stored_type(name: str, shape: tuple[int, ...], keep_f32: bool, s: SynthSpec, qtype: str,
                 rules: list[tuple[str, str]]) -> str:
    """How a tensor is stored: F32 norms, biases and routers (llama.cpp never quantizes those); the first matching
    rule's type, else `qtype`; F16 where the skew lives in the values; Q8_0, then F16, when its rows do not split
    into the type's blocks."""
    import re

    if keep_f32 or name.endswith("ffn_gate_inp.weight"):
        return "f32"
    if s.skew > 0 and name == "token_embd.weight":
        return "f16"
    wanted = next((t for pattern, t in rules if re.search(pattern, name)), qtype)
    for t in (wanted, "q8_0"):
        if t == "f16" or shape[0] % block_shape(t)[0] == 0:
            return t
    return "f16"


def write_quantized_gguf(s: SynthSpec, path: Path, qtype: str, rules: list[tuple[str, str]] | None = None) -> Path:
    """A random-weight MoE GGUF whose weight matrices are random blocks of `qtype`, or of the type of the first
    matching (regex, type) rule: mixes such as llama.cpp's Q4_K_M, written without an F16 copy or an imatrix."""
    import gguf

    rules = rules or []
    for t in [qtype, *(t for _, t in rules)]:
        if t not in SYNTH_TYPES:
            raise CcmoeError(f"cannot generate weights of type {t!r}", f"choose one of: {', '.join(SYNTH_TYPES)}")
    layout = tensor_layout(s)
    rng = np.random.default_rng(s.seed)
    u = rng.standard_normal(s.n_embd).astype(np.float32)
    u /= np.linalg.norm(u)
    tmp = temp_beside(path)
    try:
        w = gguf.GGUFWriter(str(tmp), s.arch)
        add_metadata(w, s)
        w.add_file_type(_file_type(qtype))
        add_vocab_to_gguf(w, byte_vocab(s.vocab_size))
        w.add_string("ccmoe.synth_spec", str(asdict(s)))
        plan = []
        for name, shape, keep_f32 in layout:
            kind = _stored_type(name, shape, keep_f32, s, qtype, rules)
            n = int(np.prod(shape))
            np_shape = tuple(reversed(shape))
            if kind in ("f32", "f16"):
                dtype = np.dtype(np.float32 if kind == "f32" else np.float16)
                w.add_tensor_info(name, np_shape, dtype, n * dtype.itemsize)
            else:
                block, size = block_shape(kind)
                w.add_tensor_info(name, np_shape, np.dtype(np.float32), n // block * size, raw_dtype=_ggml_qtype(kind))
            plan.append((name, shape, kind, n))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        most = {}
        for _, _, kind, n in plan:
            if kind not in ("f32", "f16"):
                most[kind] = max(most.get(kind, 0), n // block_shape(kind)[0])
        pools = {k: _BlockPool(k, min(_POOL_BLOCKS, most[k]), rng) for k in sorted(most)}
        for name, shape, kind, n in plan:
            w.write_padding(fout, fout.tell())
            if kind in pools:
                std = 1.0 if name == "token_embd.weight" else 1.0 / np.sqrt(shape[0])
                block, size = block_shape(kind)
                pool = pools[kind]
                pool.write(fout, n // block, float(std), int(rng.integers(0, len(pool.blocks))))
                nbytes = n // block * size
            else:
                data = _tensor_data(name, shape, s, rng, u).astype(np.float32 if kind == "f32" else np.float16)
                fout.write(data.tobytes())
                nbytes = data.nbytes
            w.write_padding(fout, nbytes)
        w.close()
        os.replace(tmp, path)
        return path
    except OSError as e:
        raise disk_full_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def layout_inventory(s: SynthSpec, dtype: str = "BF16", source: str = "") -> ModelInventory:
    """A weight-less inventory with the tensors llama.cpp would have for this spec."""
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    tensors = []
    for name, shape, keep_f32 in tensor_layout(s):
        n = int(np.prod(shape))
        tensors.append(TensorInfo(name, list(shape), "F32" if keep_f32 else dtype, n * (4 if keep_f32 else width)))
    meta = {"general.architecture": s.arch, "general.name": s.name}
    for key, value in (("block_count", s.n_layer), ("embedding_length", s.n_embd), ("expert_count", s.n_expert),
                       ("expert_used_count", s.n_expert_used), ("expert_feed_forward_length", s.n_ff_exp),
                       ("context_length", s.ctx), ("attention.head_count", s.n_head), ("vocab_size", s.vocab_size)):
        meta[f"{s.arch}.{key}"] = value
    if s.arch == "deepseek2":
        meta.update({f"deepseek2.{k}": v for k, v in (
            ("expert_shared_count", s.n_expert_shared), ("leading_dense_block_count", s.n_dense_lead),
            ("feed_forward_length", s.n_ff), ("attention.q_lora_rank", s.q_lora_rank),
            ("attention.kv_lora_rank", s.kv_lora_rank), ("attention.head_count_kv", 1))})
    return ModelInventory(arch=s.arch, name=s.name, source=source or f"inventory:{s.name}", metadata=meta,
                          tensors=tensors, file_bytes=sum(t.n_bytes for t in tensors))


def deepseek_v3_spec(n_expert: int = 256) -> SynthSpec:
    """DeepSeek-V3/R1 as llama.cpp converts it (config.json of deepseek-ai/DeepSeek-V3, MTP layer skipped)."""
    return SynthSpec(arch="deepseek2", name=f"DeepSeek-V3 ({n_expert} experts)", vocab_size=129280, ctx=163840,
                     n_embd=7168, n_layer=61, n_head=128, n_expert=n_expert, n_expert_used=8, n_ff_exp=2048,
                     n_dense_lead=3, n_ff=18432, n_expert_shared=1, q_lora_rank=1536, kv_lora_rank=512,
                     qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, routed_scale=2.5)


BUILTIN_INVENTORIES = {
    "deepseek-v3": lambda: deepseek_v3_spec(256),
    "deepseek-v3-pruned192": lambda: deepseek_v3_spec(192),
}


def builtin_inventory(name: str) -> ModelInventory:
    if name not in BUILTIN_INVENTORIES:
        raise CcmoeError(f"unknown built-in inventory {name!r}",
                         f"choose one of: {', '.join('inventory:' + n for n in BUILTIN_INVENTORIES)}")
    spec = BUILTIN_INVENTORIES[name]()
    inv = layout_inventory(spec, "BF16", source=f"inventory:{name}")
    if name.endswith("pruned192"):
        inv.metadata["deepseek2.expert_used_count"] = 6   # 8 x 192/256, the activation adjustment
        inv.metadata["ccmoe.original_expert_count"] = 256
        inv.metadata["ccmoe.original_expert_used_count"] = 8
    return inv


# ---------------------------------------------------------------- python -m ccmoe_runtime.model.synth

def spec_from_args(argv: list[str] | None = None) -> tuple[SynthSpec, Path, str, bool, Path | None]:
    """Parse `python -m ccmoe_runtime.model.synth` arguments into a spec, an output path, a type, --force and the
    --tensor-types file."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ccmoe_runtime.model.synth",
                                description="Write a random-weight MoE GGUF (F16, or quantized blocks written directly).")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--type", dest="qtype", choices=SYNTH_TYPES, default="f16")
    p.add_argument("--tensor-types", type=Path, default=None,
                   help="regex=type lines (llama-quantize's --tensor-type-file format): per-tensor types, first match")
    p.add_argument("--force", action="store_true")
    fields = {"arch": str, "name": str, "vocab_size": int, "ctx": int, "n_embd": int, "n_layer": int, "n_head": int,
              "n_head_kv": int, "head_dim": int, "n_expert": int, "n_expert_used": int, "n_ff_exp": int,
              "n_dense_lead": int, "n_ff": int, "n_expert_shared": int, "skew": float, "seed": int}
    for name, typ in fields.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=getattr(SynthSpec, name))
    a = p.parse_args(argv)
    spec = SynthSpec(**{k: getattr(a, k) for k in fields})
    spec.check()
    return spec, a.out, a.qtype, a.force, a.tensor_types


def main(argv: list[str] | None = None) -> int:
    try:
        spec, out, qtype, force, types_file = spec_from_args(argv)
        rules = read_tensor_types(types_file) if types_file else None
        path = write_random_gguf(spec, out, force=force, qtype=qtype, rules=rules)
    except CcmoeError as e:
        print(f"synth: error: {e.one_line()}")
        return e.exit_code
    n = sum(int(np.prod(shape)) for _, shape, _ in tensor_layout(spec))
    mix = f" + {len(rules)} per-tensor rules" if rules else ""
    print(f"wrote {path}: {n / 1e9:.2f}B parameters, {path.stat().st_size / 1e9:.2f} GB ({qtype}{mix})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def generate_model(spec: SynthSpec, out: Path, qtype: str = "f16", tensor_types: Path | None = None,
                   force: bool = False) -> Path:
    """`generate model`: the random-weight GGUF of `spec` in `qtype` (or per-tensor types from a rules file)."""
    rules = read_tensor_types(tensor_types) if tensor_types else None
    return write_random_gguf(spec, out, force=force, qtype=qtype.lower(), rules=rules)
