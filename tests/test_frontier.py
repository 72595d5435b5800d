"""The speed/quality frontier: types and memory pools chosen together (compress/frontier.py, `plan --frontier`)."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from ccmoe_runtime.cli import main
from ccmoe_runtime.compress.frontier import KNEE_RULE, ClassUse, FrontierPoint, knee_index, pareto, select
from ccmoe_runtime.compress.pipeline import load_frontier, load_plan
from ccmoe_runtime.core.errors import CcmoeError

DSV3 = "inventory:deepseek-v3-pruned192"
STRIX_WEIGHTS_GB = 113.95                   # the plan's weight budget for DSV3-192 on strixhalo-128g (docs)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def strix(tmp_path_factory):
    """`plan --frontier` of the 192-expert DeepSeek-V3 on a Strix Halo, from the inventory alone."""
    out = tmp_path_factory.mktemp("frontier") / "dsv3.json"
    start = time.monotonic()
    result = invoke("plan", DSV3, "--device", "strixhalo-128g", "--frontier", "-o", str(out))
    took = time.monotonic() - start
    assert result.exit_code == 0, result.output
    return out, result.output, took


def _point(tps: float, kld: float, size: int) -> FrontierPoint:
    return FrontierPoint(0.0, size, size, {"gpu": size}, tps, 0.0, kld, {"attention": ClassUse({"gpu": size}, 4.0, {})},
                         {}, {})


@pytest.mark.slow
def test_strix_halo_frontier_lists_points_and_the_chosen_one_fits(strix):
    out, text, took = strix
    f = load_frontier(out.with_name("dsv3.frontier.json"))
    assert len(f.points) >= 5 and f.unified and f.device == "strixhalo-128g"
    assert round(f.budget.weights_bytes / 1e9, 2) == STRIX_WEIGHTS_GB == round(f.capacities["all"] / 1e9, 2)
    assert all(q.total_bytes <= f.budget.weights_bytes for q in f.points)
    assert f.point.total_bytes <= f.budget.weights_bytes and f.chosen == f.knee and f.chosen_why == KNEE_RULE
    assert took < 20, took                                  # seconds, not minutes (1 s alone on the 2-core machine)
    # the table: a row per point with size, tok/s and KLD; the chosen one marked; the files written
    rows = [line for line in text.splitlines() if line[3:4].isdigit()]
    assert len(rows) == len(f.points) and rows[f.chosen].startswith("*")
    for suffix in (".json", ".types.txt", ".png", ".frontier.json", ".frontier.png"):
        assert out.with_name("dsv3" + suffix).stat().st_size > 0
    plan = load_plan(out)                                   # the chosen point as a plan `build` can use
    assert {n: t.type for n, t in plan.tensors.items()} == f.point.types
    assert plan.total_bytes == f.point.total_bytes


@pytest.mark.slow
def test_strix_halo_frontier_is_monotone_and_spends_speed_on_always_read_tensors(strix):
    f = load_frontier(strix[0].with_name("dsv3.frontier.json"))
    pts = f.points
    # slower never worse: along the frontier tok/s rises and so does KLD
    assert all(a.decode_tps < b.decode_tps and a.kld < b.kld for a, b in zip(pts, pts[1:]))
    # more bytes never more KLD, except between points that all fill the budget (there size is not the trade-off)
    full = 0.999 * f.capacities["all"]
    for a in pts:
        for b in pts:
            if a.total_bytes > b.total_bytes and not (b.total_bytes >= full):
                assert a.kld <= b.kld, (a.total_bytes, a.kld, b.total_bytes, b.kld)
    # one memory on a unified device: everything on the GPU backend but the embedding table
    assert {w for n, w in pts[0].where.items() if not n.startswith("token_embd.")} == {"gpu"}
    # the quality end is the plain plan (all budget for quality); faster points take bits from the tensors read by
    # every token (attention, shared expert) first, the routed experts (6 of 192 read per token) last
    q, fast = pts[0], pts[len(pts) // 2]
    assert q.classes["attention"].bpw > fast.classes["attention"].bpw + 0.5
    assert q.classes["routed_expert"].bpw - fast.classes["routed_expert"].bpw < 0.2


@pytest.mark.slow
def test_min_tps_and_max_kld_pick_points_and_bad_targets_are_one_line_errors(strix, tmp_path):
    f = load_frontier(strix[0].with_name("dsv3.frontier.json"))
    target = f.points[-2].decode_tps
    result = invoke("plan", DSV3, "--device", "strixhalo-128g", "--min-tps", str(target), "-o",
                    str(tmp_path / "a.json"), "--no-png")
    assert result.exit_code == 0, result.output
    g = load_frontier(tmp_path / "a.frontier.json")
    assert g.point.decode_tps >= target and "--min-tps" in g.chosen_why
    result = invoke("plan", DSV3, "--device", "strixhalo-128g", "--max-kld", str(f.points[2].kld), "-o",
                    str(tmp_path / "b.json"), "--no-png")
    assert result.exit_code == 0, result.output
    assert load_frontier(tmp_path / "b.frontier.json").point.kld <= f.points[2].kld
    for args, words in [(["--min-tps", "1000"], "no point reaches 1000 tok/s"),
                        (["--max-kld", "1e-9"], "no point predicts a KLD of 1e-09 or less"),
                        (["--min-tps", "5", "--max-kld", "0.1"], "both given")]:
        result = invoke("plan", DSV3, "--device", "strixhalo-128g", *args, "-o", str(tmp_path / "c.json"))
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
        assert not (tmp_path / "c.json").exists() and not (tmp_path / "c.frontier.json").exists()


@pytest.mark.slow
def test_cuda_frontier_fills_the_gpu_with_the_always_read_tensors_and_respects_its_capacity(tmp_path):
    out = tmp_path / "g.json"
    result = invoke("plan", DSV3, "--device", "cuda-rtx4090-24g", "--frontier", "-o", str(out), "--no-png", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    f = load_frontier(tmp_path / "g.frontier.json")
    assert not f.unified and len(f.points) >= 5 and summary["files"]["frontier"].endswith("g.frontier.json")
    fixed_gpu = sum(v["bytes"] for n, v in f.fixed.items() if not n.startswith("token_embd."))
    for q in f.points:
        assert q.pool_bytes["gpu"] <= f.capacities["gpu"] + fixed_gpu
        assert q.pool_bytes["cpu"] <= f.capacities["cpu"]
        # attention and the shared expert are read by every token: they live on the GPU; most routed bytes do not
        assert q.classes["attention"].where() == "gpu" and q.classes["shared_expert"].where() == "gpu"
        assert q.classes["routed_expert"].bytes["cpu"] > q.classes["routed_expert"].bytes.get("gpu", 0)
    assert all(a.decode_tps < b.decode_tps and a.kld < b.kld for a, b in zip(f.points, f.points[1:]))


def test_pareto_keeps_only_points_no_other_beats_on_both_speed_and_kld():
    pts = [_point(10, 0.05, 100), _point(12, 0.04, 100), _point(11, 0.06, 90), _point(15, 0.2, 80)]
    kept = pareto(pts)
    assert [(q.decode_tps, q.kld) for q in kept] == [(12, 0.04), (15, 0.2)]


def test_knee_is_the_most_tok_s_per_unit_of_kld_and_targets_select_their_points():
    pts = [_point(9.0, 0.048, 114), _point(10.5, 0.0507, 114), _point(12.3, 0.0674, 113), _point(17.5, 0.74, 100)]
    assert knee_index(pts) == 1
    assert select(pts, 1) == (1, KNEE_RULE)
    assert select(pts, 1, min_tps=12)[0] == 2
    assert select(pts, 1, max_kld=0.05)[0] == 0
    with pytest.raises(CcmoeError, match="fastest predicts 17.5"):
        select(pts, 1, min_tps=18)
    with pytest.raises(CcmoeError, match="best predicts 0.048"):
        select(pts, 1, max_kld=0.01)


# ---------------------------------------------------------------- compress --device on the bundled model

def _tiny_gpu_profile(path, spare_bytes: int) -> str:
    """A CUDA profile whose GPU holds llama.cpp's buffers for the bundled model at --ctx 8192 plus `spare_bytes`
    of weights (the bundled model is 16 MB): some tensors must live in host memory."""
    from ccmoe_runtime.devices import get_profile
    from ccmoe_runtime.model.sources import open_inventory
    from ccmoe_runtime.placement.costmodel import default_factors, tensor_loads
    from ccmoe_runtime.placement.layout import Settings
    from ccmoe_runtime.placement.memory import SearchContext, pool_capacities, pool_use

    inv, dev = open_inventory("bundled"), get_profile("cuda-rtx4090-24g")
    loads = tensor_loads(inv)
    cx = SearchContext(inv, dev, default_factors(dev), Settings(ctx=8192), loads, "gpu", 4)
    need = pool_use(cx, {ld.name: "cpu" for ld in loads}, "f16", None, pool_capacities(dev))["gpu"]
    gb = (need.total - need.weights + spare_bytes) / 1e9
    path.write_text(f'name = "tiny-gpu"\ndescription = "a GPU with room for a few MB of weights"\nbackend = "cuda"\n'
                    f'threads = 2\nos_reserve_gb = 1.0\nlink_bandwidth_gbs = 25.0\nslow_types = []\n'
                    f'unsupported_types = []\n\n[[pools]]\nname = "vram"\nkind = "gpu"\ncapacity_gb = {gb:.6f}\n'
                    f'usable_fraction = 1.0\nbandwidth_gbs = 1000.0\n\n[[pools]]\nname = "ram"\nkind = "cpu"\n'
                    f'capacity_gb = 16.0\nusable_fraction = 0.9\nbandwidth_gbs = 50.0\n')
    return str(path)


@pytest.fixture(scope="module")
def compressed(engine, bundled_model, corpus, tmp_path_factory):
    """`compress --device cpu` of the bundled model (measure, frontier, build), then `compress --device` a GPU
    with room for 4 MB of weights (no probe builds: minutes on the 2-core machine)."""
    from conftest import run_cli

    work = tmp_path_factory.mktemp("compress-device")
    cpu = run_cli("compress", str(bundled_model), "--device", "cpu", "--no-impact", "-o", str(work / "cpu.gguf"),
                  "-t", "2", timeout=900)
    assert cpu.returncode == 0, cpu.stderr
    profile = _tiny_gpu_profile(work / "tiny-gpu.toml", 4 * 2**20)
    gpu = run_cli("compress", str(bundled_model), "--device", profile, "--no-impact", "-o", str(work / "gpu.gguf"), "-t", "2",
                  "--json", timeout=900)
    assert gpu.returncode == 0, gpu.stderr
    return work, cpu.stdout, json.loads(gpu.stdout), profile


@pytest.mark.slow
def test_compress_device_writes_the_gguf_types_rules_and_layout_together(compressed):
    from ccmoe_runtime.model.inventory import read_gguf
    from ccmoe_runtime.placement.layout import load_placement

    work, text, _, _ = compressed
    names = sorted(p.name for p in work.iterdir() if p.is_file() and p.name.startswith("cpu"))
    assert names == ["cpu.gguf", "cpu.gguf.build.json", "cpu.layout.json", "cpu.ot.txt", "cpu.types.txt"]
    f = load_frontier(work / "cpu.ccmoe" / "plan.frontier.json")
    assert len(f.points) >= 2 and f.point.total_bytes <= f.budget.weights_bytes
    built = {t.name: t.ggml_type for t in read_gguf(work / "cpu.gguf").tensors}
    assert all(built[n] == t for n, t in f.point.types.items())         # the GGUF is the chosen point
    lines = (work / "cpu.types.txt").read_text().split()
    assert len(lines) == len(f.point.types) and all(f"={t.lower()}" in ln for ln, t in
                                                     zip(lines, [f.point.types[n] for n in sorted(f.point.types)]))
    layout = load_placement(work / "cpu.layout.json")
    assert layout["device"] == "cpu" and set(layout["tensors"].values()) == {"cpu"} and layout["model_digest"]
    assert "chosen (*)" in text and "wrote" in text


@pytest.mark.slow
def test_serve_dry_run_uses_the_layout_compress_wrote(compressed):
    from conftest import run_cli

    from ccmoe_runtime.placement.layout import load_placement

    work, _, gpu, profile = compressed
    layout = load_placement(work / "gpu.layout.json")
    rules = (work / "gpu.ot.txt").read_text().split()
    assert rules and rules == layout["overrides"]                        # some tensors in host memory: -ot rules
    assert gpu["placement"]["server_args"][gpu["placement"]["server_args"].index("-ot") + 1] == ",".join(rules)
    cpu_side = {n for n, w in layout["tensors"].items() if w == "cpu" and not n.startswith("token_embd.")}
    point = gpu["frontier"]["points"][gpu["frontier"]["chosen"]]
    assert point["pool_bytes"]["cpu"] > 0 and cpu_side
    result = run_cli("serve", "--model", str(work / "gpu.gguf"), "--device", profile, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    assert served["placement"]["overrides"] == layout["overrides"]
    assert served["placement"]["tensors"] == layout["tensors"]
    assert any("gpu.layout.json" in n for n in served["placement"]["notes"])
    # another device: the layout is not used, and serve says so
    other = run_cli("serve", "--model", str(work / "gpu.gguf"), "--device", "cuda-rtx4090-24g", "--dry-run", "--json")
    assert other.returncode == 0, other.stderr
    assert any("made for tiny-gpu" in n for n in json.loads(other.stdout)["placement"]["notes"])


@pytest.mark.slow
def test_compress_device_bad_targets_fail_before_any_work(bundled_model, tmp_path):
    from conftest import run_cli

    out = tmp_path / "o.gguf"
    result = run_cli("compress", str(bundled_model), "--device", "cpu", "--min-tps", "5", "--max-kld", "0.1",
                     "-o", str(out))
    assert result.returncode == 2 and "both given" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
    out.write_bytes(b"mine")
    (tmp_path / "o.layout.json").write_text("{}")
    result = run_cli("compress", str(bundled_model), "--device", "cpu", "-o", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf", "o.layout.json"]
    assert out.read_bytes() == b"mine" and (tmp_path / "o.layout.json").read_text() == "{}"
