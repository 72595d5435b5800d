"""Router statistics: which experts each token picks and with what weight, read from llama.cpp as it runs.

The context's evaluation callback (`cb_eval`) sees the MoE nodes that llama.cpp's `build_moe_ffn`
(src/llama-graph.cpp) names per layer: `ffn_moe_topk-<il>` holds the chosen expert ids (I32,
[n_used, n_tokens]); `ffn_moe_weights-<il>` the router's probability of each chosen expert; then, when the
architecture does so, `ffn_moe_weights_softmax-<il>`, `ffn_moe_weights_norm-<il>` (renormalised over the
chosen experts) and `ffn_moe_weights_scaled-<il>` (times the routed scale). The last of these present is
the weight that multiplies the expert's output: the routing score counted here. The text is tokenized and
cut into chunks exactly as llama-imatrix does (BOS replaces each chunk's first token, every token is an
output), so the counts are comparable with its expert counts.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.artifacts import file_sha256, load_artifact, save_artifact
from ..core.errors import EXIT_ENGINE, CcmoeError
from ..engine.build import Engine, load_bindings
from ..engine.ggml import Ggml
from ..model.inventory import model_digest, read_gguf, require_moe, summarize
from .stats import available_ram, chunks_per_pass

ROUTER_STATS_VERSION = 1
ROUTER_NODE = re.compile(r"^ffn_moe_(topk|weights|weights_softmax|weights_norm|weights_scaled)-(\d+)$")
WEIGHT_STAGES = ("weights", "weights_softmax", "weights_norm", "weights_scaled")   # graph order: the last is final
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26


class _TensorHead(ctypes.Structure):
    """The leading fields of struct ggml_tensor (ggml/include/ggml.h of the pinned llama.cpp)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4)]


@dataclass
class LayerTally:
    """Per expert of one layer: tokens routed to it, and the sums of their final and raw router weights."""

    counts: np.ndarray
    score_sum: np.ndarray
    prob_sum: np.ndarray

    @staticmethod
    def empty(n_expert: int) -> "LayerTally":
        return LayerTally(*(np.zeros(n_expert, dtype=np.float64) for _ in range(3)))

    def add(self, ids: np.ndarray, score: np.ndarray, prob: np.ndarray) -> None:
        """Fold one micro-batch in: ids, score and prob are [n_tokens, n_used]."""
        n = len(self.counts)
        flat = ids.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise CcmoeError(f"the router chose expert {int(flat.max())} of {n}", "check the model's expert count",
                             EXIT_ENGINE)
        self.counts += np.bincount(flat, minlength=n)
        self.score_sum += np.bincount(flat, weights=score.ravel().astype(np.float64), minlength=n)
        self.prob_sum += np.bincount(flat, weights=prob.ravel().astype(np.float64), minlength=n)


def _ggml_lib(engine: Engine) -> ctypes.CDLL:
    """The engine's libggml-base (the instance libllama uses) with the tensor accessors typed."""

    lib = Ggml(engine).lib
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


