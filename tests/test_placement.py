"""Placement and cost model: -ot rules select exactly what is placed, hot tensors go to the GPU first, memory fits
every pool (estimated, or measured by llama.cpp's dry run), predictions move the right way; the place command."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_cli

import ccmoe_runtime.engine.tools as T
import ccmoe_runtime.placement.layout as L
import ccmoe_runtime.placement.memory as M
import ccmoe_runtime.placement.rules as R
import ccmoe_runtime.placement.search as P
import ccmoe_runtime.placement.summary as S
from ccmoe_runtime.core.errors import EXIT_RESOURCE, CcmoeError
from ccmoe_runtime.core.units import MIB
from ccmoe_runtime.devices.profiles import load_profile_file
from ccmoe_runtime.model.inventory import kv_bytes_per_token, read_gguf
from ccmoe_runtime.model.synth import SynthSpec, layout_inventory, write_random_gguf
from ccmoe_runtime.placement.costmodel import (
    Factors,
    default_factors,
    predict,
    tensor_loads,
)

GPU_TOML = """
name = "{name}"
description = "a small test GPU"
backend = "cuda"
threads = 2
os_reserve_gb = 1.0
link_bandwidth_gbs = 25.0
[[pools]]
name = "vram"
kind = "gpu"
capacity_gb = {gpu_gb}
usable_fraction = 1.0
bandwidth_gbs = 1000.0
[[pools]]
name = "ram"
kind = "cpu"
capacity_gb = 16
usable_fraction = 0.9
bandwidth_gbs = 50.0
"""

UNIFIED_TOML = """
name = "tiny-apu"
description = "unified memory with a GPU-visible limit"
backend = "vulkan"
threads = 2
os_reserve_gb = 0.5
link_bandwidth_gbs = 80.0
[[pools]]
name = "unified"
kind = "unified"
capacity_gb = 4.0
usable_fraction = 1.0
bandwidth_gbs = 200.0
gpu_visible_gb = {visible}
"""


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory) -> Path:
    spec = SynthSpec(arch="qwen3moe", n_embd=512, n_layer=12, n_head=8, n_head_kv=2, head_dim=64, n_expert=16,
                     n_expert_used=4, n_ff_exp=512, seed=5)
    return write_random_gguf(spec, tmp_path_factory.mktemp("pl") / "q4.gguf", qtype="q4_0")


def _gpu_profile(tmp_path: Path, gpu_gb: float, name: str = "small-gpu"):
    path = tmp_path / f"{name}.toml"
    path.write_text(GPU_TOML.format(name=name, gpu_gb=gpu_gb))
    return load_profile_file(path)


def _settings(ctx: int = 1024) -> L.Settings:
    return L.Settings(ctx=ctx, kv_type="f16", margin_bytes=8 * MIB)


def _factors(device) -> Factors:
    f = default_factors(device)
    f.gpu_overhead_bytes = 64 * MIB
    return f


def test_integer_range_patterns_match_exactly():
    for lo in range(0, 64):
        for hi in range(lo, 64):
            pattern = re.compile("^(" + "|".join(R.int_range_patterns(lo, hi)) + ")$")
            assert [n for n in range(0, 130) if pattern.match(str(n))] == list(range(lo, hi + 1)), (lo, hi)


def test_rules_are_compact_and_select_exactly_the_cpu_tensors():
    inv = layout_inventory(SynthSpec(arch="deepseek2", n_layer=61, n_dense_lead=3, n_expert=8), "BF16")
    names = [t.name for t in inv.tensors]
    cpu = [n for n in names if re.search(r"blk\.(\d+)\.ffn_(up|gate)_exps", n) and int(n.split(".")[1]) < 40]
    cpu += [n for n in names if "ffn_down_exps" in n and int(n.split(".")[1]) < 39] + ["output.weight"]
    rules = R.override_rules(cpu)
    assert R.rule_matches(rules, names) == set(cpu)
    assert len(rules) == 3 and not any("," in r or ";" in r for r in rules)
    assert r"blk\.([3-9]|[1-3][0-9])\.(ffn_gate_exps|ffn_up_exps)\.weight=CPU" in rules


def test_greedy_puts_dense_tensors_first_and_whole_early_layers_on_the_cpu(q4_model):
    loads = tensor_loads(read_gguf(q4_model))
    experts = [ld for ld in loads if ld.cls == "routed_expert"]
    dense = sum(ld.n_bytes for ld in loads if ld.cls != "routed_expert" and not ld.name.startswith("token_embd."))
    per_layer = sum(ld.n_bytes for ld in experts if ld.layer == 0)
    where = P.greedy(loads, dense + 8 * per_layer + 10)
    assert all(where[ld.name] == "gpu" for ld in loads if ld.cls != "routed_expert" and ld.layer is not None)
    on_cpu = sorted({ld.layer for ld in experts if where[ld.name] == "cpu"})
    assert on_cpu == [0, 1, 2, 3]
    assert where["token_embd.weight"] == "cpu"      # llama.cpp keeps the input embeddings on the CPU


def test_placement_fits_the_gpu_and_beats_all_experts_on_cpu(q4_model, tmp_path):
    device = _gpu_profile(tmp_path, 0.18)
    inv = read_gguf(q4_model)
    p = P.place(inv, device, _factors(device), _settings())
    gpu = p.memory["gpu"]
    assert gpu.total <= gpu.capacity and gpu.weights > 0 and gpu.kv > 0 and gpu.compute > 0
    assert set(p.tensors.values()) == {"gpu", "cpu"} and p.overrides
    assert R.rule_matches(p.overrides, list(p.tensors)) == {n for n, w in p.tensors.items()
                                                            if w == "cpu" and not n.startswith("token_embd.")}
    all_cpu = {ld.name: ("cpu" if ld.cls == "routed_expert" else "gpu") for ld in tensor_loads(inv)}
    slow = predict(tensor_loads(inv), all_cpu, device, _factors(device), 12)
    assert p.predicted_empty.decode_tps > slow.decode_tps
    args = p.server_args()
    assert args[args.index("-ngl") + 1] == "999" and args[args.index("--fit") + 1] == "off"
    assert ";" in p.bench_args()[p.bench_args().index("-ot") + 1] or len(p.overrides) == 1
    rows = S.layer_rows(p)
    assert rows[0][0].startswith("0") and "CPU: ffn_" in rows[0][1]


def test_more_gpu_memory_never_predicts_slower(q4_model, tmp_path):
    inv = read_gguf(q4_model)
    speeds = []
    for gb in (0.17, 0.18, 0.2, 0.25):
        device = _gpu_profile(tmp_path, gb, f"gpu{gb}")
        speeds.append(P.place(inv, device, _factors(device), _settings()).predicted.decode_tps)
    assert speeds == sorted(speeds) and speeds[-1] > speeds[0]


def test_measured_memory_refines_the_placement_without_oscillating(q4_model, tmp_path, monkeypatch):
    """llama.cpp's dry run reports more compute buffer than estimated: the placement steps back until it fits."""
    device = _gpu_profile(tmp_path, 0.25)
    inv = read_gguf(q4_model)
    calls = []

    def fake_fit_print(engine, model, args):
        rules = args[args.index("-ot") + 1].split(",") if "-ot" in args else []
        cpu = R.rule_matches(rules, [t.name for t in inv.tensors])
        gpu = sum(t.n_bytes for t in inv.tensors if t.name not in cpu and not t.name.startswith("token_embd."))
        calls.append(gpu)
        return {"CUDA0": {"model": gpu + MIB, "context": 4 * MIB, "compute": 100 * MIB},
                "Host": {"model": 0, "context": 0, "compute": 2 * MIB}}

    monkeypatch.setattr(P, "fit_print", fake_fit_print)
    p = P.place(inv, device, _factors(device), _settings(), engine=object(), model=q4_model)
    assert p.memory_source == "llama-fit-params"
    assert p.memory["gpu"].compute == 100 * MIB and p.memory["gpu"].total <= p.memory["gpu"].capacity
    assert 2 <= len(calls) <= 8 and "cpu" in p.tensors.values()


