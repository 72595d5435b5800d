"""The HTML report, rendered by a real browser (headless Chromium) from a real history."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import run_cli

from ccmoe_runtime.engine.tools import quantize

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def history(engine, bundled_model, tmp_path_factory):
    """Real evaluations of two quantizations of the bundled model, appended by `ccmoe-run eval --history`."""
    work = tmp_path_factory.mktemp("report")
    path = work / "history.jsonl"
    for mix in ("Q4_K_M", "Q8_0"):
        model = quantize(engine, bundled_model, work / f"{mix}.gguf", mix, [], threads=2)
        run_cli("eval", "--model", str(model), "--reference", str(bundled_model), "--history", str(path), "-t", "2",
                check=True)
    run_cli("bench", "--device", "cpu", "--runs", "2", "--history", str(path), check=True, timeout=600)
    return path


@pytest.mark.slow
def test_eval_history_records_quality_with_host_and_time(history):
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["eval", "eval", "bench"]
    q4, q8 = records[:2]
    assert q8["mean_kld"] < q4["mean_kld"] and q8["model_bytes"] > q4["model_bytes"]
    assert q4["host"]["cores"] >= 1 and q4["time"].endswith("+00:00")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh --train installs it as root)")
def test_report_renders_in_headless_chromium_with_every_chart(history, tmp_path):
    placement = {"model": "x.gguf", "tensors": {f"blk.{i}.{k}.weight": ("gpu" if i < 2 or "attn" in k else "cpu")
                                                for i in range(4) for k in ("attn_q", "ffn_up_exps", "ffn_down_exps")}}
    (tmp_path / "placement.json").write_text(json.dumps(placement))
    out = tmp_path / "report.html"
    run_cli("report", "--history", str(history), "--placement", str(tmp_path / "placement.json"), "-o", str(out),
            check=True)
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3            # tokens/s, quality and placement
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000"]
    dom = subprocess.run(browser + ["--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-charts-shown="3/3"' in dom                     # the browser decoded every chart
    shot = tmp_path / "shot.png"
    subprocess.run(browser + [f"--screenshot={shot}", "--window-size=1280,2200", out.as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 2000 and float(np.std(pixels)) > 0.05   # a page with content, not a blank screen
