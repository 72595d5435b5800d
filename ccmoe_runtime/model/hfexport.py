"""Write a qwen3moe GGUF (such as the bundled model) as a Hugging Face Qwen3MoeForCausalLM safetensors folder.

The folder is what a published checkpoint looks like: config.json, model.safetensors with HF tensor names
(one tensor per expert), and a SentencePiece tokenizer (tokenizer.model + tokenizer_config.json) holding the
GGUF's pieces, scores and token types. Weights keep their GGUF types (F16 matrices, F32 norms and router),
so the export is lossless. Needs the optional `convert` extra (safetensors, sentencepiece, protobuf).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.errors import CcmoeError
from ..core.files import temp_beside, write_atomic

ARCH = "qwen3moe"
HF_ARCH = "Qwen3MoeForCausalLM"

# GGUF name (inside blk.N.) -> HF name (inside model.layers.N.), for the tensors that map one to one
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.gate",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def _need(module: str):
    """Import an optional dependency of the `convert` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CcmoeError(f"exporting a Hugging Face folder needs {module.split('.')[0]}, which is not installed",
                         "pip install 'ccmoe-runtime[convert]'") from None


def _fields(reader) -> dict[str, Any]:
    """The GGUF's metadata as plain Python values (token lists included)."""
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - a field gguf cannot decode is not needed here
            continue
    return out


def hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """config.json of a Qwen3MoeForCausalLM with the GGUF's shapes."""
    k = lambda key: meta[f"{ARCH}.{key}"]  # noqa: E731
    head_dim = int(meta.get(f"{ARCH}.attention.key_length", k("embedding_length") // k("attention.head_count")))
    return {
        "architectures": [HF_ARCH],
        "model_type": "qwen3_moe",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": int(k("embedding_length")),
        "intermediate_size": int(k("feed_forward_length")),
        "moe_intermediate_size": int(k("expert_feed_forward_length")),
        "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": int(k("attention.head_count")),
        "num_key_value_heads": int(k("attention.head_count_kv")),
        "head_dim": head_dim,
        "num_experts": int(k("expert_count")),
        "num_experts_per_tok": int(k("expert_used_count")),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": int(k("context_length")),
        "rope_theta": float(k("rope.freq_base")),
        "rms_norm_eps": float(f"{k('attention.layer_norm_rms_epsilon'):.7g}"),
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "dtype": "float16",
    }


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json for a SentencePiece (Llama-style) tokenizer; no added tokens, so types stay as stored."""
    tokens = meta["tokenizer.ggml.tokens"]
    conf: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": tokens[int(meta["tokenizer.ggml.bos_token_id"])],
        "eos_token": tokens[int(meta["tokenizer.ggml.eos_token_id"])],
        "unk_token": tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(meta[f"{ARCH}.context_length"]),
        "legacy": False,
    }
    if "tokenizer.chat_template" in meta:
        conf["chat_template"] = meta["tokenizer.chat_template"]
    return conf


def sentencepiece_model(meta: dict[str, Any]) -> bytes:
    """A serialized SentencePiece BPE ModelProto with the GGUF's pieces, scores and token types."""
    pb = _need("sentencepiece.sentencepiece_model_pb2")
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    proto = pb.ModelProto()
    for piece, score, typ in zip(tokens, scores, types):
        proto.pieces.add(piece=piece, score=float(score), type=int(typ))  # llama.cpp and SentencePiece number types alike
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(int(t) == 6 for t in types)
    spec.unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
    spec.bos_id = int(meta["tokenizer.ggml.bos_token_id"])
    spec.eos_id = int(meta["tokenizer.ggml.eos_token_id"])
    spec.pad_id = -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def hf_tensors(reader, n_layer: int) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every GGUF tensor; stacked expert tensors are split into one tensor per expert."""
    for t in reader.tensors:
        name = t.name.removesuffix(".weight")
        data = np.asarray(t.data)  # numpy order: the GGUF shape reversed, as torch stores it
        if name in _GLOBAL_NAMES:
            yield f"{_GLOBAL_NAMES[name]}.weight", data
            continue
        blk, _, what = name.partition(".")[2].partition(".")
        if not name.startswith("blk.") or not blk.isdigit() or int(blk) >= n_layer:
            raise CcmoeError(f"tensor {t.name} has no Hugging Face {HF_ARCH} name", "export a plain qwen3moe GGUF")
        prefix = f"model.layers.{blk}."
        if what in _LAYER_NAMES:
            yield f"{prefix}{_LAYER_NAMES[what]}.weight", data
        elif what in _EXPERT_NAMES:
            for e in range(data.shape[0]):
                yield f"{prefix}mlp.experts.{e}.{_EXPERT_NAMES[what]}.weight", np.ascontiguousarray(data[e])
        else:
            raise CcmoeError(f"tensor {t.name} has no Hugging Face {HF_ARCH} name", "export a plain qwen3moe GGUF")


def _check_exportable(reader, meta: dict[str, Any]) -> None:
    """Only unquantized qwen3moe GGUFs with a SentencePiece vocabulary are exported."""
    import gguf

    if meta.get("general.architecture") != ARCH:
        raise CcmoeError(f"only {ARCH} GGUFs can be exported, this one is {meta.get('general.architecture')!r}",
                         "export a qwen3moe model such as the bundled one")
    if meta.get("tokenizer.ggml.model") != "llama":
        raise CcmoeError(f"the GGUF's tokenizer is {meta.get('tokenizer.ggml.model')!r}, only SentencePiece ('llama') is exported",
                         "export a model with a SentencePiece vocabulary")
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    quantized = [t.name for t in reader.tensors if t.tensor_type not in plain]
    if quantized:
        raise CcmoeError(f"the GGUF has quantized tensors ({quantized[0]}, ...)", "export an F16/BF16/F32 GGUF")


def export_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Write `gguf_path` as a Hugging Face Qwen3MoeForCausalLM folder at `out_dir`; returns the folder."""
    import gguf

    st = _need("safetensors.numpy")
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _fields(reader)
    _check_exportable(reader, meta)
    config = hf_config(meta)
    tensors = dict(hf_tensors(reader, config["num_hidden_layers"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out_dir / "model.safetensors")      # exclusive, unpredictable: a planted link is not followed
    try:
        st.save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)
        tmp.replace(out_dir / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    _write(out_dir / "tokenizer.model", sentencepiece_model(meta))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta))
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    _write_json(out_dir / "config.json", config)  # last: a folder with config.json is a finished export
    return out_dir


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    return _write(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())


def _write(path: Path, data: bytes) -> Path:
    """Write atomically, readable by all as published files are."""
    write_atomic(path, data).chmod(0o644)
    return path