def test_unified_memory_respects_the_gpu_visible_limit(q4_model, tmp_path):
    path = tmp_path / "apu.toml"
    path.write_text(UNIFIED_TOML.format(visible=0.2))
    device = load_profile_file(path)
    p = P.place(read_gguf(q4_model), device, _factors(device), _settings(512))
    assert p.memory["gpu"].total <= p.memory["gpu"].capacity <= 0.2e9
    assert "cpu" in set(p.tensors.values()) and p.overrides
    assert p.memory["cpu"].capacity + p.memory["gpu"].total <= 3.5e9 + 1


def test_a_model_that_fits_nowhere_is_refused(q4_model, tmp_path):
    path = tmp_path / "apu.toml"
    path.write_text(UNIFIED_TOML.format(visible=4.0).replace("capacity_gb = 4.0", "capacity_gb = 0.6"))
    device = load_profile_file(path)
    with pytest.raises(CcmoeError, match="does not fit") as err:
        P.place(read_gguf(q4_model), device, default_factors(device), L.Settings(ctx=65536, kv_type="f16"))
    assert err.value.exit_code == EXIT_RESOURCE


def test_expert_frequency_and_kv_type_move_predictions(q4_model, tmp_path):
    inv = read_gguf(q4_model)
    skewed = {"layers": {str(i): {"frequency": [0.95] * 4 + [0.2 / 12] * 12} for i in range(12)}}
    uniform, hot = tensor_loads(inv), tensor_loads(inv, skewed)
    u = next(ld for ld in uniform if ld.cls == "routed_expert")
    h = next(ld for ld in hot if ld.cls == "routed_expert")
    assert u.read_share == pytest.approx(0.25) and h.read_share == pytest.approx(0.25, rel=0.01)
    assert h.share_for_batch(8) < u.share_for_batch(8)      # a batch of 8 touches fewer distinct experts when skewed
    device = _gpu_profile(tmp_path, 0.18)
    f = _factors(device)
    where = {ld.name: "gpu" for ld in uniform}
    kv = kv_bytes_per_token(inv)
    at_4k = predict(uniform, where, device, f, 12, kv, 4096).decode_tps
    assert predict(uniform, where, device, f, 12, kv, 0).decode_tps > at_4k
    assert predict(uniform, where, device, f, 12, kv * 34 / 64, 4096).decode_tps > at_4k


