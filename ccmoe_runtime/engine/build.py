"""The llama.cpp engine: vendored source from the pinned llama-cpp-python, cached builds, tool lookup."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import EXIT_ENGINE, CcmoeError
from ..core.paths import cache_root
from ..core.vendor import PINNED_PACKAGE, PINNED_VERSION, ensure_vendor

ENGINE_ENV = "CCMOE_LLAMA_CPP_DIR"
BACKENDS = ("cpu", "cuda", "metal", "vulkan", "hip")

# Tools the pipeline runs; `llama` is the shared library the Python bindings load.
TOOLS = ("llama-server", "llama-quantize", "llama-imatrix", "llama-bench", "llama-perplexity", "ggml-rpc-server")
# Built and used when present: llama-fit-params --fit-print is llama.cpp's own dry-run memory estimate (placement).
OPTIONAL_TOOLS = ("llama-fit-params",)
BUILD_TARGETS = (*TOOLS, *OPTIONAL_TOOLS, "llama")

# Options each tool must offer for ccmoe-run to work (checked against `--help`).
REQUIRED_FEATURES = {
    "llama-quantize": ("--tensor-type-file", "--imatrix", "--override-kv", "--dry-run"),
    "llama-server": ("--override-tensor", "--n-gpu-layers", "--flash-attn"),
    "llama-imatrix": ("--output-frequency",),
    "llama-perplexity": ("--kl-divergence",),
    "llama-bench": ("-ot",),
}

COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",  # bin/ holds tools and libraries and can be copied as a whole
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI at build time
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_RPC=ON",
    "-DGGML_CCACHE=OFF",
)
# CPU feature sets, best first. `native` is -march=native; AMX hosts whose hypervisor advertises AMX but traps
# its instructions (SIGILL at tileloadd) need `native-no-amx`: GCC's explicit -mno-* flags win over -march=native.
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CPU_FEATURE_SETS = {
    "native": ("-DGGML_NATIVE=ON",),
    "native-no-amx": ("-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}"),
    "avx2": ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON"),
    "portable": ("-DGGML_NATIVE=OFF", "-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF",
                 "-DGGML_BMI2=OFF"),
}
BACKEND_FLAGS = {
    "cpu": (),
    "cuda": ("-DGGML_CUDA=ON",),
    "metal": ("-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"),
    "vulkan": ("-DGGML_VULKAN=ON",),
    "hip": ("-DGGML_HIP=ON",),
}


@dataclass
class Engine:
    """A directory of built llama.cpp tools and libraries."""

    bin_dir: Path
    backend: str
    key: str = ""
    commit: str = "unknown"
    flags: list[str] = field(default_factory=list)
    origin: str = "cache"  # "cache" (built by ccmoe-run) or "user" (an existing build)
    build_seconds: float | None = None
    cpu_features: str = "native"
    cpu_features_reason: str = ""
    self_test_ok: bool | None = None   # None: not run yet

    def tool(self, name: str) -> Path:
        """Path of a tool binary, or a clear error if this engine lacks it."""
        path = self.bin_dir / name
        if not path.is_file():
            raise CcmoeError(f"the engine at {self.bin_dir} has no {name}",
                             "run `ccmoe-run engine build` or point --llama-cpp-dir at a build that has it",
                             EXIT_ENGINE)
        return path

    def has_tool(self, name: str) -> bool:
        return (self.bin_dir / name).is_file()

    def library_dir(self) -> Path:
        """Directory holding libllama and libggml*, for LLAMA_CPP_LIB_PATH and ctypes."""
        return self.bin_dir


# ---------------------------------------------------------------- builds

def default_backend() -> str:
    """The backend this host most likely wants."""
    if platform.system() == "Darwin":
        return "metal"
    if shutil.which("nvidia-smi"):
        return "cuda"
    return "cpu"


def build_flags(backend: str, extra: tuple[str, ...] = (), cpu: str = "native") -> list[str]:
    """CMake flags for `backend` with the CPU feature set `cpu` (see CPU_FEATURE_SETS)."""
    if backend not in BACKENDS:
        raise CcmoeError(f"unknown backend {backend!r}", f"choose one of: {', '.join(BACKENDS)}")
    if cpu not in CPU_FEATURE_SETS:
        raise CcmoeError(f"unknown CPU feature set {cpu!r}", f"choose one of: {', '.join(CPU_FEATURE_SETS)}")
    return [*COMMON_FLAGS, *CPU_FEATURE_SETS[cpu], *BACKEND_FLAGS[backend], *extra]


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _host_signature() -> str:
    """CPU model and features: a native (-march=native) build only runs where it was built."""
    parts = [platform.system(), platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                parts.append(line.split(":", 1)[1].strip())
                if line.startswith("flags"):
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def engine_key(commit: str, backend: str, flags: list[str]) -> str:
    """Cache key: llama.cpp commit + backend + a hash of the flags (and of the CPU for native builds)."""
    text = "\n".join(flags)
    if "-DGGML_NATIVE=ON" in flags:
        text += "\n" + _host_signature()
    return f"{commit}-{backend}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _run_logged(cmd: list[str], log_path: Path, env: dict[str, str], progress) -> None:
    """Run a build step, appending its output to log_path and echoing progress lines."""
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if progress and re.match(r"^\[\s*\d+/\d+\]|^\[\s*\d+%\]", line):
                progress(line.rstrip())
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text().splitlines()[-3:]
        raise CcmoeError(f"engine build step failed: {' '.join(cmd[:3])} ... ({' | '.join(tail)})",
                         f"see the full log at {log_path}", EXIT_ENGINE)


def cpu_fallbacks(flags: set[str] | None = None, machine: str | None = None) -> list[str]:
    """CPU feature sets to try, best first: native, then native without AMX where the CPU advertises AMX, then
    AVX2 where it has it, then a portable build."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return ["native", "portable"]
    chain = ["native"]
    if "amx_tile" in flags:
        chain.append("native-no-amx")
    if "avx2" in flags:
        chain.append("avx2")
    return [*chain, "portable"]


