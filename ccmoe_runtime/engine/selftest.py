"""The engine proves itself: every tool the pipeline runs, on small generated models of the types it must run.

A build that compiles can still die on this host: on VMs that advertise AMX, a `-march=native` build traps in
ggml's AMX kernels (SIGILL) on every quantized model and runs F16 fine. `--help` shows nothing of that, so the
self-test runs real work: llama-bench on F16, Q8_0, Q4_K and IQ4_XS models of both architectures the project
generates, llama-perplexity, llama-imatrix, llama-quantize, llama-server answering one request, and the Python
bindings in a child process (a crash there would take the caller with it). `ensure_engine` builds, self-tests
and falls back to the next CPU feature set when a tool dies by a signal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import EXIT_ENGINE, CcmoeError
from ..core.files import temp_beside
from ..model.synth import SynthSpec, write_random_gguf
from .build import (
    TOOLS,
    Engine,
    build_engine,
    check_features,
    cpu_fallbacks,
    tool_version,
)
from .server import LlamaServer, ServerConfig, complete
from .tools import describe_exit, signal_name, telling_line

SELF_TEST_VERSION = 1
SELF_TEST_TYPES = ("f16", "q8_0", "q4_k", "iq4_xs")
TOOL_TIMEOUT_S = 120


@dataclass
class Check:
    """One tool run of the self-test."""

    tool: str
    model: str
    ok: bool
    detail: str = ""
    signal: str | None = None    # the signal's name when the tool died by one


@dataclass
class SelfTest:
    """What the self-test ran and whether every run ended well."""

    ok: bool
    seconds: float
    checks: list[Check] = field(default_factory=list)
    version: int = SELF_TEST_VERSION

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def reason(self) -> str:
        """The first failure in words, for engine.json and error messages."""
        if self.ok:
            return ""
        c = self.failures[0]
        return f"{c.tool} on {c.model}: {c.detail}"

    def to_dict(self) -> dict:
        return {**asdict(self), "reason": self.reason()}


def _models(folder: Path) -> dict[str, Path]:
    """Small deepseek2 and qwen3moe models in every self-test type (k-quants need rows of 256)."""

    specs = {"deepseek2": SynthSpec(arch="deepseek2", n_layer=2, n_dense_lead=1, n_expert=8, n_expert_used=2,
                                    n_embd=256, n_ff=256, n_ff_exp=256, seed=7),
             "qwen3moe": SynthSpec(arch="qwen3moe", n_layer=2, n_expert=8, n_expert_used=2, n_embd=256,
                                   n_ff_exp=256, seed=8)}
    out = {}
    for arch, spec in specs.items():
        for qtype in SELF_TEST_TYPES:
            out[f"{arch}-{qtype}"] = write_random_gguf(spec, folder / f"{arch}-{qtype}.gguf", qtype=qtype)
    return out


def _run(tool: str, model: str, cmd: list[str], env: dict | None = None) -> Check:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=TOOL_TIMEOUT_S,
                             env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return Check(tool, model, False, f"did not finish in {TOOL_TIMEOUT_S} s")
    except OSError as e:
        return Check(tool, model, False, f"could not start ({e})")
    if res.returncode == 0:
        return Check(tool, model, True)
    why = telling_line(res.stderr + res.stdout)
    return Check(tool, model, False, describe_exit(res.returncode) + (f" ({why[:160]})" if why else ""),
                 signal_name(res.returncode))


def _text(folder: Path) -> Path:
    """Enough bytes for two 64-token chunks of a byte-level vocabulary."""
    path = folder / "text.txt"
    path.write_text(("The quick brown fox jumps over the lazy dog while the experts sleep in slow memory. " * 40))
    return path


_BINDINGS_CHILD = r"""
import os, sys
os.environ["LLAMA_CPP_LIB_PATH"] = sys.argv[1]
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=64, n_threads=2, verbose=False)
llm.eval([1, 65, 66, 67, 68, 69, 70, 71])
print(len(llm.scores))
"""


def _server(engine, model: Path, folder: Path) -> Check:
    """llama-server answers one completion on the model (CPU only, a free port)."""
    cfg = ServerConfig(model=model, host="127.0.0.1", port=0, ctx=128, parallel=1, threads=2,
                       extra_args=["-ngl", "0"])
    server = LlamaServer(engine, cfg, log_path=folder / "llama-server.log")
    try:
        server.start(timeout=TOOL_TIMEOUT_S)
        complete(server.base_url, "Hello", 4)
        return Check("llama-server", model.stem, True)
    except Exception as e:   # noqa: BLE001 - a self-test reports every failure as a failed check
        code = server.proc.poll() if server.proc else None
        if code is not None:
            return Check("llama-server", model.stem, False, describe_exit(code), signal_name(code))
        return Check("llama-server", model.stem, False, " ".join(str(e).split())[:200])
    finally:
        server.stop()


def run_self_test(engine, progress=None) -> SelfTest:
    """Run every check against `engine` in a temporary folder; never raises for a failing or missing tool."""
    started = time.monotonic()
    checks: list[Check] = []
    missing = [t for t in ("llama-bench", "llama-perplexity", "llama-imatrix", "llama-quantize", "llama-server")
               if not engine.has_tool(t)]
    checks += [Check(t, "-", False, "the tool is missing from the engine") for t in missing]

    def run(tool: str, model: str, args: list[str]) -> None:
        if tool not in missing:
            checks.append(_run(tool, model, [str(engine.bin_dir / tool), *args]))
            if progress:
                progress(checks[-1])

    # the engine's CPU buffers (repacking, AMX) stay on: they are what traps on the hosts this test is for
    with tempfile.TemporaryDirectory(prefix="ccmoe-selftest-") as tmp:
        folder = Path(tmp)
        models = _models(folder)
        text = _text(folder)
        for name, path in models.items():
            run("llama-bench", name, ["-m", str(path), "-p", "16", "-n", "4", "-r", "1", "-t", "2", "-ngl", "0",
                                      "-o", "json"])
        for name in ("deepseek2-q8_0", "qwen3moe-q4_k"):
            run("llama-perplexity", name, ["-m", str(models[name]), "-f", str(text), "-c", "64", "--chunks", "2",
                                           "-t", "2", "-ngl", "0"])
        run("llama-imatrix", "deepseek2-f16", ["-m", str(models["deepseek2-f16"]), "-f", str(text), "-c", "64",
                                               "--chunks", "1", "-t", "2", "-ngl", "0",
                                               "-o", str(folder / "imatrix.gguf")])
        run("llama-quantize", "deepseek2-f16", [str(models["deepseek2-f16"]), str(folder / "q.gguf"), "Q4_K_M", "2"])
        if "llama-server" not in missing:
            checks.append(_server(engine, models["qwen3moe-q4_k"], folder))
        checks.append(_run("bindings", "deepseek2-q8_0", [sys.executable, "-c", _BINDINGS_CHILD,
                                                          str(engine.library_dir()), str(models["deepseek2-q8_0"])]))
    return SelfTest(all(c.ok for c in checks), round(time.monotonic() - started, 1), checks)


@dataclass
class EngineInfo:
    """`engine info`: which build, its tools and version, what it lacks, and a fresh self-test."""

    engine: Engine
    version: str
    tools: dict[str, bool]
    missing_features: dict[str, list[str]]
    self_test: SelfTest

    @property
    def ok(self) -> bool:
        return not self.missing_features and self.self_test.ok

    def to_dict(self) -> dict:
        return {**asdict(self.engine), "bin_dir": str(self.engine.bin_dir), "version": self.version,
                "tools": self.tools, "missing_features": self.missing_features, "self_test": self.self_test.to_dict()}

    def summary_lines(self) -> list[str]:
        e = self.engine
        lines = [f"engine   {e.key or '(user build)'}  backend={e.backend}  origin={e.origin}",
                 f"path     {e.bin_dir}",
                 f"version  {self.version} (llama.cpp commit {e.commit})",
                 f"cpu      {e.cpu_features}" + (f" ({e.cpu_features_reason})" if e.cpu_features_reason else "")]
        lines += [f"  {'ok ' if have else 'MISSING'} {tool}" for tool, have in self.tools.items()]
        lines += [f"  {tool} lacks: {', '.join(m)}" for tool, m in self.missing_features.items()]
        t = self.self_test
        lines.append(f"self-test {'passed' if t.ok else 'FAILED'}: {len(t.checks)} runs in {t.seconds} s")
        lines += [f"  FAILED {c.tool} on {c.model}: {c.detail}" for c in t.failures]
        return lines


def inspect_engine(engine: Engine) -> EngineInfo:
    """Everything `engine info` shows, the self-test run afresh (and recorded for a cached engine)."""
    test = run_self_test(engine)
    save_self_test(engine, test)
    tools = {t: engine.has_tool(t) for t in TOOLS}
    version = tool_version(engine) if engine.has_tool("llama-server") else "unknown (no llama-server)"
    return EngineInfo(engine, version, tools, {t: m for t, m in check_features(engine).items() if m}, test)


def cached_self_test(engine) -> SelfTest | None:
    """The self-test recorded in a cached engine's manifest by this version of the test, if any."""
    manifest = engine.bin_dir.parent / "engine.json"
    if engine.origin != "cache" or not manifest.is_file():
        return None
    doc = json.loads(manifest.read_text()).get("self_test")
    if not doc or doc.get("version") != SELF_TEST_VERSION:
        return None
    return self_test_from_dict(doc)


