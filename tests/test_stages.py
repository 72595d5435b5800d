"""Resumable compress: a real `ccmoe-run compress` killed after its first stage resumes from there, --stop-after
ends after a stage, and the result is the file an uninterrupted run writes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from ccmoe_runtime.compress.stages import StageLog
from ccmoe_runtime.engine.tools import run_imatrix


def _tensors(path: Path) -> dict[str, tuple[str, str]]:
    """Each tensor's type and the sha256 of its bytes."""
    import gguf

    return {t.name: (t.tensor_type.name, hashlib.sha256(t.data.tobytes()).hexdigest())
            for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.slow
def test_a_killed_compress_resumes_from_its_last_finished_stage(engine, bundled_model, corpus, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus.train.read_text()[:12_000])
    imatrix = run_imatrix(engine, bundled_model, calib, tmp_path / "given.imatrix.gguf", ctx=256, chunks=4, threads=2)
    args = [str(bundled_model), "--device", "cpu", "--budget-gb", "0.0035", "--calib", str(calib), "--imatrix",
            str(imatrix), "--no-impact", "-t", "2"]
    ref = tmp_path / "ref" / "ref.gguf"
    run_cli("compress", *args, "-o", str(ref), check=True)

    out = tmp_path / "out" / "out.gguf"
    stages = out.parent / "out.ccmoe" / "stages.json"
    proc = subprocess.Popen([sys.executable, "-m", "ccmoe_runtime.cli", "compress", *args, "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if stages.is_file() and "statistics" in json.loads(stages.read_text()).get("stages", {}):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "compress finished before it could be killed"
    recorded = json.loads(stages.read_text())["stages"]
    assert list(recorded) == ["statistics"] and not out.exists()
    imatrix_copy = out.parent / "out.ccmoe" / f"{bundled_model.stem}.imatrix.gguf"
    mtime = imatrix_copy.stat().st_mtime_ns

    stopped = run_cli("compress", *args, "-o", str(out), "--stop-after", "sensitivity", check=True)
    assert "statistics: finished earlier from the same inputs" in stopped.stderr
    assert "sensitivity: done in" in stopped.stderr and "stopped after sensitivity" in stopped.stdout
    assert not out.exists() and "impact" not in json.loads(stages.read_text())["stages"]

    resumed = run_cli("compress", *args, "-o", str(out), check=True)
    for stage in ("statistics", "sensitivity"):
        assert f"{stage}: finished earlier from the same inputs" in resumed.stderr, resumed.stderr
    assert "impact: done in" in resumed.stderr and "build: done in" in resumed.stderr
    assert imatrix_copy.stat().st_mtime_ns == mtime                    # not written again
    # the same model as the uninterrupted run (the metadata differ only in the imatrix's path)
    assert (out.parent / "out.ccmoe" / "plan.types.txt").read_text() == \
        (ref.parent / "ref.ccmoe" / "plan.types.txt").read_text()
    assert _tensors(out) == _tensors(ref)
    assert set(json.loads(stages.read_text())["stages"]) == {"statistics", "sensitivity", "impact", "plan", "build"}

    # the calibration text changes: every stage runs again (a finished OUT is kept unless --force: remove it)
    out.unlink()
    calib.write_text(corpus.train.read_text()[:10_000])
    again = run_cli("compress", *args, "-o", str(out), "--stop-after", "statistics", check=True)
    assert "statistics: running" in again.stderr and "finished earlier" not in again.stderr


def test_a_stage_is_skipped_only_while_its_key_and_outputs_match(tmp_path):
    out = tmp_path / "a.json"
    out.write_text("1")
    log = StageLog.open(tmp_path)
    key = log.key("statistics", "inputs")
    assert not log.done("statistics", key)
    log.finish("statistics", key, [out])
    log.done("sensitivity", log.key("sensitivity", log.outputs_of("statistics")))
    log.finish("sensitivity", "k2", [])
    again = StageLog.open(tmp_path)
    assert again.done("statistics", key) and not again.done("statistics", log.key("statistics", "other inputs"))
    assert "sensitivity" not in again.records                # a stage that runs again drops the later ones
    out.write_text("changed")                                # an output changed since: run again
    assert not StageLog.open(tmp_path).done("statistics", key)
    assert not StageLog.open(tmp_path, fresh=True).records