@dataclass
class RouterCapture:
    """The cb_eval callback: collects each layer's chosen experts and weights, one micro-batch at a time."""

    lib: ctypes.CDLL
    n_expert: int
    tallies: dict[int, LayerTally] = field(default_factory=dict)
    pending: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    final_stage: str = "weights"
    error: BaseException | None = None

    def __post_init__(self) -> None:
        import llama_cpp

        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)   # kept alive with self

    def _on_node(self, tensor: int, ask: bool, user_data: int) -> bool:
        try:
            m = ROUTER_NODE.match(self.lib.ggml_get_name(tensor).decode(errors="replace"))
            if ask or not m:
                return bool(m)
            stage, layer = m.group(1), int(m.group(2))
            if stage == "topk":              # a new micro-batch for this layer: fold the previous one in
                self._fold(layer)
            self.pending.setdefault(layer, {})[stage] = self._read(tensor, stage)
        except BaseException as e:          # an exception must not cross the C boundary
            self.error = self.error or e
        return True

    def _read(self, tensor: int, stage: str) -> np.ndarray:
        """A node's values in token-major order, following its strides (the top-k ids are a view)."""
        head = _TensorHead.from_address(tensor)
        want = GGML_TYPE_I32 if stage == "topk" else GGML_TYPE_F32
        if head.type != want:
            raise CcmoeError(f"router node {stage} has ggml type {head.type}, expected {want}",
                             "the engine's MoE graph changed; update ccmoe-runtime", EXIT_ENGINE)
        nbytes = self.lib.ggml_nbytes(tensor)
        raw = np.empty(nbytes, dtype=np.uint8)
        self.lib.ggml_backend_tensor_get(tensor, raw.ctypes.data, 0, nbytes)
        dtype = np.int32 if stage == "topk" else np.float32
        view = np.ndarray(tuple(reversed(head.ne[:])), dtype=dtype, buffer=raw, strides=tuple(reversed(head.nb[:])))
        return np.ascontiguousarray(view).reshape(-1, head.ne[0]) if stage == "topk" else view.ravel()

    def _fold(self, layer: int) -> None:
        nodes = self.pending.pop(layer, None)
        if not nodes or "topk" not in nodes:
            return
        stage = next(s for s in reversed(WEIGHT_STAGES) if s in nodes)
        self.final_stage = max(self.final_stage, stage, key=WEIGHT_STAGES.index)
        tally = self.tallies.setdefault(layer, LayerTally.empty(self.n_expert))
        ids = nodes["topk"]                 # [n_tokens, n_used]; the weights hold one value per id
        tally.add(ids, nodes[stage].reshape(ids.shape), nodes["weights"].reshape(ids.shape))

    def flush(self) -> None:
        """Fold every layer's last micro-batch in; re-raise an error the callback hit."""
        for layer in list(self.pending):
            self._fold(layer)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def read_text(path: Path) -> str:
    """A text file as llama.cpp's `-f` reads it (one trailing newline dropped)."""
    if not Path(path).is_file():
        raise CcmoeError(f"calibration text {path} does not exist", "pass --calib with a plain-text file")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


def _tokenize(llama_cpp, vocab, text: str) -> np.ndarray:
    """Tokens of `text` with the model's special tokens added, not parsing special tokens (as llama-imatrix)."""
    data = text.encode()
    size = len(data) + 16
    for _ in range(2):
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, size, True, False)
        if n >= 0:
            return np.frombuffer(buf, dtype=np.int32, count=n).copy()
        size = -n
    raise CcmoeError("llama.cpp could not tokenize the calibration text", "check the text's encoding", EXIT_ENGINE)


