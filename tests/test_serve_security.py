"""llama-server's security with ccmoe-run: the API key never on a command line, CORS only for localhost origins by
default, a warning when listening beyond loopback without a key, and logs kept (and pruned) in the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccmoe_runtime.cli import main
from ccmoe_runtime.engine.server import LOGS_KEPT, LlamaServer, ServerConfig, free_port, new_log_path

KEY = "ccmoe-test-key-7f3a9c1e"


def cmdlines() -> dict[int, bytes]:
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                found[int(d.name)] = (d / "cmdline").read_bytes()
            except OSError:
                pass
    return found


def origin_grant(base_url: str, origin: str) -> str | None:
    """The Access-Control-Allow-Origin llama-server answers to a request from `origin` (None: no grant)."""
    req = urllib.request.Request(base_url + "/v1/models", headers={"Origin": origin})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers.get("Access-Control-Allow-Origin")


@pytest.mark.slow
def test_the_api_key_is_in_no_process_command_line(engine, bundled_model, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    tmp_logs = set(Path("/tmp").glob("llama-server-*.log"))
    cmd = [sys.executable, "-m", "ccmoe_runtime.cli", "serve", "--device", "auto", "--port", str(free_port()),
           "--ctx", "256", "--api-key-file", str(key_file), "--no-warmup", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        ready = json.loads(line)
        lines = cmdlines()
        assert proc.pid in lines and ready["pid"] in lines          # both processes were looked at
        assert not [pid for pid, c in lines.items() if KEY.encode() in c]
        req = urllib.request.Request(ready["base_url"] + "/models", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=10) as r:       # the key did reach llama-server
            assert json.loads(r.read())["data"]
        assert Path(ready["log"]).parent.name == "logs" and not Path(ready["log"]).is_relative_to("/tmp")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert set(Path("/tmp").glob("llama-server-*.log")) == tmp_logs


@pytest.mark.slow
def test_cors_grants_localhost_origins_only_by_default(engine, bundled_model):
    with LlamaServer(engine, ServerConfig(model=bundled_model, ctx=256)) as server:
        assert origin_grant(server.base_url, "https://example.com") in (None, "")
        assert origin_grant(server.base_url, "http://localhost:3000") == "http://localhost:3000"
        assert origin_grant(server.base_url, "http://127.0.0.1:8000") == "http://127.0.0.1:8000"


def test_listening_beyond_loopback_without_a_key_warns(monkeypatch):
    monkeypatch.delenv("CCMOE_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", "--device", "cpu", "--host", "0.0.0.0", "--dry-run", "--no-trial"])
    assert result.exit_code == 0, result.output
    assert "warning: llama-server listens on 0.0.0.0 without an API key" in result.output
    quiet = CliRunner().invoke(main, ["serve", "--device", "cpu", "--dry-run", "--no-trial"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output


def test_a_key_from_the_environment_silences_the_warning_and_stays_off_the_command_line(monkeypatch):
    monkeypatch.setenv("CCMOE_API_KEY", KEY)
    result = CliRunner().invoke(main, ["serve", "--device", "cpu", "--host", "0.0.0.0", "--dry-run", "--no-trial"])
    assert result.exit_code == 0, result.output
    assert "without an API key" not in result.output and KEY not in result.output


def test_server_logs_live_in_the_cache_and_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("CCMOE_CACHE_DIR", str(tmp_path))
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(LOGS_KEPT + 5):
        old = logs / f"llama-server-old-{i:02d}.log"
        old.write_text("old\n")
        os.utime(old, (time.time() - 1000 + i, time.time() - 1000 + i))
    fresh = new_log_path()
    assert fresh.parent == logs
    kept = sorted(logs.glob("llama-server-*.log"))
    assert len(kept) == LOGS_KEPT and fresh in kept
    assert not (logs / "llama-server-old-00.log").exists() and (logs / f"llama-server-old-{LOGS_KEPT + 4}.log").exists()