def save_self_test(engine, result: SelfTest, reason: str | None = None) -> None:
    """Record the result in the engine's manifest (cached engines only), so find_engine skips a failed build;
    `reason` says why a better CPU feature set was not used."""
    manifest = engine.bin_dir.parent / "engine.json"
    if engine.origin != "cache" or not manifest.is_file():
        return
    info = json.loads(manifest.read_text())
    info["self_test"] = result.to_dict()
    engine.self_test_ok = result.ok
    if reason is not None:
        info["cpu_features_reason"] = engine.cpu_features_reason = reason
    tmp = temp_beside(manifest)              # exclusive, random name; no lock: concurrent test runs share the cache
    try:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, manifest)
    finally:
        tmp.unlink(missing_ok=True)


def verdict(result: SelfTest) -> str:
    """What a self-test means for its build: `use` it, try the `next` CPU feature set (a tool died by a signal:
    an instruction this host refuses, a crash in a CPU kernel), or `fail` (a tool failed without a signal, which
    another feature set would not change)."""
    if result.ok:
        return "use"
    return "next" if any(c.signal for c in result.failures) else "fail"


def self_test_from_dict(doc: dict) -> SelfTest:
    """A SelfTest from its saved form (engine.json's self_test)."""
    return SelfTest(doc["ok"], doc["seconds"], [Check(**c) for c in doc["checks"]])