@pytest.mark.slow
def test_place_command_writes_a_versioned_artifact(q4_model, tmp_path):
    toml = tmp_path / "small-gpu.toml"
    toml.write_text(GPU_TOML.format(name="small-gpu", gpu_gb=1.2))
    out = tmp_path / "placement.json"
    result = run_cli("place", str(q4_model), "--device", str(toml), "--ctx", "1024", "-o", str(out), check=True)
    assert "predicted: prompt" in result.stdout and "llama-server flags: -c 1024 -np 1 -t 2 -ngl 999" in result.stdout
    doc = L.load_placement(out)
    assert doc["version"] == L.PLACEMENT_VERSION and doc["device"] == "small-gpu"
    assert doc["memory"]["gpu"]["total"] <= doc["memory"]["gpu"]["capacity"]
    as_json = json.loads(run_cli("place", str(q4_model), "--device", str(toml), "--ctx", "1024", "--json",
                                 check=True).stdout)
    assert as_json["tensors"] == doc["tensors"]
    bad = run_cli("place", str(q4_model), "--device", str(toml), "--ctx", "10000000")
    assert bad.returncode == EXIT_RESOURCE and "does not fit" in bad.stderr and "Traceback" not in bad.stderr


def test_measured_cpu_settings_apply_only_to_weights_in_host_memory(q4_model, tmp_path):
    """Calibration's load mode and thread count for host-memory experts reach every tool's flags, and llama-bench
    and llama-fit-params accept them; a placement that is all on the GPU keeps llama.cpp's defaults."""
    from ccmoe_runtime.engine.build import find_engine
    from ccmoe_runtime.engine.tools import llama_bench

    inv = read_gguf(q4_model)
    small, big = _gpu_profile(tmp_path, 0.18, "small"), _gpu_profile(tmp_path, 8.0, "big")
    f = _factors(small)
    f.cpu_load_mode, f.cpu_threads = "none", 1
    hybrid = P.place(inv, small, f, _settings())
    assert hybrid.has_host_weights and hybrid.load_mode == "none" and hybrid.threads == 1
    for args in (hybrid.bench_args(), hybrid.server_args(), hybrid.common_args()):
        assert args[args.index("-lm") + 1] == "none"
    assert any("--load-mode none" in line for line in S.summary_lines(hybrid))
    whole = P.place(inv, big, f, _settings())
    assert not whole.has_host_weights and whole.load_mode == "auto" and "-lm" not in whole.bench_args()
    assert whole.threads == 2                                   # the profile's count: nothing runs from host memory
    engine = find_engine("cpu")
    r = llama_bench(engine, q4_model, hybrid.bench_args() + ["-t", "1"], n_prompt=32, n_gen=4)
    assert r["ok"], r.get("error")
    assert len(r["tg"]) == 1 and r["tg"][0] > 0 and r["peak_rss_bytes"] > inv_bytes(inv) // 2
    assert T.fit_print(engine, q4_model, ["-c", "256", *hybrid.common_args()]) is not None
    asked = P.place(inv, small, f, replace(_settings(), load_mode="mmap"))   # the user's choice overrides calibration
    assert asked.load_mode == "mmap" and asked.bench_args()[asked.bench_args().index("-lm") + 1] == "mmap"
    assert any("--load-mode mmap: as asked" in line for line in S.summary_lines(asked))
    assert llama_bench(engine, q4_model, asked.bench_args() + ["-t", "1"], n_prompt=32, n_gen=4)["ok"]


