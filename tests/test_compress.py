"""The compression pipeline with the real tools: profile -> plan -> build, its quality claim and its bad inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from ccmoe_runtime.compress.pipeline import load_plan
from ccmoe_runtime.compress.plan import Plan, class_bits
from ccmoe_runtime.compress.quality import kl_divergence, save_reference_logits
from ccmoe_runtime.compress.quantize import verify
from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.engine.tools import quantize
from ccmoe_runtime.model.inventory import read_gguf
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf


def _tensor_bytes(path: Path) -> int:
    return sum(t.n_bytes for t in read_gguf(path).tensors)


def _one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccmoe-run: error:"), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ---------------------------------------------------------------- planning without weights

@pytest.mark.slow
def test_pre_pruned_deepseek_v3_plan_fits_strix_halo(tmp_path):
    out = tmp_path / "dsv3.json"
    result = run_cli("plan", "inventory:deepseek-v3-pruned192", "--device", "strixhalo-128g", "-o", str(out), check=True)
    plan = json.loads(out.read_text())
    assert plan["schema"] == "ccmoe-runtime/plan" and plan["sensitivity_source"].startswith("gaussian")
    weights = plan["budget"]["weights_bytes"]
    assert 0.99 * weights < plan["total_bytes"] <= weights            # fits, and leaves little unused
    bpw = {c: v["bpw"] for c, v in class_bits(Plan.from_dict(plan)).items()}
    assert bpw["routed_expert"] < 2.5 < bpw["attention"]              # the bulk is squeezed, the rest kept fine
    assert len(plan["tensors"]) == 61 * 6 + 58 * 6 + 3 * 3 + 2      # every weight matrix is planned
    lines = (tmp_path / "dsv3.types.txt").read_text().split()
    assert len(lines) == len(plan["tensors"]) and all(line.startswith("^") and "$=" in line for line in lines)
    assert (tmp_path / "dsv3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "routed_expert" in result.stdout and "down_exps" in result.stdout


def test_unpruned_deepseek_v3_does_not_fit_and_the_error_gives_the_minimum(tmp_path):
    out = tmp_path / "dsv3.json"
    result = run_cli("plan", "inventory:deepseek-v3", "--device", "strixhalo-128g", "-o", str(out))
    _one_line_error(result, 4, "smallest plan needs 131.", "prune")
    assert not out.exists()


def test_unknown_device_is_a_one_line_error(tmp_path):
    result = run_cli("plan", "inventory:deepseek-v3-pruned192", "--device", "strix-halo", "-o", str(tmp_path / "p.json"))
    _one_line_error(result, 2, "strix-halo", "strixhalo-128g")


def test_dense_and_corrupt_models_are_refused(dense_model, qwen3moe_model, tmp_path):
    _one_line_error(run_cli("plan", str(dense_model), "--device", "cpu", "-o", str(tmp_path / "d.json")), 2, "dense")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(qwen3moe_model.read_bytes()[:100_000])
    result = run_cli("compress", str(corrupt), "--device", "cpu", "-o", str(tmp_path / "c-out.gguf"))
    _one_line_error(result, 2, "corrupt.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.gguf"]


# ---------------------------------------------------------------- the pipeline on the bundled model

@pytest.fixture(scope="module")
def pipeline(engine, bundled_model, corpus, tmp_path_factory):
    """`ccmoe-run compress` at the size of llama.cpp's Q2_K mix, and that mix, built from the same imatrix."""
    work = tmp_path_factory.mktemp("compress")
    calib = work / "calib.txt"
    calib.write_text(corpus.train.read_text()[:120_000])
    run_cli("profile", str(bundled_model), "--calib", str(calib), "-o", str(work / "profile"), "--ctx", "256",
            "--chunks", "64", "-t", "2", check=True, timeout=600)
    imatrix = work / "profile" / "ccmoe-mini-moe-f16.imatrix.gguf"
    mix = quantize(engine, bundled_model, work / "Q2_K.gguf", "Q2_K", [], imatrix=imatrix, threads=2)
    plan = work / "plan.json"
    budget = _tensor_bytes(mix) / 1e9
    result = run_cli("plan", str(bundled_model), "--device", "cpu", "--budget-gb", str(budget), "--profile",
                     str(work / "profile"), "-o", str(plan), check=True)
    out = work / "planned.gguf"
    built = run_cli("build", str(bundled_model), "--plan", str(plan), "-o", str(out), "-t", "2", check=True)
    return {"work": work, "mix": mix, "plan": plan, "out": out, "plan_stdout": result.stdout,
            "build_stdout": built.stdout}


@pytest.mark.slow
def test_profile_records_the_mean_routing_score_per_expert(pipeline):
    doc = json.loads((pipeline["work"] / "profile" / "ccmoe-mini-moe-f16.router-stats.json").read_text())
    assert doc["schema"] == "ccmoe-runtime/router-stats" and doc["n_expert"] == 8
    for layer in doc["layers"].values():
        assert len(layer["mean_score"]) == 8 and all(0 < s <= 1 for s in layer["mean_score"])
        assert sum(layer["frequency"]) == pytest.approx(2.0, rel=1e-6)          # two experts per token


@pytest.mark.slow
def test_profile_measures_output_impact_per_tensor(pipeline):
    impact = json.loads((pipeline["work"] / "profile" / "ccmoe-mini-moe-f16.impact.json").read_text())
    per = impact["impact"]
    assert len(per) == len(json.loads(pipeline["plan"].read_text())["tensors"])
    assert all(v > 0 for v in per.values())
    # the output projection moves the logits most; some expert matrices matter far less
    assert per["output.weight"] == max(per.values())
    assert max(per.values()) > 20 * min(per.values())


