"""Hugging Face safetensors folders as model input: the bundled model exported as a Qwen3MoeForCausalLM folder
and converted back by llama.cpp's own convert_hf_to_gguf.py (needs the `convert` extra)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import namedtuple
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import run_cli
from gguf.quants import dequantize

from ccmoe_runtime.core.errors import EXIT_RESOURCE, EXIT_USAGE, CcmoeError
from ccmoe_runtime.model import convert
from ccmoe_runtime.model.hfexport import export_hf
from ccmoe_runtime.model.sources import resolve_model_path


def installed(module: str) -> bool:
    """Whether a module can be imported, found without importing it (a dotted name's missing parent counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# find_spec, not an import: transformers imports huggingface_hub, which reads HF_HUB_CACHE once, at import
MISSING = [m for m in ("torch", "transformers", "sentencepiece", "safetensors", "google.protobuf") if not installed(m)]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs the convert extra (missing {MISSING})")

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                  "tokenizer.chat_template")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, bundled_model) -> Path:
    return export_hf(bundled_model, tmp_path_factory.mktemp("hf") / "ccmoe-mini-moe")


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even), returned as float32."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def _tokens_and_perplexity(bindings, model: Path, text: str, ctx: int = 128, chunks: int = 4) -> tuple[list[int], float]:
    """The model's tokens for `text` and its perplexity computed as llama-perplexity does (chunks of ctx tokens,
    the first replaced by BOS, the second half scored), through the engine's libraries. llama-perplexity itself
    loses its last log lines now and then on a busy machine: its asynchronous logger is not flushed at exit."""
    llm = bindings.Llama(model_path=str(model), logits_all=True, n_ctx=ctx, n_threads=2, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True)
    nll: list[float] = []
    for c in range(chunks):
        chunk = [llm.token_bos(), *ids[c * ctx + 1:(c + 1) * ctx]]
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[:ctx], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll += [-logp[i, chunk[i + 1]] for i in range(ctx // 2, ctx - 1)]
    return ids, float(np.exp(np.mean(nll)))


def test_export_writes_a_hf_folder(hf_folder):
    from safetensors.numpy import load_file

    config = json.loads((hf_folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 8
    names = set(load_file(hf_folder / "model.safetensors"))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.3.mlp.gate.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.experts.7.down_proj.weight"} <= names
    assert convert.is_hf_folder(hf_folder) and not convert.is_hf_folder(hf_folder / "config.json")


@pytest.mark.slow
def test_hf_folder_converts_to_the_same_model(hf_folder, bundled_model, bindings, corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CCMOE_CACHE_DIR", str(cache))
    out = resolve_model_path(str(hf_folder))
    assert out == convert.converted_path(hf_folder) and out.is_relative_to(cache / "converted")

    original, converted = gguf.GGUFReader(str(bundled_model)), gguf.GGUFReader(str(out))
    meta_a, meta_b = _fields(original), _fields(converted)
    assert meta_b["general.architecture"] == "qwen3moe"
    assert {k: meta_b.get(k) for k in TOKENIZER_KEYS} == {k: meta_a.get(k) for k in TOKENIZER_KEYS}
    for key in ("block_count", "expert_count", "expert_used_count", "embedding_length", "rope.freq_base"):
        assert meta_b[f"qwen3moe.{key}"] == meta_a[f"qwen3moe.{key}"]

    a = {t.name: t for t in original.tensors}
    b = {t.name: t for t in converted.tensors}
    assert sorted(a) == sorted(b)
    for name, ta in a.items():
        tb = b[name]
        assert list(tb.shape) == list(ta.shape), name
        big = ta.tensor_type == gguf.GGMLQuantizationType.F16
        assert tb.tensor_type == (gguf.GGMLQuantizationType.BF16 if big else ta.tensor_type), name
        values = dequantize(ta.data, ta.tensor_type)
        assert np.array_equal(dequantize(tb.data, tb.tensor_type), _bf16(values) if big else values), name

    text = corpus.heldout.read_text()
    (ids_a, ppl_a), (ids_b, ppl_b) = (_tokens_and_perplexity(bindings, m, text) for m in (bundled_model, out))
    assert ids_b == ids_a and len(ids_a) > 10_000
    assert ppl_b == pytest.approx(ppl_a, rel=0.01)  # BF16 against F16 rounding

    # unchanged folder: the cached conversion is reused, also by the CLI
    stamp = out.stat().st_mtime_ns
    assert resolve_model_path(hf_folder) == out and out.stat().st_mtime_ns == stamp
    result = run_cli("inspect", "--json", str(hf_folder), env={"CCMOE_CACHE_DIR": str(cache)}, check=True)
    assert json.loads(result.stdout)["n_expert"] == 8 and out.stat().st_mtime_ns == stamp


def test_existing_output_is_kept_without_force(hf_folder, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone else's file")
    with pytest.raises(CcmoeError, match="already exists") as err:
        convert.convert_hf(hf_folder, out)
    assert err.value.exit_code == EXIT_USAGE and out.read_bytes() == b"someone else's file"


@pytest.mark.slow
def test_broken_config_fails_in_one_line_and_leaves_nothing(hf_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_folder, broken)
    (broken / "tokenizer.model").unlink()  # the plain script, no SentencePiece shim
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchMoeForCausalLM"]}))
    out_dir = tmp_path / "out"
    with pytest.raises(CcmoeError, match="NoSuchMoeForCausalLM is not supported") as err:
        convert.convert_hf(broken, out_dir / "broken.gguf")
    assert "\n" not in str(err.value) and err.value.exit_code == EXIT_USAGE
    assert not list(out_dir.glob("*.gguf")) and not list(out_dir.glob(".*part"))


def test_interrupt_removes_the_partial_file(hf_folder, tmp_path, monkeypatch):
    def interrupted(cmd, log_path, progress):
        Path(cmd[cmd.index("--outfile") + 1]).write_bytes(b"half a GGUF")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_run_converter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_hf(hf_folder, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_packages_and_disk_space(hf_folder, tmp_path, monkeypatch):
    find_spec = convert.importlib.util.find_spec
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda m: None if m == "transformers" else find_spec(m))
    with pytest.raises(CcmoeError, match=r"needs transformers.*pip install 'ccmoe-runtime\[convert\]'"):
        convert.convert_hf(hf_folder, tmp_path / "m.gguf")
    monkeypatch.undo()

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(CcmoeError, match=r"needs about 0\.08 GiB free .* only 0\.00 GiB") as err:
        convert.convert_hf(hf_folder, tmp_path / "m.gguf")
    assert err.value.exit_code == EXIT_RESOURCE
    assert convert.failure_line(["Traceback (most recent call last):", "  File x", "ModuleNotFoundError: No module "
                                 "named 'sentencepiece'", "", "****"]).startswith("ModuleNotFoundError")


@pytest.mark.slow
def test_hub_repo_with_safetensors_is_downloaded_and_converted(hf_folder, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--ccmoe--mini-moe"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(hf_folder, root / "snapshots" / commit)
    # through the CLI: huggingface_hub reads HF_HUB_CACHE once, at import, so this process must not import it
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "CCMOE_CACHE_DIR": str(tmp_path / "cache")}
    info = json.loads(run_cli("inspect", "--json", "hf:ccmoe/mini-moe", env=env, check=True).stdout)
    assert (info["arch"], info["n_expert"]) == ("qwen3moe", 8)
    assert Path(info["source"]).parent.parent == tmp_path / "cache" / "converted"
    result = run_cli("inspect", "hf:ccmoe/mini-moe:Q4_K_M", env=env)
    assert result.returncode == EXIT_USAGE and "matched no .gguf" in result.stderr


def test_stale_conversions_of_a_changed_folder_are_dropped(hf_folder, tmp_path):
    converted = tmp_path / "converted"
    for digest, folder in (("old", hf_folder), ("other", tmp_path / "elsewhere")):
        (converted / digest).mkdir(parents=True)
        (converted / digest / "m-bf16.gguf").write_bytes(b"GGUF")
        (converted / digest / "m-bf16.gguf.source.json").write_text(json.dumps({"folder": str(folder.resolve())}))
    dropped = convert.drop_stale_conversions(hf_folder, keep=converted / "new" / "m-bf16.gguf")
    assert dropped == [converted / "old" / "m-bf16.gguf"]
    assert sorted(p.name for p in converted.iterdir()) == ["other"]