def inv_bytes(inv) -> int:
    return sum(t.n_bytes for t in inv.tensors)


def _measured(device) -> Factors:
    """The test factors as if `calibrate` had measured them (placement then tunes -ub and the KV type)."""
    return replace(_factors(device), source="measured (test)")


def test_a_halved_ubatch_is_chosen_only_when_its_room_buys_decode_speed(q4_model, tmp_path):
    inv = read_gguf(q4_model)
    device = _gpu_profile(tmp_path, 0.18)
    fixed = P.place(inv, device, _measured(device), L.Settings(ctx=1024, kv_type="f16", margin_bytes=8 * MIB,
                                                               ubatch_auto=False))
    auto = P.place(inv, device, _measured(device), _settings())
    assert fixed.settings.ubatch == 512 and "-ub" in fixed.bench_args()
    if auto.settings.ubatch == 256:
        assert auto.predicted_empty.decode_tps >= fixed.predicted_empty.decode_tps * P.UBATCH_MIN_GAIN
        assert auto.predicted_empty.prompt_tps >= fixed.predicted_empty.prompt_tps * P.UBATCH_MIN_PROMPT
        assert auto.memory["gpu"].weights > fixed.memory["gpu"].weights and any("-ub 256" in n for n in auto.notes)
        assert auto.bench_args()[auto.bench_args().index("-ub") + 1] == "256"
    else:
        assert auto.tensors == fixed.tensors
    big = P.place(inv, _gpu_profile(tmp_path, 8.0, "big"), _measured(device), _settings())
    assert big.settings.ubatch == 512                           # nothing in host memory: llama.cpp's default


# llama-server's defaults for what prompt speed depends on (common/common.h: n_batch 2048, n_ubatch 512, f16 KV;
# mmap loading, pinned host buffers, op offload on): an uncalibrated placement never departs from them.
SERVER_DEFAULTS = {"-b": "2048", "-ub": "512"}
NOT_DEFAULT_FLAGS = ("-ctk", "-ctv", "-lm", "--no-host", "--no-op-offload")


