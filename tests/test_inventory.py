"""Model inventory: MoE structure of generated models, the DeepSeek-V3 inventories, bad files, split files, the hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.model.inventory import (
    classify_tensor,
    read_gguf,
    require_moe,
    save_inventory,
    summarize,
)
from ccmoe_runtime.model.sources import open_inventory, resolve_model_path
from ccmoe_runtime.model.synth import (
    SynthSpec,
    builtin_inventory,
    layout_inventory,
    write_random_gguf,
)


def test_deepseek2_generated_model(deepseek2_model):
    s = summarize(read_gguf(deepseek2_model))
    assert (s.arch, s.is_moe, s.n_layers) == ("deepseek2", True, 4)
    assert (s.n_expert, s.n_expert_used, s.n_expert_shared, s.n_dense_lead) == (16, 4, 1, 1)
    assert s.moe_layers == [1, 2, 3]
    assert [layer.kind for layer in s.layers] == ["dense", "moe", "moe", "moe"]
    # the file's tensors are exactly what the layout says
    expected = layout_inventory(SynthSpec(arch="deepseek2", n_layer=4, n_dense_lead=1, n_expert=16, n_expert_used=4), "F16")
    assert s.total_params == sum(t.n_elements for t in expected.tensors)
    routed = s.params_by_class["routed_expert"]
    assert s.active_params == s.total_params - routed + routed * 4 // 16


def test_qwen3moe_generated_model(qwen3moe_model):
    s = summarize(read_gguf(qwen3moe_model))
    assert (s.arch, s.n_expert, s.n_expert_used, s.n_expert_shared, s.n_dense_lead) == ("qwen3moe", 8, 2, 0, 0)
    assert s.bytes_by_class["shared_expert"] == 0 and s.bytes_by_class["routed_expert"] > 0


def test_deepseek_v3_inventory_has_the_published_totals():
    s = summarize(builtin_inventory("deepseek-v3"))
    assert s.total_params == pytest.approx(671e9, rel=0.002)
    assert s.active_params == pytest.approx(37e9, rel=0.03)
    assert (s.n_layers, s.n_expert, s.n_expert_used, s.n_expert_shared, s.n_dense_lead) == (61, 256, 8, 1, 3)
    assert len(s.moe_layers) == 58
    pruned = summarize(builtin_inventory("deepseek-v3-pruned192"))
    assert pruned.total_params == pytest.approx(508e9, rel=0.002)   # the CC-MoE paper: 671B -> 508B
    assert (pruned.n_expert, pruned.n_expert_used) == (192, 6)


def test_inventory_artifact_round_trip(tmp_path):
    inv = builtin_inventory("deepseek-v3-pruned192")
    path = save_inventory(inv, tmp_path / "dsv3.json")
    doc = json.loads(path.read_text())
    assert doc["schema"] == "ccmoe-runtime/inventory" and doc["version"] == 1
    again = open_inventory(str(path))
    assert summarize(again).total_params == summarize(inv).total_params
    with pytest.raises(CcmoeError, match="already exists"):
        save_inventory(inv, path, force=False)


@pytest.mark.parametrize("name,cls", [
    ("blk.3.ffn_gate_exps.weight", "routed_expert"), ("blk.3.ffn_down_shexp.weight", "shared_expert"),
    ("blk.3.ffn_gate_inp.weight", "router"), ("blk.3.exp_probs_b.bias", "router"),
    ("blk.0.ffn_up.weight", "dense_ffn"), ("blk.0.attn_kv_a_mqa.weight", "attention"),
    ("blk.0.attn_kv_a_norm.weight", "norm"), ("token_embd.weight", "embed_output"), ("output.weight", "embed_output"),
    ("output_norm.weight", "norm"), ("blk.1.ffn_gate.3.weight", "routed_expert"),   # old Mixtral layout
    ("blk.2.ffn_gate_up_exps.weight", "routed_expert"), ("blk.2.ffn_gate_exps.bias", "routed_expert"),  # gpt-oss
])
def test_tensor_classes(name, cls):
    assert classify_tensor(name) == cls


def test_dense_model_is_reported_as_dense(dense_model):
    path = dense_model
    s = summarize(read_gguf(path))
    assert not s.is_moe and s.n_expert == 0 and s.active_params == s.total_params
    with pytest.raises(CcmoeError, match="dense model"):
        require_moe(s, str(path))
    result = run_cli("inspect", str(path))
    assert result.returncode == 0 and "dense model" in result.stdout


@pytest.mark.slow
def test_truncated_and_corrupt_files_are_clear_errors(qwen3moe_model, tmp_path):
    data = qwen3moe_model.read_bytes()
    cases = {
        "truncated.gguf": data[: len(data) // 2],
        "header-only.gguf": data[:64],
        "not-gguf.gguf": b"PK\x03\x04 this is a zip file" * 10,
        "empty.gguf": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CcmoeError) as err:
            read_gguf(path)
        assert str(path) in str(err.value)
        result = run_cli("inspect", str(path))
        assert result.returncode == 2, name
        assert result.stderr.startswith("ccmoe-run: error:") and result.stderr.count("\n") == 1, result.stderr
    assert run_cli("inspect", str(tmp_path / "missing.gguf")).returncode == 2


def test_split_gguf_from_any_shard(tmp_path, qwen3moe_model):
    spec = SynthSpec(arch="qwen3moe", n_layer=3, n_expert=8, n_expert_used=2, seed=2)
    first = write_random_gguf(spec, tmp_path / "split.gguf", split_max_tensors=10)
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) > 2 and first == shards[0]
    whole = summarize(read_gguf(qwen3moe_model))
    for shard in shards:
        s = summarize(read_gguf(shard))
        assert s.total_params == whole.total_params and s.n_expert == 8
    assert resolve_model_path(str(shards[1])) == shards[0]
    shards[-1].unlink()
    with pytest.raises(CcmoeError, match="missing 1 of"):
        read_gguf(shards[0])


def _lay_out_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """The on-disk layout huggingface-hub's cache uses: refs/main -> snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dest = root / "snapshots" / commit / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)


