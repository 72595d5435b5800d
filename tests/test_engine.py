"""The engine: vendored source, cached builds keyed by commit + backend + flags, tools, bindings."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli

import ccmoe_runtime.engine.build as E
from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.core.vendor import PINNED_VERSION, ensure_vendor
from ccmoe_runtime.engine.selftest import inspect_engine


def test_vendored_source_comes_from_the_pinned_package():
    src = ensure_vendor()
    assert src.package_version == PINNED_VERSION
    assert src.commit.startswith("0c1e570")
    assert (src.path / "tools" / "server").is_dir() and (src.path / "gguf-py").is_dir()


def test_cache_key_depends_on_commit_backend_and_flags():
    cpu = E.engine_key("abc", "cpu", E.build_flags("cpu"))
    assert cpu == E.engine_key("abc", "cpu", E.build_flags("cpu"))
    assert cpu != E.engine_key("abd", "cpu", E.build_flags("cpu"))
    assert cpu != E.engine_key("abc", "cuda", E.build_flags("cuda"))
    assert cpu != E.engine_key("abc", "cpu", E.build_flags("cpu", ("-DGGML_AVX512=OFF",)))
    with pytest.raises(CcmoeError, match="unknown backend"):
        E.build_flags("opencl")


def test_second_build_reuses_the_cache(engine):
    manifest = engine.bin_dir.parent / "engine.json"
    before = manifest.stat().st_mtime_ns
    again = E.build_engine(engine.backend, cpu=engine.cpu_features)
    assert again.key == engine.key
    assert manifest.stat().st_mtime_ns == before   # nothing rebuilt or republished


def test_cached_engine_missing_a_tool_is_built_again(engine, tmp_path):
    assert E.reusable(engine.bin_dir.parent)
    older = tmp_path / engine.key                  # as an older version published it: without llama-fit-params
    shutil.copytree(engine.bin_dir.parent, older, symlinks=True)
    (older / "bin" / "llama-fit-params").unlink()
    assert not E.reusable(older)
    assert not E.reusable(tmp_path / "nothing-here")


def test_engine_has_every_tool_and_feature(engine):
    info = inspect_engine(engine)
    assert all(info.tools.values()), info.tools
    assert info.missing_features == {} and info.self_test.ok
    assert "version" in info.version


@pytest.mark.slow
def test_engine_info_cli_json(engine):
    result = run_cli("engine", "info", "--json", check=True)
    info = json.loads(result.stdout)
    assert info["key"] == engine.key and info["tools"]["llama-quantize"]


@pytest.mark.slow
def test_user_build_missing_a_tool_is_named(engine, tmp_path):
    partial = tmp_path / "old-build" / "bin"
    shutil.copytree(engine.bin_dir, partial, symlinks=True)
    (partial / "llama-imatrix").unlink()
    user = E.user_engine(tmp_path / "old-build")
    assert user.origin == "user" and user.bin_dir == partial.resolve()
    with pytest.raises(CcmoeError, match="llama-imatrix"):
        E.require_features(user)
    result = run_cli("engine", "info", "--llama-cpp-dir", str(tmp_path / "old-build"))
    assert result.returncode == 3 and "llama-imatrix" in result.stdout


def test_not_a_build_folder_is_a_clear_error(tmp_path):
    result = run_cli("engine", "info", "--llama-cpp-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no llama.cpp tools found" in result.stderr


def test_bindings_load_the_engine_libraries(bindings, engine):
    lib = bindings.llama_cpp._lib._name
    assert str(engine.bin_dir) in lib
    assert b"CPU" in bindings.llama_print_system_info()