@pytest.mark.parametrize("gpu_gb", [0.15, 0.18, 0.3, 8.0])
def test_an_uncalibrated_placement_keeps_what_llama_servers_default_keeps(q4_model, tmp_path, gpu_gb):
    """Whatever the card's size: llama-server's -b/-ub, load mode and host buffers, f16 KV unless only q8_0 fits, and
    every tensor besides routed experts on the GPU (where --fit keeps them). At 0.18 GB a calibrated placement
    halves -ub and takes q8_0 KV for decode speed; uncalibrated, it does not."""
    inv = read_gguf(q4_model)
    device = _gpu_profile(tmp_path, gpu_gb)
    settings = L.Settings(ctx=1024, margin_bytes=8 * MIB)          # kv_type auto, ubatch auto: what serve passes
    p = P.place(inv, device, _factors(device), settings)
    args = p.server_args()
    for flag, value in SERVER_DEFAULTS.items():
        assert args[args.index(flag) + 1] == value
    assert not any(f in args for f in NOT_DEFAULT_FLAGS if p.kv_type == "f16" or not f.startswith("-ct"))
    if p.kv_type != "f16":
        with pytest.raises(CcmoeError, match="does not fit"):
            P.place(inv, device, _factors(device), replace(settings, kv_type="f16"))
    assert all(w == "gpu" for n, w in p.tensors.items() if "_exps" not in n and not n.startswith("token_embd."))
    if p.has_host_weights:
        assert P.UNCALIBRATED_NOTE in p.notes
    if gpu_gb == 0.18:
        tuned = P.place(inv, device, _measured(device), settings)
        assert (tuned.settings.ubatch, tuned.kv_type) != (512, "f16")


# GPU memory beyond llama.cpp's buffers that a trial run measured on the H100 (690-735 MiB, docs/engine.md)
H100_TRIAL_OVERHEAD = 700 * MIB


def test_a_trial_run_replaces_the_assumed_overhead_and_keeps_only_placements_that_ran(q4_model, tmp_path, monkeypatch):
    from ccmoe_runtime.engine.build import find_engine

    inv = read_gguf(q4_model)
    device = _gpu_profile(tmp_path, 1.43)                           # overhead and margin leave 0.11 GB at first
    f = _factors(device)
    f.gpu_overhead_bytes = H100_TRIAL_OVERHEAD + 300 * MIB          # calibrated on a tiny model: too cautious
    settings = L.Settings(ctx=1024, kv_type="f16")
    first = P.place(inv, device, f, settings)
    ran = {"n": 0, "second_runs": True}

    def replay(engine, model, bench_args, fit_args, **kw):
        ran["n"] += 1
        return H100_TRIAL_OVERHEAD if ran["n"] == 1 or ran["second_runs"] else None

    monkeypatch.setattr(P, "run_overhead", replay)
    engine = find_engine("cpu")
    tuned = P.tune_by_trial(first, inv, device, f, settings, engine, q4_model, None)
    assert ran["n"] == 2 and "trial run" in tuned.memory_source
    assert tuned.memory["gpu"].weights > first.memory["gpu"].weights
    assert tuned.memory["gpu"].overhead == H100_TRIAL_OVERHEAD and tuned.memory["gpu"].margin == M.TRIAL_MARGIN
    assert tuned.predicted_empty.decode_tps > first.predicted_empty.decode_tps
    ran.update(n=0, second_runs=False)
    kept = P.tune_by_trial(first, inv, device, f, settings, engine, q4_model, None)
    assert kept.tensors == first.tensors and "did not run" in kept.notes[-1]