@pytest.mark.slow
def test_hub_source_offline_from_the_cache(tmp_path, qwen3moe_model, deepseek2_model, monkeypatch):
    cache = tmp_path / "hub"
    spec = SynthSpec(arch="qwen3moe", n_layer=3, n_expert=8, n_expert_used=2, seed=2)
    write_random_gguf(spec, tmp_path / "big.gguf", split_max_tensors=12)
    shards = {f"Q8/{p.name}": p for p in sorted(tmp_path.glob("big-*-of-*.gguf"))}
    _lay_out_hub_cache(cache, "ccmoe/tiny-moe-GGUF", {"tiny-moe-Q4_K_M.gguf": qwen3moe_model,
                                                       "tiny-moe-F16.gguf": deepseek2_model, **shards})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    assert summarize(open_inventory("hf:ccmoe/tiny-moe-GGUF:Q4_K_M")).arch == "qwen3moe"
    assert summarize(open_inventory("hf:ccmoe/tiny-moe-GGUF:tiny-moe-F16.gguf")).arch == "deepseek2"
    first_shard = sorted(shards)[0].split("/")[1]
    split = open_inventory(f"hf:ccmoe/tiny-moe-GGUF:Q8/{first_shard}")
    assert len(split.shards) == len(shards)
    with pytest.raises(CcmoeError, match="matches 3 models"):
        open_inventory("hf:ccmoe/tiny-moe-GGUF")
    result = run_cli("inspect", "--json", "hf:ccmoe/tiny-moe-GGUF:Q4_K_M", env=env)
    assert json.loads(result.stdout)["n_expert"] == 8
    result = run_cli("inspect", "hf:nobody/not-cached-GGUF", env=env)
    assert result.returncode == 2 and "offline" in result.stderr


def test_inspect_cli_on_deepseek_v3_inventory():
    result = run_cli("inspect", "inventory:deepseek-v3", check=True)
    assert "256 routed, 8 used per token, 1 shared" in result.stdout
    assert "671.03B total, 37.55B active" in result.stdout
    data = json.loads(run_cli("inspect", "--json", "inventory:deepseek-v3").stdout)
    assert data["total_params"] == pytest.approx(671e9, rel=0.002)


def test_inventory_of_a_llama_quantize_output(engine, bundled_model, tmp_path):
    """A real k-quant mix made by llama-quantize: same parameters, smaller bytes, the mix's types per class."""
    import subprocess

    out = tmp_path / "q4km.gguf"
    done = subprocess.run([str(engine.tool("llama-quantize")), str(bundled_model), str(out), "Q4_K_M", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    f16, q = summarize(read_gguf(bundled_model)), summarize(read_gguf(out))
    assert q.total_params == f16.total_params and q.n_expert == f16.n_expert
    assert q.total_bytes < 0.4 * f16.total_bytes
    assert set(q.types_by_class["routed_expert"]) <= {"Q4_K", "Q6_K", "Q5_K", "Q8_0"}
    assert set(q.types_by_class["norm"]) == {"F32"}


@pytest.mark.slow
def test_the_header_parser_reads_what_gguf_py_reads_and_skips_a_large_vocabulary_fast(tmp_path, deepseek2_model):
    import time

    from ccmoe_runtime.model.inventory import _read_gguf_shard_gguf_py, read_gguf_shard

    spec = SynthSpec(arch="deepseek2", n_layer=2, n_dense_lead=1, n_embd=64, n_expert=4, n_expert_used=2,
                     vocab_size=129280, seed=3)      # DeepSeek-V3's vocabulary size
    big_vocab = write_random_gguf(spec, tmp_path / "vocab.gguf", qtype="q8_0")
    for path in (deepseek2_model, big_vocab):
        started = time.perf_counter()
        fast = read_gguf_shard(path)
        took = time.perf_counter() - started
        assert fast == _read_gguf_shard_gguf_py(path)
    assert fast[0]["tokenizer.ggml.tokens"] == {"array_len": 129280}
    assert took < 1.0, took                    # gguf-py's reader needs ~10 s here