def ensure_engine(backend: str | None = None, jobs: int | None = None, extra_flags: tuple[str, ...] = (),
                  progress=None, cpu: str | None = None, say=None) -> Engine:
    """A cached engine for `backend` that passed its self-test: build the best CPU feature set first and, when a
    tool dies by a signal on this host (an instruction it refuses, a crash in a CPU kernel), the next one."""
    tried: list[str] = []
    for features in [cpu] if cpu else cpu_fallbacks():
        engine = build_engine(backend, jobs, extra_flags, progress, cpu=features, reason="; ".join(tried))
        result = cached_self_test(engine)
        if result is None:
            if say:
                say(f"self-test of engine {engine.key} ({features}) ...")
            result = run_self_test(engine)
            save_self_test(engine, result)
        step = verdict(result)
        if step == "use":
            if tried and engine.cpu_features_reason != "; ".join(tried):
                save_self_test(engine, result, "; ".join(tried))
            return engine
        if step == "fail":
            raise CcmoeError(f"the engine {engine.key} failed its self-test ({result.reason()})",
                             "see `ccmoe-run engine info` for every check", EXIT_ENGINE)
        tried.append(f"{features}: {result.reason()}")
        if say:
            say(f"engine {engine.key} ({features}) fails here: {result.reason()}; trying the next CPU feature set")
    raise CcmoeError(f"no build of the engine runs on this host ({'; '.join(tried)})",
                     "report this CPU (/proc/cpuinfo) or point --llama-cpp-dir at a llama.cpp build that works here",
                     EXIT_ENGINE)