@pytest.mark.slow
def test_plan_beats_the_q2_k_mix_at_equal_size(pipeline, engine, bundled_model, corpus):
    assert "objective: predicted KLD" in pipeline["plan_stdout"]
    assert "tensors of the planned types, loads in llama.cpp" in pipeline["build_stdout"]
    assert pipeline["out"].stat().st_size <= pipeline["mix"].stat().st_size
    reference = save_reference_logits(engine, bundled_model, corpus.heldout, pipeline["work"] / "heldout.kld",
                                      threads=2)
    ours = kl_divergence(engine, pipeline["out"], reference, threads=2)
    mix = kl_divergence(engine, pipeline["mix"], reference, threads=2)
    assert ours.mean_kld < 0.7 * mix.mean_kld and ours.same_top > mix.same_top


@pytest.mark.slow
def test_build_skips_unchanged_inputs_and_refuses_to_overwrite(pipeline, bundled_model):
    before = pipeline["out"].stat().st_mtime_ns
    again = run_cli("build", str(bundled_model), "--plan", str(pipeline["plan"]), "-o", str(pipeline["out"]), check=True)
    assert "up to date" in again.stdout and pipeline["out"].stat().st_mtime_ns == before
    other = pipeline["work"] / "other.gguf"
    other.write_bytes(b"keep me")
    result = run_cli("build", str(bundled_model), "--plan", str(pipeline["plan"]), "-o", str(other))
    _one_line_error(result, 2, "already exists", "--force")
    assert other.read_bytes() == b"keep me"


@pytest.mark.slow
def test_verify_catches_a_file_that_differs_from_its_plan(pipeline, engine):
    plan = load_plan(pipeline["plan"])
    verify(pipeline["out"], plan, engine)
    name = "blk.0.attn_q.weight"
    plan.tensors[name].type = "Q8_0" if plan.tensors[name].type != "Q8_0" else "Q6_K"
    with pytest.raises(CcmoeError, match="differ from the plan"):
        verify(pipeline["out"], plan, engine)


@pytest.mark.slow
def test_build_checks_free_disk_before_starting(pipeline, bundled_model, tmp_path):
    plan = json.loads(pipeline["plan"].read_text())
    plan["file_bytes"] = 10**18                                    # an exabyte: no disk here has that much free
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(plan))
    result = run_cli("build", str(bundled_model), "--plan", str(huge), "-o", str(tmp_path / "out.gguf"))
    _one_line_error(result, 4, "GB free", "needs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.json"]


@pytest.mark.slow
def test_activation_adjustment_is_planned_and_written(bundled_model, tmp_path):
    plan = tmp_path / "adj.json"
    run_cli("plan", str(bundled_model), "--device", "cpu", "--budget-gb", "0.006", "--original-experts", "16",
            "-o", str(plan), "--no-png", check=True)
    doc = json.loads(plan.read_text())
    assert (doc["n_expert_used"], doc["experts_used_override"]) == (2, 1)       # round(2 x 8 / 16)
    out = tmp_path / "adj.gguf"
    run_cli("build", str(bundled_model), "--plan", str(plan), "-o", str(out), check=True)
    assert read_gguf(out).key("expert_used_count") == 1
    run_cli("plan", str(bundled_model), "--device", "cpu", "--budget-gb", "0.006", "--experts-used", "3",
            "-o", str(plan), "--no-png", "--force", check=True)
    assert json.loads(plan.read_text())["experts_used_override"] == 3


# ---------------------------------------------------------------- interruption

@pytest.mark.slow
def test_interrupted_build_leaves_no_file_and_no_process(models_dir, tmp_path):
    import psutil

    spec = SynthSpec(arch="qwen3moe", n_layer=4, n_embd=512, n_expert=16, n_expert_used=4, n_ff_exp=512, seed=5)
    model = write_random_gguf(spec, models_dir / "synth-100mb.gguf")
    plan = tmp_path / "p.json"
    run_cli("plan", str(model), "--device", "cpu", "--budget-gb", "0.03", "-o", str(plan), "--no-png", check=True)
    out = tmp_path / "out.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "ccmoe_runtime.cli", "build", str(model), "--plan", str(plan),
                             "-o", str(out), "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(p.name.endswith(".part") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.02)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "llama-quantize did not start"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.types.txt"]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_eval_reports_quality_against_the_reference(pipeline, bundled_model, corpus):
    result = run_cli("eval", "--model", str(pipeline["out"]), "--reference", str(bundled_model), "--json", "-t", "2",
                     check=True)
    q = json.loads(result.stdout)
    assert 0 < q["mean_kld"] < 0.05 and 0.85 < q["same_top"] < 1.0
    assert q["ppl_base"] < q["ppl"] < 1.1 * q["ppl_base"] and q["chunks"] > 100
    same = run_cli("eval", "--model", str(bundled_model), "--reference", str(bundled_model), "--json", check=True)
    assert abs(json.loads(same.stdout)["mean_kld"]) < 1e-4                 # the reference against itself
    text = run_cli("eval", "--model", str(pipeline["out"]), "--reference", str(bundled_model), check=True).stdout
    assert "mean KLD" in text and "same top" in text


@pytest.mark.slow
def test_a_model_pruned_by_ccmoe_keeps_the_experts_used_prune_chose(bundled_model, tmp_path):
    pruned = tmp_path / "p.gguf"
    run_cli("prune", str(bundled_model), "--keep", "4", "--experts-used", "2", "-o", str(pruned), "-t", "2",
            check=True, timeout=600)
    assert read_gguf(pruned).key("expert_used_count") == 2
    plan = tmp_path / "p.json"
    run_cli("plan", str(pruned), "--device", "cpu", "--budget-gb", "0.004", "-o", str(plan), "--no-png", check=True)
    assert json.loads(plan.read_text())["experts_used_override"] is None    # not scaled a second time
