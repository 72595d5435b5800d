"""A llama.cpp tool that dies by a signal is named by that signal everywhere a tool runs (run_tool, llama-quantize,
llama-server), and the engine's CPU-feature fallback decides on self-tests recorded on this project's Intel host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ccmoe_runtime.core.errors import EXIT_ENGINE, EXIT_RESOURCE, EXIT_SERVER, CcmoeError
from ccmoe_runtime.engine.build import Engine
from ccmoe_runtime.engine.selftest import self_test_from_dict, verdict
from ccmoe_runtime.engine.server import LlamaServer, ServerConfig
from ccmoe_runtime.engine.tools import quantize, run_tool

DATA = Path(__file__).parent / "data"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-imatrix", "llama-server")


def recorded(name: str):
    return self_test_from_dict(json.loads((DATA / f"selftest-xeon-amx-{name}.json").read_text())["self_test"])


def test_the_native_build_on_the_amx_host_moves_to_the_next_feature_set():
    # why: recorded on the 2-core Xeon advertising AMX: SIGILL (tileloadd) and SIGABRT (GGML_ASSERT) under native
    native = recorded("native")
    assert verdict(native) == "next"
    signals = {c.signal for c in native.failures}
    assert {"SIGILL", "SIGABRT"} <= signals
    assert "GGML_ASSERT(*cur_backend_id != -1)" in native.reason()
    assert all(c.ok for c in native.checks if c.model.endswith("f16") and c.tool == "llama-perplexity")


def test_the_no_amx_build_on_the_same_host_is_used():
    no_amx = recorded("native-no-amx")
    assert no_amx.ok and verdict(no_amx) == "use"
    assert len(no_amx.checks) == len(recorded("native").checks)


def test_a_failure_without_a_signal_stops_the_fallback():
    # why: a tool that exits 1 fails on every feature set; rebuilding would only waste minutes
    failed = recorded("native-no-amx")
    failed.ok = False
    failed.checks[0].ok, failed.checks[0].detail = False, "exit 1"
    assert verdict(failed) == "fail"


@pytest.fixture()
def dying_engine(tmp_path, request) -> Engine:
    """An engine folder whose tools are scripts that kill themselves with the signal named by the test."""
    sig = request.param
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho 'loading model'\nkill -{sig} $$\n")
        script.chmod(0o755)
    return Engine(bin_dir=bin_dir, backend="cpu", origin="user")


@pytest.mark.parametrize("dying_engine, name, meaning", [
    ("ILL", "SIGILL", "CPU instruction"), ("SEGV", "SIGSEGV", "invalid memory access"),
    ("BUS", "SIGBUS", "bad memory access"), ("ABRT", "SIGABRT", "aborted"),
], indirect=["dying_engine"])
def test_run_tool_names_the_signal(dying_engine, name, meaning):
    with pytest.raises(CcmoeError) as e:
        run_tool(dying_engine, "llama-perplexity", ["-m", "x.gguf"], "x.gguf")
    assert f"killed by {name}" in e.value.one_line() and meaning in e.value.one_line()
    assert "engine info" in e.value.one_line()
    assert e.value.exit_code == EXIT_ENGINE


@pytest.mark.parametrize("dying_engine", ["SEGV"], indirect=True)
def test_llama_quantize_killed_by_a_signal_is_named_and_leaves_nothing(dying_engine, tmp_path):
    out = tmp_path / "out" / "q.gguf"
    out.parent.mkdir()
    with pytest.raises(CcmoeError) as e:
        quantize(dying_engine, tmp_path / "in.gguf", out, "Q4_K", ["ffn=q8_0"])
    assert "killed by SIGSEGV" in e.value.one_line() and e.value.exit_code == EXIT_ENGINE
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("dying_engine", ["XFSZ"], indirect=True)
def test_llama_quantize_past_the_file_size_limit_is_a_full_disk(dying_engine, tmp_path):
    # why: SIGXFSZ is the kernel refusing a bigger file: exit 4 (no room), not an engine failure
    out = tmp_path / "out" / "q.gguf"
    out.parent.mkdir()
    with pytest.raises(CcmoeError) as e:
        quantize(dying_engine, tmp_path / "in.gguf", out, "Q4_K", [])
    assert e.value.exit_code == EXIT_RESOURCE and "file size limit" in e.value.one_line()
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("dying_engine", ["SEGV"], indirect=True)
def test_llama_server_killed_while_starting_is_named(dying_engine, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    server = LlamaServer(dying_engine, ServerConfig(model=model), log_path=tmp_path / "server.log")
    with pytest.raises(CcmoeError) as e:
        server.start(timeout=30)
    assert "killed by SIGSEGV" in e.value.one_line() and e.value.exit_code == EXIT_SERVER
    assert not server.alive()
