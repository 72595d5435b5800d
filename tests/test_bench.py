"""`ccmoe-run bench`: real llama-bench runs, alternating contenders, history, and the regression check."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli

from ccmoe_runtime.bench.bench import (
    interleaved_round,
    processes_for,
    reps_for,
    round_drift,
)
from ccmoe_runtime.engine.build import find_engine
from ccmoe_runtime.model.sources import bundled_model_path


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    history = work / "history.jsonl"
    result = run_cli("bench", "--device", "cpu", "--runs", "3", "-t", "2", "--min-round-s", "0.5", "--history", str(history), "--json",
                     check=True, timeout=600)
    return {"work": work, "history": history, "result": json.loads(result.stdout), "path": work / "result.json",
            "stdout": result.stdout}


@pytest.mark.slow
def test_bench_measures_every_contender_in_alternating_rounds(measured):
    r = measured["result"]
    assert set(r["contenders"]) == {"ccmoe", "llama.cpp default"}
    for c in r["contenders"].values():
        for key in ("pp", "tg"):
            assert len(c[key]["samples"]) == 3 and c[key]["min"] <= c[key]["median"] <= c[key]["max"]
            assert c[key]["median"] > 100                                  # tokens/s of an 8M-parameter model
        assert 10e6 < c["peak_rss_bytes"] < 2e9
        assert 1 <= c["reps_per_round"] <= 100 and c["round_medians"]["tg"]["median"] <= c["tg"]["median"]
        assert 1 <= c["processes_per_round"] <= min(8, c["reps_per_round"])
    assert r["host_speed"]["median"] > 1e5 and len(r["host_speed"]["samples"]) == 6    # 3 rounds x 2 contenders
    mine = r["contenders"]["ccmoe"]
    assert mine["predicted"]["tg"] > 0 and 0 < mine["bandwidth_share"] < 5
    assert r["model_hash"].startswith("quick-sha256:") and "version" in r["engine_version"].lower()
    assert r["version"] == 6         # 4: processes_per_round; 5: processes interleaved; 6: 8 repetitions a round
    for key in ("pp", "tg"):                  # the rounds' move common to both contenders, one value per round
        assert len(r["round_drift"][key]["samples"]) == 3 and r["round_drift"][key]["median"] > 0
    # the bundled model starts in a fraction of a second, so at least one contender split its rounds over processes
    assert max(c["processes_per_round"] for c in r["contenders"].values()) >= 2


def test_a_round_is_split_over_processes_only_when_they_start_fast():
    # warm-ups as llama-bench reports them (3 repetitions): the bundled model on an H100, the 30B Q8_0 at 24 GB
    small = {"pp": [340_000.0] * 3, "tg": [1_000.0] * 3, "wall_s": 1.2}
    large = {"pp": [2_800.0] * 3, "tg": [80.0] * 3, "wall_s": 15.0}
    assert (reps_for(small, 5.0), processes_for(small, reps_for(small, 5.0))) == (39, 6)
    assert (reps_for(large, 5.0), processes_for(large, reps_for(large, 5.0))) == (8, 1)
    huge = {"pp": [60.0] * 3, "tg": [4.0] * 3, "wall_s": 120.0}    # 40 s a repetition: a round stays near a minute
    assert reps_for(huge, 5.0) == 1
    slow_start = {**small, "wall_s": 6.0}       # a process that takes seconds to start: fewer of them
    assert processes_for(slow_start, 39) == 1
    # the 10B Q8_0 with every expert in host memory on the H200 (2.2 s a repetition, about 1.7 s to start): a
    # 5 s round would be 3 repetitions; it runs 8, in 8 processes seconds apart instead of back to back in one
    cpu_bound = {"pp": [558.0] * 3, "tg": [96.6] * 3, "wall_s": 8.4}
    assert (reps_for(cpu_bound, 5.0), processes_for(cpu_bound, 8)) == (8, 8)


def test_round_drift_is_the_move_common_to_every_contender():
    # round 3 slow for both (the machine), round 1 fast for one only: the common move is round 3's
    drift = round_drift({"a": [100.0, 100.0, 80.0, 100.0], "b": [60.0, 50.0, 40.0, 50.0]})
    assert drift["min"] == pytest.approx((0.8 * 0.8) ** 0.5, abs=1e-3)
    assert drift["samples"][0] == pytest.approx(1.2 ** 0.5, abs=1e-3)
    assert drift["median"] == pytest.approx(1.0, abs=1e-3)
    assert round_drift({"a": [100.0, 90.0]}) is None                  # one contender: nothing to share a move with
    assert round_drift({"a": [100.0, 90.0], "b": [5.0]}) is None      # rounds missing: not comparable


def test_a_round_takes_the_contenders_processes_in_turn():
    # real llama-bench processes on the bundled model, two contenders of two processes each: a's first, b's first,
    # a's second, b's second, each pooled into one result
    machine: list[float] = []
    flags = {"a": ["-t", "1"], "b": ["-t", "2"]}
    r = interleaved_round(find_engine(), bundled_model_path(), flags, {"a": 2, "b": 2}, {"a": 2, "b": 2}, machine)
    assert all(x["ok"] and len(x["pp"]) == 2 and len(x["tg"]) == 2 for x in r.values())
    a, b = r["a"]["process_starts"], r["b"]["process_starts"]
    assert a[0] < b[0] < a[1] < b[1]
    assert len(machine) == 2                   # the machine's speed, before each contender's first process


def test_a_contender_that_fails_in_a_round_reports_its_failure_and_the_others_still_count():
    flags = {"a": ["-t", "1"], "bad": ["--no-such-flag"]}
    r = interleaved_round(find_engine(), bundled_model_path(), flags, {"a": 3, "bad": 3}, {"a": 3, "bad": 3}, [])
    assert r["a"]["ok"] and len(r["a"]["process_starts"]) == 3
    assert not r["bad"]["ok"] and r["bad"]["error"]


@pytest.mark.slow
def test_bench_appends_to_the_history_with_engine_host_and_model_hash(measured):
    lines = [json.loads(x) for x in measured["history"].read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["kind"] == "bench"
    assert lines[0]["model_hash"] == measured["result"]["model_hash"] and lines[0]["host"]["cores"] >= 1


@pytest.mark.slow
def test_regression_check_fails_against_a_baseline_twice_as_fast(measured, tmp_path):
    fast = json.loads(json.dumps(measured["result"]))
    for c in fast["contenders"].values():
        c["tg"]["median"] *= 2
    fast["host_speed"]["median"] *= 3          # recorded on a machine three times as fast: the report says so
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    result = run_cli("bench", "--device", "cpu", "--runs", "1", "--min-round-s", "0.3", "--no-history", "--baseline", str(tmp_path / "fast.json"),
                     "--max-regression", "20")
    assert result.returncode == 6
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ccmoe-run: error: tokens/s regressed") and "tg" in last and "limit -20 %" in last
    assert "this machine's own speed (a fixed CPU loop) changed -" in last
    # the history file itself is a valid baseline; a generous limit passes
    ok = run_cli("bench", "--device", "cpu", "--runs", "3", "--min-round-s", "0.3", "--no-history", "--baseline", str(measured["history"]),
                 "--max-regression", "95")
    assert ok.returncode == 0, ok.stderr


def test_a_file_without_bench_results_is_not_a_baseline(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    result = run_cli("bench", "--device", "cpu", "--runs", "1", "--no-history", "--baseline", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "holds no bench result" in result.stderr


@pytest.mark.tokens_per_second
@pytest.mark.skipif(not os.environ.get("CCMOE_TPS_BASELINE"),
                    reason="lab laptops only: set CCMOE_TPS_BASELINE to a bench result recorded on this machine")
def test_tokens_per_second_have_not_regressed_on_this_lab_machine():
    args = ["bench", "--runs", "5", "--baseline", os.environ["CCMOE_TPS_BASELINE"],
            "--max-regression", os.environ.get("CCMOE_TPS_MAX_REGRESSION", "10")]
    if os.environ.get("CCMOE_TPS_MODEL"):
        args += ["--model", os.environ["CCMOE_TPS_MODEL"]]
    result = run_cli(*args, timeout=3600)
    assert result.returncode == 0, result.stderr