def test_a_placement_whose_trial_fails_backs_off_in_steps_and_keeps_the_first_that_runs(q4_model, tmp_path,
                                                                                       monkeypatch):
    from ccmoe_runtime.engine.build import find_engine

    inv = read_gguf(q4_model)
    device = _gpu_profile(tmp_path, 0.6)          # 128 MiB more held back moves experts off; 512 MiB does not fit
    f = _factors(device)
    settings = L.Settings(ctx=1024, kv_type="f16")
    first = P.place(inv, device, f, settings)
    runs = []

    def replay(engine, model, bench_args, fit_args, **kw):     # out of memory first, as at 23,618 MiB on the H100
        runs.append(bench_args)
        return None if len(runs) == 1 else H100_TRIAL_OVERHEAD

    monkeypatch.setattr(P, "run_overhead", replay)
    engine = find_engine("cpu")
    stepped = P.tune_by_trial(first, inv, device, f, settings, engine, q4_model, None)
    smallest = P.place(inv, device, replace(f, gpu_overhead_bytes=f.gpu_overhead_bytes + P.TRIAL_BACKOFFS[0]), settings)
    assert len(runs) == 2 and stepped.tensors == smallest.tensors != first.tensors
    assert stepped.memory["gpu"].weights < first.memory["gpu"].weights
    assert "128 MiB more GPU memory held back, and that placement ran" in stepped.notes[-1]

    runs.clear()
    monkeypatch.setattr(P, "run_overhead", lambda *a, **kw: runs.append(a) and None)   # nothing runs
    given_up = P.tune_by_trial(first, inv, device, f, settings, engine, q4_model, None)
    assert len(runs) == 2 and "no placement with more GPU memory held back (up to 512 MiB) ran" in given_up.notes[-1]
    assert given_up.memory["gpu"].weights <= stepped.memory["gpu"].weights


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory) -> Path:
    """A compressed plan's kind of model, built with llama-quantize: experts' gate/up in Q2_K, the rest Q8_0."""
    from ccmoe_runtime.engine.build import find_engine
    from ccmoe_runtime.engine.tools import quantize

    folder = tmp_path_factory.mktemp("mixed")
    spec = SynthSpec(arch="qwen3moe", n_embd=512, n_layer=6, n_head=8, n_head_kv=2, head_dim=64, n_expert=16,
                     n_expert_used=4, n_ff_exp=512, seed=6)
    f16 = write_random_gguf(spec, folder / "f16.gguf")
    return quantize(find_engine("cpu"), f16, folder / "mixed.gguf", "q8_0",
                    [r"blk\.\d+\.ffn_gate_exps\.weight=q2_k", r"blk\.\d+\.ffn_up_exps\.weight=q2_k"])


@pytest.mark.slow
def test_types_slow_on_the_cpu_are_kept_on_the_gpu_when_that_outweighs_the_splits(mixed_model, tmp_path):
    loads = tensor_loads(read_gguf(mixed_model))
    experts = [ld for ld in loads if ld.cls == "routed_expert"]
    assert {ld.ggml_type.lower() for ld in experts} == {"q2_k", "q8_0"}
    device = _gpu_profile(tmp_path, 1.0)
    f = _factors(device)
    f.efficiency = {"cpu:q8_0": 0.9, "cpu:q2_k": 0.35, "gpu:q8_0": 0.8, "gpu:q2_k": 0.8}  # Q2_K: compute-bound on a CPU
    dense = sum(ld.n_bytes for ld in loads if ld.cls != "routed_expert" and not ld.name.startswith("token_embd."))
    budget = dense + sum(ld.n_bytes for ld in experts) // 2

    def prediction(where):
        return predict(loads, where, device, f, 6)

    def speed(where):
        return prediction(where).decode_tps

    aware = P.greedy(loads, budget, lambda ld: P.gpu_value(ld, device, f))
    by_density = P.greedy(loads, budget)
    q2k = [ld for ld in experts if ld.ggml_type.lower() == "q2_k"]
    assert all(aware[ld.name] == "gpu" for ld in q2k) and not all(by_density[ld.name] == "gpu" for ld in q2k)
    for where in (aware, by_density):
        assert sum(ld.n_bytes for ld in loads if where[ld.name] == "gpu") <= budget
    values = [P.density, lambda ld: P.gpu_value(ld, device, f)]
    # In a 30B, one expert tensor's reads on the CPU cost about 5 splits (0.26 ms vs 47 us on the H100); in this
    # small model they cost less than one, so the spread-out layout loses and density's is kept ...
    assert speed(aware) < speed(by_density)
    assert P.choose_layout(loads, budget, values, prediction) == P.drop_costly_partials(loads, by_density, prediction)
    # ... and with splits priced at the 30B's ratio the types decide
    f.split_s = 2e-6
    assert speed(aware) > speed(by_density) * 1.05
    chosen = P.choose_layout(loads, budget, values, prediction)
    assert speed(chosen) >= speed(aware) and all(chosen[ld.name] == "gpu" for ld in q2k)
    # with one efficiency for every type, the order is density's, as before
    f.efficiency = {"cpu:*": 0.9, "gpu:*": 0.8}
    assert P.greedy(loads, budget, lambda ld: P.gpu_value(ld, device, f)) == by_density


