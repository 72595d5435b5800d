"""benchmarks/rehearsal.py in its test size: every stage of a real compress timed and its peak RSS measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_rehearsal_measures_every_stage_and_extrapolates(tmp_path):
    out = tmp_path / "numbers.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rehearsal.py"), "--work", str(tmp_path / "w"),
                             "--size", "test", "--threads", "2", "--json", str(out),
                             "--scale-threads", "2,1"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["stages"]) == {"check", "statistics", "sensitivity", "impact", "plan", "build"}
    for stage, s in doc["stages"].items():
        assert s["seconds"] > 0 and s["peak_rss_bytes"] > 10 * 2**20, stage
    assert 0 < doc["budget_share"] < 1 and doc["out_bytes"] <= doc["budget_gb"] * 1e9 * 1.05
    assert doc["extrapolated_total_s"] > 0 and "| total |" in result.stdout
    served = doc["serve"]                                   # ccmoe-run serve on the output answered a chat request
    assert served["chat_generated_tokens"] == 32 and served["chat_generation_tokens_per_s"] > 0
    assert served["server_rss_bytes"] > 10 * 2**20 and served["ready_s"] > 0 and "serve: " in result.stdout
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, left                                   # and was stopped
    scaling = doc["scaling"]["threads"]                     # the scaling runs, fewest threads first
    assert list(scaling) == ["1", "2"] and scaling["1"]["build_speedup"] == 1.0 and doc["scaling"]["params"] > 0
    assert all(r["imatrix_s"] > 0 and r["build_s"] > 0 for r in scaling.values())
    assert not Path(doc["model"]).exists()                 # the generated model is deleted afterwards
