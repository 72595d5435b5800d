"""The engine proves itself: every tool the pipeline runs, on small generated models of the types it must run.

A build that compiles can still die on this host: on VMs that advertise AMX, a `-march=native` build traps in
ggml's AMX kernels (SIGILL) on every quantized model and runs F16 fine. `--help` shows nothing of that, so the
self-test runs real work: llama-bench on F16, Q8_0, Q4_K and IQ4_XS models of both architectures the project
generates, llama-perplexity, llama-imatrix, llama-quantize, llama-server answering one request, and the Python
bindings in a child process (a crash there would take the caller with it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    from .synth import SynthSpec, write_random_gguf

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
    from .engine import describe_exit, signal_name

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


_TELLING = ("GGML_ASSERT", "error", "failed", "illegal", "abort")
_NOISE = ("libthread_db", "Inferior", "__GI_", "in ?? ()", "[New LWP", "Thread debugging")


def telling_line(output: str) -> str:
    """The line of a dead tool's output that says most: an assertion or error line, else the last plain line."""
    lines = [ln.strip() for ln in output.splitlines()
             if ln.strip() and not any(n in ln for n in _NOISE) and not re.match(r"\s*#\d+\s", ln)]
    for ln in reversed(lines):
        if any(t.lower() in ln.lower() for t in _TELLING):
            return ln
    return lines[-1] if lines else ""


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
    from .serve import LlamaServer, ServerConfig, complete

    cfg = ServerConfig(model=model, host="127.0.0.1", port=0, ctx=128, parallel=1, threads=2,
                       extra_args=["-ngl", "0"])
    server = LlamaServer(engine, cfg, log_path=folder / "llama-server.log")
    try:
        server.start(timeout=TOOL_TIMEOUT_S)
        complete(server.base_url, "Hello", 4)
        return Check("llama-server", model.stem, True)
    except Exception as e:   # noqa: BLE001 - a self-test reports every failure as a failed check
        code = server.proc.poll() if server.proc else None
        from .engine import describe_exit, signal_name

        if code is not None:
            return Check("llama-server", model.stem, False, describe_exit(code), signal_name(code))
        return Check("llama-server", model.stem, False, " ".join(str(e).split())[:200])
    finally:
        server.stop()


def run_self_test(engine, progress=None) -> SelfTest:
    """Run every check against `engine` in a temporary folder; never raises for a failing tool."""
    started = time.monotonic()
    checks: list[Check] = []
    # the engine's CPU buffers (repacking, AMX) stay on: they are what traps on the hosts this test is for
    with tempfile.TemporaryDirectory(prefix="ccmoe-selftest-") as tmp:
        folder = Path(tmp)
        models = _models(folder)
        text = _text(folder)
        bench = str(engine.tool("llama-bench"))
        for name, path in models.items():
            checks.append(_run("llama-bench", name, [bench, "-m", str(path), "-p", "16", "-n", "4", "-r", "1",
                                                     "-t", "2", "-ngl", "0", "-o", "json"]))
            if progress:
                progress(checks[-1])
        for name in ("deepseek2-q8_0", "qwen3moe-q4_k"):
            checks.append(_run("llama-perplexity", name, [str(engine.tool("llama-perplexity")), "-m",
                                                          str(models[name]), "-f", str(text), "-c", "64",
                                                          "--chunks", "2", "-t", "2", "-ngl", "0"]))
        checks.append(_run("llama-imatrix", "deepseek2-f16", [
            str(engine.tool("llama-imatrix")), "-m", str(models["deepseek2-f16"]), "-f", str(text), "-c", "64",
            "--chunks", "1", "-t", "2", "-ngl", "0", "-o", str(folder / "imatrix.gguf")]))
        checks.append(_run("llama-quantize", "deepseek2-f16", [
            str(engine.tool("llama-quantize")), str(models["deepseek2-f16"]), str(folder / "q.gguf"), "Q4_K_M", "2"]))
        checks.append(_server(engine, models["qwen3moe-q4_k"], folder))
        checks.append(_run("bindings", "deepseek2-q8_0", [sys.executable, "-c", _BINDINGS_CHILD,
                                                          str(engine.library_dir()), str(models["deepseek2-q8_0"])]))
    return SelfTest(all(c.ok for c in checks), round(time.monotonic() - started, 1), checks)


def cached_self_test(engine) -> SelfTest | None:
    """The self-test recorded in a cached engine's manifest by this version of the test, if any."""
    manifest = engine.bin_dir.parent / "engine.json"
    if engine.origin != "cache" or not manifest.is_file():
        return None
    doc = json.loads(manifest.read_text()).get("self_test")
    if not doc or doc.get("version") != SELF_TEST_VERSION:
        return None
    return SelfTest(doc["ok"], doc["seconds"], [Check(**c) for c in doc["checks"]])


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
    tmp = manifest.with_name(".engine.json.part")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, manifest)