def build_engine(backend: str | None = None, jobs: int | None = None, extra_flags: tuple[str, ...] = (),
                 progress=None, cpu: str = "native", reason: str = "") -> Engine:
    """Build the tools for `backend` with the CPU feature set `cpu` into the cache, or return the cached build with
    the same key (`reason`: why a better feature set was not used, recorded in engine.json)."""
    backend = backend or default_backend()
    flags = build_flags(backend, extra_flags, cpu)
    source = ensure_vendor()
    key = engine_key(source.commit, backend, flags)
    published = cache_root() / "engines" / key
    if reusable(published):
        return load_engine_dir(published)
    if not shutil.which("cmake"):
        raise CcmoeError("cmake is not installed", "install cmake (and a C++ compiler) to build the engine", EXIT_ENGINE)
    build_dir = cache_root() / "build" / key
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = _build_lock(build_dir.with_suffix(".lock"))  # another set-up building the same key: wait for it
    try:
        if reusable(published):
            return load_engine_dir(published)
        started = time.monotonic()
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(source.path.parent)}
        log_path = build_dir.with_suffix(".log")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run_logged(["cmake", "-S", str(source.path), "-B", str(build_dir), *generator, *flags], log_path, env, progress)
        jobs = jobs or os.cpu_count() or 2
        _run_logged(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *BUILD_TARGETS],
                    log_path, env, progress)
        engine = _publish(build_dir / "bin", published, backend, key, source.commit, flags,
                          time.monotonic() - started, cpu, reason)
        return engine
    finally:
        os.close(lock)