class _Session:
    """A model and a context with the capture callback, freed on exit."""

    def __init__(self, llama_cpp, model: Path, ctx: int, threads: int, capture: RouterCapture, sequences: int = 1):
        self.L = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(model).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise CcmoeError(f"llama.cpp could not load {model}", "check the file with `ccmoe-run inspect`", EXIT_ENGINE)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = ctx * sequences     # each sequence gets ctx cells
        p.n_seq_max = sequences
        p.n_threads = p.n_threads_batch = threads
        p.no_perf = True
        p.cb_eval = capture.callback
        p.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            what = f"{sequences} sequences of {ctx} tokens" if sequences > 1 else f"{ctx} tokens"
            raise CcmoeError(f"llama.cpp could not create a context of {what} for {model}", "lower --ctx",
                             EXIT_ENGINE)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.batch = llama_cpp.llama_batch_init(ctx * sequences, 0, 1)

    def __enter__(self) -> "_Session":
        return self

    def __exit__(self, *exc) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def decode(self, chunks: list[np.ndarray]) -> None:
        """Evaluate chunks from an empty cache in one pass, each its own sequence, every token an output (so the
        last layer sees them all)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        b = self.batch
        i = 0
        for seq, tokens in enumerate(chunks):
            for pos, tok in enumerate(tokens.tolist()):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, 1
                b.seq_id[i][0] = seq
                i += 1
        b.n_tokens = i
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise CcmoeError(f"llama_decode failed ({rc})", "check the model and --ctx", EXIT_ENGINE)


def layer_summary(t: LayerTally, n_tokens: int) -> dict[str, list]:
    """Counts, frequency (share of tokens; sums to experts-used), mean final and raw weight when picked."""
    picked = np.maximum(t.counts, 1)
    return {"counts": [int(c) for c in t.counts],
            "frequency": [round(float(x), 6) for x in t.counts / max(n_tokens, 1)],
            "mean_score": [round(float(x), 6) for x in np.where(t.counts > 0, t.score_sum / picked, 0.0)],
            "mean_prob": [round(float(x), 6) for x in np.where(t.counts > 0, t.prob_sum / picked, 0.0)]}


def router_stats(engine: Engine, model: Path, text: Path, ctx: int = 256, chunks: int | None = 64,
                 threads: int | None = None, sequences: int | None = None) -> dict[str, Any]:
    """Per MoE layer and expert: activation counts and frequency, mean routing score, on `text`. `sequences`
    chunks go through the weights per pass (default: several when the model is larger than the free RAM, so a
    streamed model is read once per pass, not once per chunk); the counts do not depend on it."""

    inv = read_gguf(model)
    summary = summarize(inv)
    require_moe(summary, str(model))
    content = read_text(text)
    llama_cpp = load_bindings(engine)
    import llama_cpp._logger as llama_log

    llama_log.set_verbose(False)
    capture = RouterCapture(_ggml_lib(engine), summary.n_expert)
    per_pass = sequences or chunks_per_pass(inv.file_bytes, available_ram(), chunks)
    with _Session(llama_cpp, Path(model), ctx, threads or os.cpu_count() or 1, capture, per_pass) as s:
        tokens = _tokenize(llama_cpp, s.vocab, content)
        n_chunk = len(tokens) // ctx if not chunks else min(chunks, len(tokens) // ctx)
        if n_chunk < 1:
            raise CcmoeError(f"{text} has {len(tokens)} tokens, fewer than one {ctx}-token chunk",
                             "pass a longer calibration text or a smaller --ctx")
        add_bos = llama_cpp.llama_vocab_get_add_bos(s.vocab)
        pieces = [tokens[i * ctx:(i + 1) * ctx].copy() for i in range(n_chunk)]
        if add_bos:
            for chunk in pieces:
                chunk[0] = llama_cpp.llama_vocab_bos(s.vocab)
        for first in range(0, n_chunk, per_pass):
            s.decode(pieces[first:first + per_pass])
            capture.flush()
    n_tokens = n_chunk * ctx
    if sorted(capture.tallies) != summary.moe_layers:
        raise CcmoeError(f"the router callback saw layers {sorted(capture.tallies)}, the model's MoE layers are "
                         f"{summary.moe_layers}", "the engine's MoE graph changed; update ccmoe-runtime", EXIT_ENGINE)
    return {"model": str(model), "model_digest": model_digest(Path(model)), "calibration": str(text),
            "calibration_sha256": file_sha256(Path(text)), "ctx": ctx, "chunks_requested": chunks, "chunks": n_chunk,
            "chunks_per_pass": per_pass,
            "tokens": n_tokens, "n_expert": summary.n_expert, "n_expert_used": summary.n_expert_used,
            "score_node": f"ffn_moe_{capture.final_stage}",
            "layers": {str(layer): layer_summary(capture.tallies[layer], n_tokens) for layer in sorted(capture.tallies)}}


# ---------------------------------------------------------------- the artifact

def router_stats_path(folder: Path, model: Path) -> Path:
    return Path(folder) / f"{Path(model).name.removesuffix('.gguf')}.router-stats.json"


def save_router_stats(stats: dict, path: Path, force: bool = True) -> Path:
    return save_artifact(path, "router-stats", ROUTER_STATS_VERSION, stats, force=force)


def load_router_stats(path: Path) -> dict:
    return load_artifact(path, "router-stats", ROUTER_STATS_VERSION)


def stats_match(doc: dict, model: Path, text: Path, ctx: int, chunks: int | None) -> bool:
    """Whether saved statistics were measured on this model file and text with these settings."""
    return (doc.get("model_digest") == model_digest(Path(model)) and doc.get("ctx") == ctx
            and doc.get("chunks_requested") == chunks and doc.get("calibration_sha256") == file_sha256(Path(text)))


def cached_router_stats(engine: Engine, model: Path, text: Path, path: Path, ctx: int = 256, chunks: int | None = 64,
                        threads: int | None = None) -> dict:
    """The statistics saved at `path` when they match the inputs, else measured now and saved there."""
    read_text(text)
    if Path(path).is_file():
        doc = load_router_stats(path)
        if stats_match(doc, model, text, ctx, chunks):
            return doc
    stats = router_stats(engine, model, text, ctx=ctx, chunks=chunks, threads=threads)
    save_router_stats(stats, path)
    return load_router_stats(path)
