"""The real llama-server on the bundled model: completions over HTTP, clean start and stop, clear failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
from conftest import run_cli

from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.engine.server import (
    LlamaServer,
    ServerConfig,
    complete,
    free_port,
    streamed_chat,
)


def _wait_gone(pid: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_completion_and_streamed_chat_over_http(engine, bundled_model):
    cfg = ServerConfig(model=bundled_model, ctx=256, threads=2)
    with LlamaServer(engine, cfg) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        answer = complete(server.base_url, "The cat", n_predict=16)
        text = answer["choices"][0]["text"]
        assert answer["usage"]["completion_tokens"] > 0 and text.strip()
        chat, timings = streamed_chat(server.base_url, "Tell me something.", max_tokens=24)
        assert chat.strip()
        assert timings["predicted_n"] > 0 and timings["predicted_per_second"] > 0 and timings["prompt_per_second"] > 0
        pid = server.proc.pid
    assert _wait_gone(pid)


def test_port_in_use_is_refused_before_starting(engine, bundled_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(CcmoeError, match=f"port {port} on 127.0.0.1 is in use"):
            LlamaServer(engine, ServerConfig(model=bundled_model, port=port)).start()


def test_bad_model_says_why_and_leaves_no_process(engine, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 200)
    server = LlamaServer(engine, ServerConfig(model=bad, ctx=256))
    with pytest.raises(CcmoeError) as err:
        server.start(timeout=60)
    assert "ended while starting (exit 1)" in str(err.value) and "could not be loaded" in str(err.value)
    assert server.proc.poll() is not None


def test_api_key_is_enforced(engine, bundled_model):
    with LlamaServer(engine, ServerConfig(model=bundled_model, ctx=256, api_key="sekret")) as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            complete(server.base_url, "Hello", 4)
        assert err.value.code == 401
        assert complete(server.base_url, "Hello", 4, api_key="sekret")["choices"]


def test_dry_run_prints_a_loopback_command_line(engine):
    result = run_cli("serve", "--dry-run", "--port", "8123", check=True)
    args = result.stdout.split()
    assert args[0].endswith("llama-server")
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "8123"
    assert "ccmoe-mini-moe-f16.gguf" in result.stdout


def _start_cli_server(port: int) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "ccmoe_runtime.cli", "serve", "--device", "auto", "--port", str(port),
                             "--ctx", "256", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return proc, json.loads(line)


def test_serve_command_answers_then_stops_cleanly_on_sigterm(engine):
    port = free_port()
    proc, ready = _start_cli_server(port)
    try:
        assert ready["base_url"] == f"http://127.0.0.1:{port}/v1"
        assert ready["generation_tokens_per_s"] > 0 and ready["warmup_text"]
        with urllib.request.urlopen(ready["base_url"] + "/models", timeout=10) as r:
            assert json.loads(r.read())["data"]
        server_pid = ready["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _wait_gone(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_no_orphan_server_when_ccmoe_run_is_killed(engine):
    proc, ready = _start_cli_server(free_port())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert _wait_gone(ready["pid"]), "llama-server outlived a killed ccmoe-run"


def _serve_json(model, *extra: str) -> dict:
    """One `ccmoe-run serve --json --no-warmup` of `model`: its ready line, then SIGTERM (the server stops)."""
    proc = subprocess.Popen([sys.executable, "-m", "ccmoe_runtime.cli", "serve", "--model", str(model), "--device",
                             "auto", "--port", "0", "--ctx", "256", "--json", "--no-warmup", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(30)
            return {"returncode": proc.returncode, "stderr": proc.stderr.read()}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        return json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_a_second_start_takes_the_placement_from_the_start_cache(engine, bundled_model, tmp_path):
    """The first start places and stores; the second of the same model, engine, device and settings reuses it
    (no dry run); other settings or --no-start-cache place again; an entry whose server fails to start is dropped."""
    import shutil

    from ccmoe_runtime.core.artifacts import load_artifact, save_artifact
    from ccmoe_runtime.placement.startcache import START_KIND, START_VERSION, entry_path

    model = shutil.copy(bundled_model, tmp_path / "copy.gguf")        # a model the cache has not seen
    first = _serve_json(model)
    second = _serve_json(model)
    assert (first["start_cache"], second["start_cache"]) == ("stored", "hit")
    assert second["overrides"] == first["overrides"] and second["kv_type"] == first["kv_type"]
    assert second["predicted_memory_bytes"] == first["predicted_memory_bytes"]
    assert _serve_json(model, "--no-start-cache")["start_cache"] == "off"
    assert _serve_json(model, "--parallel", "2")["start_cache"] == "stored"       # other settings: another key
    entries = [p for p in entry_path("x").parent.glob("*.json")
               if load_artifact(p, START_KIND, START_VERSION)["placement"]["model"] == str(model)]
    assert len(entries) == 2
    doc = load_artifact(entries[0], START_KIND, START_VERSION)
    doc["placement"]["overrides"] = ["blk\\.0\\.=NO_SUCH_BUFFER"]                   # a placement that cannot start
    save_artifact(entries[0], START_KIND, START_VERSION, {k: v for k, v in doc.items() if k not in ("schema", "version")})
    failed = [r for r in (_serve_json(model), _serve_json(model, "--parallel", "2")) if "returncode" in r]
    assert len(failed) == 1 and failed[0]["returncode"] != 0 and "Traceback" not in failed[0]["stderr"]
    assert not entries[0].exists()
    os.utime(model)                                                               # the file changed: place again
    assert _serve_json(model)["start_cache"] == "stored"