def _build_lock(path: Path) -> int:
    """An fd holding an exclusive lock on `path`, waiting for another holder; a planted link is not followed."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise CcmoeError(f"cannot open the build lock {path} ({e.strerror})",
                         "remove it if it is a symbolic link, or check the cache folder's permissions", EXIT_ENGINE) from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def reusable(published: Path) -> bool:
    """A cached engine with every tool this version builds: one published by an older version that built fewer
    tools (the key does not name them) is built again, incrementally where its build folder is still there."""
    return (published / "engine.json").is_file() and all((published / "bin" / t).is_file()
                                                          for t in TOOLS + OPTIONAL_TOOLS)


def _publish(bin_dir: Path, published: Path, backend: str, key: str, commit: str, flags: list[str],
             seconds: float, cpu: str = "native", reason: str = "") -> Engine:
    """Copy the built tools and libraries into the engine cache and write its manifest."""
    published.parent.mkdir(parents=True, exist_ok=True)
    for stale in published.parent.glob(f".{published.name}.*.part"):   # a killed build's (the build lock is held)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{published.name}.", suffix=".part", dir=published.parent))  # no planted link
    os.chmod(tmp, 0o755)
    (tmp / "bin").mkdir()
    for item in bin_dir.iterdir():
        if item.is_file() and (item.name in TOOLS + OPTIONAL_TOOLS or ".so" in item.name or item.suffix == ".dylib"):
            shutil.copy2(item, tmp / "bin" / item.name, follow_symlinks=False)
    manifest = {"backend": backend, "key": key, "commit": commit, "flags": flags,
                "package": f"{PINNED_PACKAGE}=={PINNED_VERSION}", "build_seconds": round(seconds, 1),
                "cpu_features": cpu, "cpu_features_reason": reason,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "engine.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if published.is_symlink():
        published.unlink()
    shutil.rmtree(published, ignore_errors=True)
    os.replace(tmp, published)
    return load_engine_dir(published)


def load_engine_dir(path: Path) -> Engine:
    """An engine published in the cache (a folder with engine.json and bin/)."""
    info = json.loads((path / "engine.json").read_text())
    test = info.get("self_test") or {}
    return Engine(bin_dir=path / "bin", backend=info["backend"], key=info["key"], commit=info["commit"],
                  flags=info["flags"], origin="cache", build_seconds=info.get("build_seconds"),
                  cpu_features=info.get("cpu_features", "native"), cpu_features_reason=info.get("cpu_features_reason", ""),
                  self_test_ok=test.get("ok"))


def cached_engines() -> list[Engine]:
    root = cache_root() / "engines"
    if not root.is_dir():
        return []
    return [load_engine_dir(p) for p in sorted(root.iterdir()) if (p / "engine.json").is_file()]


def user_engine(path: Path) -> Engine:
    """An existing llama.cpp build given by the user: its folder, or its bin/ folder."""
    path = Path(path).expanduser()
    for candidate in (path, path / "bin", path / "build" / "bin"):
        if (candidate / "llama-server").is_file() or (candidate / "llama-quantize").is_file():
            return Engine(bin_dir=candidate.resolve(), backend=_guess_backend(candidate), origin="user")
    raise CcmoeError(f"no llama.cpp tools found in {path}",
                     "point --llama-cpp-dir (or CCMOE_LLAMA_CPP_DIR) at a llama.cpp build folder containing bin/llama-server")


def _guess_backend(bin_dir: Path) -> str:
    names = " ".join(p.name for p in bin_dir.iterdir())
    for backend, marker in (("cuda", "ggml-cuda"), ("hip", "ggml-hip"), ("vulkan", "ggml-vulkan"), ("metal", "ggml-metal")):
        if marker in names:
            return backend
    return "cpu"


def find_engine(backend: str | None = None, llama_cpp_dir: str | Path | None = None) -> Engine:
    """The engine to use: an explicit build, else the cached build for `backend` (any if None)."""
    chosen = llama_cpp_dir or os.environ.get(ENGINE_ENV)
    if chosen:
        return user_engine(Path(chosen))
    engines = [e for e in cached_engines() if e.self_test_ok is not False]
    if backend:
        engines = [e for e in engines if e.backend == backend]
    if not engines:
        want = f" --backend {backend}" if backend else ""
        raise CcmoeError(f"no llama.cpp engine{' for ' + backend if backend else ''} is built yet",
                         f"run `ccmoe-run engine build{want}` (or set {ENGINE_ENV} to an existing build)",
                         EXIT_ENGINE)
    preferred = [e for e in engines if e.backend == default_backend()]
    return max(preferred or engines, key=lambda e: (e.bin_dir / "llama-server").stat().st_mtime
               if (e.bin_dir / "llama-server").exists() else 0)


# ---------------------------------------------------------------- checks and bindings

def tool_version(engine: Engine) -> str:
    """What llama-server says of its version and build."""
    try:
        out = subprocess.run([str(engine.tool("llama-server")), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CcmoeError(f"llama-server in {engine.bin_dir} does not run ({e})",
                         "rebuild it with `ccmoe-run engine build`", EXIT_ENGINE) from None
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip().startswith(("version", "built"))]
    return "; ".join(lines) or "unknown"


def check_features(engine: Engine) -> dict[str, list[str]]:
    """For each tool, the required options its --help does not mention (empty lists when all is there)."""
    missing: dict[str, list[str]] = {}
    for tool, options in REQUIRED_FEATURES.items():
        if not engine.has_tool(tool):
            missing[tool] = ["(tool missing)"]
            continue
        out = subprocess.run([str(engine.bin_dir / tool), "--help"], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        missing[tool] = [opt for opt in options if opt not in text]
    return missing


def require_features(engine: Engine) -> None:
    """Fail with one line naming what an engine lacks."""
    gaps = {t: m for t, m in check_features(engine).items() if m}
    if gaps:
        what = "; ".join(f"{t}: {', '.join(m)}" for t, m in gaps.items())
        raise CcmoeError(f"the llama.cpp build at {engine.bin_dir} lacks features ccmoe-run needs ({what})",
                         f"use a newer llama.cpp or run `ccmoe-run engine build` (pinned {PINNED_PACKAGE} {PINNED_VERSION})",
                         EXIT_ENGINE)


def load_bindings(engine: Engine):
    """Import llama_cpp so that it loads this engine's libllama (one compile for tools and bindings)."""
    already = sys.modules.get("llama_cpp")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(engine.library_dir())
    if already is not None:
        return already
    import llama_cpp  # noqa: PLC0415 - must come after LLAMA_CPP_LIB_PATH is set

    return llama_cpp