def test_llama_cpp_cpu_buffers_are_chosen_only_when_calibration_predicts_faster_decode(q4_model, tmp_path):
    """--no-host (host-memory experts in llama.cpp's repacking CPU buffers) is a calibrated lever: taken when the
    measured repacked efficiency buys at least 5% decode, not for less, never without a measurement unless asked,
    and spelled as each tool wants it (llama-bench `--no-host 1`, llama-server `--no-host`), which both accept."""
    from ccmoe_runtime.engine.build import find_engine
    from ccmoe_runtime.engine.tools import llama_bench

    inv = read_gguf(q4_model)
    device = _gpu_profile(tmp_path, 0.18, "small")
    f = _factors(device)
    f.efficiency = {"cpu:q4_0": 0.4, "gpu:q4_0": 0.8}
    plain = P.place(inv, device, f, _settings())
    assert plain.has_host_weights and not plain.cpu_repack and "--no-host" not in plain.bench_args()
    f.repack = {"efficiency": {"cpu:q4_0": 0.8}, "offload_gbs": {"q4_0": 3.0}}       # twice as fast on the CPU
    fast = P.place(inv, device, f, _settings())
    assert fast.cpu_repack and fast.tensors == plain.tensors
    assert fast.predicted_empty.decode_tps >= 1.05 * plain.predicted_empty.decode_tps
    assert fast.predicted_empty.prompt_tps < plain.predicted_empty.prompt_tps     # prompt batches stay on the CPU
    assert fast.bench_args()[-2:] == ["--no-host", "1"] and fast.server_args()[-1] == "--no-host"
    assert any("--no-host: host-memory experts" in n for n in fast.notes)
    assert P.repredict(fast, inv, device, f, 512, 0).decode_tps == pytest.approx(fast.predicted_empty.decode_tps)
    f.repack = {"efficiency": {"cpu:q4_0": 0.41}}                                    # within noise: not worth it
    assert not P.place(inv, device, f, _settings()).cpu_repack
    f.repack = {"efficiency": {"cpu:q4_0": 0.8}}
    assert not P.place(inv, device, f, replace(_settings(), cpu_repack=False)).cpu_repack
    f.repack = {}
    asked = P.place(inv, device, f, replace(_settings(), cpu_repack=True))
    assert asked.cpu_repack and any("--no-host as asked" in n for n in asked.notes)
    whole = P.place(inv, _gpu_profile(tmp_path, 8.0, "big"), f, replace(_settings(), cpu_repack=True))
    assert not whole.has_host_weights and not whole.cpu_repack                      # nothing in host memory
    engine = find_engine("cpu")
    assert llama_bench(engine, q4_model, fast.bench_args() + ["-t", "1"], n_prompt=32, n_gen=4)["ok"]
    assert T.fit_print(engine, q4_model, ["-c", "256", *fast.server_args()]) is not None
