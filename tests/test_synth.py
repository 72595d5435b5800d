"""Generated models run in llama.cpp, and their expert-usage skew is what was asked for (measured with llama-imatrix)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import ROOT, run_cli

from ccmoe_runtime.compress.stats import expert_counts, usage_entropy
from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.engine.tools import run_imatrix, run_perplexity
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf


@pytest.fixture(scope="module")
def calibration_text(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.txt"
    path.write_text(corpus.heldout.read_text()[:20_000])
    return path


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_skew_concentrates_expert_use(engine, calibration_text, tmp_path, arch):
    usage = {}
    for skew in (0.0, 3.0):
        spec = SynthSpec(arch=arch, n_layer=3, n_dense_lead=1, n_expert=8, n_expert_used=2, skew=skew, seed=2)
        model = write_random_gguf(spec, tmp_path / f"{arch}-{skew}.gguf")
        counts = expert_counts(run_imatrix(engine, model, calibration_text, tmp_path / f"{skew}.imatrix.gguf",
                                           ctx=128, chunks=8, threads=2))
        assert counts and all(c.shape == (8,) for c in counts.values())
        usage[skew] = counts
    for layer in usage[3.0]:
        skewed, flat = usage[3.0][layer], usage[0.0][layer]
        assert usage_entropy(skewed) < usage_entropy(flat) - 0.3, (layer, skewed, flat)
        assert skewed[:4].sum() > 0.8 * skewed.sum(), (layer, skewed)   # low-numbered experts are the popular ones


def test_generated_models_decode_in_llama_bench(engine, deepseek2_model, qwen3moe_model):
    for model in (deepseek2_model, qwen3moe_model):
        out = subprocess.run([str(engine.tool("llama-bench")), "-m", str(model), "-p", "16", "-n", "4", "-r", "1",
                              "-t", "2", "-o", "json"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-1000:]
        import json

        rows = json.loads(out.stdout)
        assert {r["n_gen"] for r in rows} == {0, 4} and all(r["avg_ts"] > 0 for r in rows)


def test_generator_is_deterministic_and_refuses_overwrite(tmp_path):
    spec = SynthSpec(arch="deepseek2", n_layer=2, seed=7, skew=1.0)
    a = write_random_gguf(spec, tmp_path / "a.gguf")
    b = write_random_gguf(spec, tmp_path / "b.gguf")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(CcmoeError, match="already exists"):
        write_random_gguf(spec, a)
    result = run_cli("generate", "model", "--arch", "qwen3moe", "-o", str(a))
    assert result.returncode == 2 and "--force" in result.stderr
    assert not list(tmp_path.glob(".*part*")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_generator_arguments():
    with pytest.raises(CcmoeError, match="experts used per token"):
        SynthSpec(n_expert=4, n_expert_used=6).check()
    with pytest.raises(CcmoeError, match="cannot generate"):
        SynthSpec(arch="mixtral").check()


@pytest.mark.parametrize("qtype,ggml_type", [("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_quantized_generation_loads_and_runs_in_llama_cpp(engine, tmp_path, qtype, ggml_type):
    """Weights written directly as random Q8_0/Q4_0 blocks: the right types and sizes, deterministic, and llama.cpp
    loads and decodes them (what the 32 GB GPU benchmark model relies on)."""
    import json

    from ccmoe_runtime.model.inventory import read_gguf
    from ccmoe_runtime.model.synth import main as synth_main

    spec = SynthSpec(arch="qwen3moe", n_layer=3, n_expert=8, n_expert_used=2, skew=1.0, seed=4)
    a = write_random_gguf(spec, tmp_path / "a.gguf", qtype=qtype)
    assert a.read_bytes() == write_random_gguf(spec, tmp_path / "b.gguf", qtype=qtype).read_bytes()
    types = {t.name: t.ggml_type for t in read_gguf(a).tensors}
    assert types["blk.0.ffn_up_exps.weight"] == ggml_type and types["blk.0.attn_q.weight"] == ggml_type
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "F16"            # the skew's shared direction is kept exactly
    f16 = write_random_gguf(spec, tmp_path / "f16.gguf")
    assert a.stat().st_size < 0.6 * f16.stat().st_size
    out = subprocess.run([str(engine.tool("llama-bench")), "-m", str(a), "-p", "16", "-n", "4", "-r", "1", "-t", "2",
                          "-o", "json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    assert all(r["avg_ts"] > 0 for r in json.loads(out.stdout))
    ppl = run_perplexity(engine, ["-m", str(a), "-f", str(_text(tmp_path)), "-c", "64", "--chunks", "2", "-t", "2"],
                         str(a), last_line="Final estimate")
    assert "Final estimate: PPL" in ppl
    assert "nan" not in ppl.split("Final estimate")[1].lower()
    assert synth_main(["-o", str(tmp_path / "cli.gguf"), "--type", qtype, "--n-layer", "2"]) == 0
    assert synth_main(["-o", str(tmp_path / "cli.gguf"), "--type", qtype]) == 2      # exists: --force needed


def test_mixed_types_follow_the_rules_and_run_in_llama_cpp(engine, tmp_path):
    """K, IQ and MXFP4 blocks written directly, chosen per tensor by llama-quantize-style regex=type rules: the
    right type and size per tensor (Q8_0 where rows do not split into 256-wide blocks), and llama.cpp loads them and
    gives a finite perplexity."""
    import json

    from ccmoe_runtime.model.inventory import read_gguf
    from ccmoe_runtime.model.synth import block_shape, read_tensor_types

    rules_file = tmp_path / "types.txt"
    rules_file.write_text("# a Q4_K_M-like mix with IQ experts in the middle\n"
                          "blk\\.[02]\\.ffn_down_exps=q6_k\nblk\\.1\\.ffn_(gate|up)_exps=iq2_xxs\n"
                          "blk\\.1\\.ffn_down_exps=iq1_m\nblk\\.2\\.ffn_up_exps=mxfp4\nattn_v=q5_k\n"
                          "token_embd=q2_k\noutput\\.weight=iq4_nl\n")
    rules = read_tensor_types(rules_file)
    spec = SynthSpec(arch="qwen3moe", n_layer=3, n_embd=256, n_expert=8, n_expert_used=2, n_ff_exp=256, seed=5)
    model = write_random_gguf(spec, tmp_path / "mix.gguf", qtype="q4_k", rules=rules)
    tensors = {t.name: t for t in read_gguf(model).tensors}
    want = {"blk.0.ffn_down_exps.weight": "Q6_K", "blk.1.ffn_gate_exps.weight": "IQ2_XXS",
            "blk.1.ffn_down_exps.weight": "IQ1_M", "blk.2.ffn_up_exps.weight": "MXFP4", "blk.2.ffn_gate_exps.weight":
            "Q4_K", "blk.1.attn_v.weight": "Q5_K", "token_embd.weight": "Q2_K", "output.weight": "IQ4_NL",
            "blk.0.attn_norm.weight": "F32", "blk.0.ffn_gate_inp.weight": "F32"}
    assert {n: tensors[n].ggml_type for n in want} == want
    assert tensors["blk.0.attn_q_norm.weight"].ggml_type == "F32"
    for t in tensors.values():
        if t.ggml_type not in ("F32", "F16"):
            block, size = block_shape(t.ggml_type.lower())
            assert t.n_bytes == int(np.prod(t.shape)) // block * size, t.name
    out = subprocess.run([str(engine.tool("llama-bench")), "-m", str(model), "-p", "16", "-n", "4", "-r", "1",
                          "-t", "2", "-o", "json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    assert all(r["avg_ts"] > 0 for r in json.loads(out.stdout))
    ppl = run_perplexity(engine, ["-m", str(model), "-f", str(_text(tmp_path)), "-c", "64", "--chunks", "2", "-t",
                                  "2"], str(model), last_line="Final estimate")
    final = ppl.split("Final estimate: PPL = ")
    assert len(final) == 2
    assert 1.0 < float(final[1].split()[0]) < 10 * spec.vocab_size      # finite: no NaN or inf from the scales
    bad = tmp_path / "bad.txt"
    bad.write_text("attn_v=q7_k\n")
    with pytest.raises(CcmoeError, match="regex=type"):
        read_tensor_types(bad)


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


@pytest.mark.slow
def test_llama_cpp_mix_read_off_a_narrow_model_is_what_llama_quantize_gives_the_full_width(engine, tmp_path):
    """benchmarks/llama_mix.py: the Q4_K_M types read off llama-quantize's output on a narrow model with the same
    layers, written by synth at twice the width, are tensor for tensor the types (and sizes) llama-quantize itself
    gives the wider model (norms and routers stay float in both: F32 in synth's, the source's F16 in llama's);
    and `ccmoe-run generate model --tensor-types` writes them too."""
    import importlib.util

    from ccmoe_runtime.engine.tools import quantize
    from ccmoe_runtime.model.inventory import read_gguf
    from ccmoe_runtime.model.synth import read_tensor_types

    loaded = importlib.util.spec_from_file_location("llama_mix", ROOT / "benchmarks" / "llama_mix.py")
    mix = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(mix)
    lines = mix.mix_rules(engine, mix.proxy_spec("qwen3moe", 8, 8, 2, 64, 12, 4), "Q4_K_M", tmp_path)
    rules_file = tmp_path / "q4_k_m.txt"
    rules_file.write_text("\n".join(lines) + "\n")
    wide = SynthSpec(arch="qwen3moe", n_embd=512, n_layer=8, n_head=8, n_head_kv=2, head_dim=64, n_expert=12,
                     n_expert_used=4, n_ff_exp=512, seed=3)
    ours = write_random_gguf(wide, tmp_path / "ours.gguf", qtype="q4_k", rules=read_tensor_types(rules_file))
    theirs = quantize(engine, write_random_gguf(wide, tmp_path / "wide-f16.gguf"), tmp_path / "theirs.gguf",
                      "Q4_K_M", [])

    def types(path):
        return {t.name: (t.ggml_type, t.n_bytes) for t in read_gguf(path).tensors}

    mine, llama = types(ours), types(theirs)
    assert mine.keys() == llama.keys()
    quantized = {n for n, (t, _) in llama.items() if t not in ("F32", "F16")}
    assert {n: mine[n] for n in quantized} == {n: llama[n] for n in quantized}
    assert all(mine[n][0] in ("F32", "F16") for n in mine.keys() - quantized)   # norms and routers stay float
    assert {llama[n][0] for n in quantized} == {"Q4_K", "Q6_K"}                  # a real mix, not one type
    result = run_cli("generate", "model", "--layers", "8", "--embd", "512", "--experts", "12", "--expert-ff", "512",
                     "--type", "q4_k", "--tensor-types", str(rules_file), "-o", str(tmp_path / "cli.gguf"))
    assert result.returncode == 0, result.stderr
    cli = types(tmp_path / "cli.gguf")
    assert {n: cli[n] for n in cli if "_exps" in n} == {n: v for n, v in types(ours).items() if "_exps" in n}
    bad = run_cli("generate", "model", "--type", "q7_k", "-o", str(tmp_path / "bad.gguf"))
    assert bad.returncode != 0 and "q7_k" in bad.stderr and not (tmp_path / "bad.gguf").exists()
