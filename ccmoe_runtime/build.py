"""Build: llama-quantize with a plan's per-tensor types, the imatrix and metadata overrides; then verify."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from .artifacts import file_digest, save_artifact
from .engine import Engine
from .errors import EXIT_ENGINE, EXIT_RESOURCE, CcmoeError

BUILD_VERSION = 1
BASE_TYPE = "Q8_0"               # per-tensor types apply only over a quantized base; every tensor is planned anyway
DISK_MARGIN = 1.02      # free space wanted: the planned size plus 2 %
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def quantize(engine: Engine, model: Path, out: Path, base_type: str, type_lines: list[str],
             imatrix: Path | None = None, overrides: list[str] = (), threads: int | None = None,
             progress: Callable[[int, int], None] | None = None, flags: tuple[str, ...] = ()) -> Path:
    """Run llama-quantize into a temporary file beside `out` and rename it on success (nothing left on failure).
    `flags`: more llama-quantize options (`--pure`, `--allow-requantize`)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.part")
    types_file = out.with_name(f".{out.name}.types")
    cmd = [str(engine.tool("llama-quantize"))]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    if type_lines:
        types_file.write_text("\n".join(type_lines) + "\n")
        cmd += ["--tensor-type-file", str(types_file)]
    for kv in overrides:
        cmd += ["--override-kv", kv]
    cmd += [*flags, str(model), str(tmp), base_type] + ([str(threads)] if threads else [])
    tail: collections.deque[str] = collections.deque(maxlen=8)
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            try:
                for line in proc.stdout:
                    tail.append(line.rstrip())
                    m = _PROGRESS.match(line)
                    if m and progress:
                        progress(int(m.group(1)), int(m.group(2)))
            except BaseException:          # Ctrl-C or SIGTERM: stop the child before its file is removed
                proc.kill()
                raise
        if proc.returncode:
            reason = next((x for x in reversed(tail) if "error" in x.lower() or "failed" in x.lower()), tail[-1] if tail else "")
            raise CcmoeError(f"llama-quantize failed on {model} ({reason.strip()})",
                             "check the model, the plan's types and the imatrix", EXIT_ENGINE)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        types_file.unlink(missing_ok=True)
    return out


def build_key(engine: Engine, model: Path, plan: dict, imatrix: Path | None) -> str:
    """What makes a build: the engine, the model, the plan's types and overrides, the imatrix."""
    from .plan import plan_overrides, tensor_type_lines

    parts = [engine.key, file_digest(model), json.dumps(tensor_type_lines(plan)), json.dumps(plan_overrides(plan)),
             file_digest(imatrix) if imatrix else ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _record_path(out: Path) -> Path:
    return out.with_name(out.name + ".build.json")


def up_to_date(out: Path, key: str) -> bool:
    """True when `out` was built from exactly these inputs and has not changed since."""
    record = _record_path(out)
    if not (out.is_file() and record.is_file()):
        return False
    try:
        doc = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    return doc.get("key") == key and doc.get("output") == file_digest(out)


def check_free_disk(out: Path, need: int) -> None:
    """Fail before starting when the output's file system cannot hold the result."""
    free = shutil.disk_usage(out.parent).free
    if free < need * DISK_MARGIN:
        raise CcmoeError(f"{out.parent} has {free / 1e9:.2f} GB free but the build needs {need * DISK_MARGIN / 1e9:.2f} GB",
                         "free space there or write -o to another disk", EXIT_RESOURCE)


def verify(out: Path, plan: dict, engine: Engine) -> dict:
    """Every tensor has its planned type, the file is within 1% of the planned size, and llama.cpp loads it."""
    from .inventory import read_gguf

    inv = read_gguf(out)
    types = {t.name: t.ggml_type for t in inv.tensors}
    wrong = {n: (types.get(n), t["type"]) for n, t in plan["tensors"].items() if types.get(n) != t["type"]}
    if wrong:
        n, (got, want) = next(iter(wrong.items()))
        raise CcmoeError(f"{out}: {len(wrong)} tensors differ from the plan, e.g. {n} is {got}, planned {want}",
                         "rebuild with the same engine that planned it", EXIT_ENGINE)
    size = inv.file_bytes
    planned = plan["file_bytes"]
    if abs(size - planned) > 0.01 * planned:
        raise CcmoeError(f"{out} is {size} bytes, {abs(size - planned) / planned:.1%} off the planned {planned}",
                         "re-plan with this engine's type sizes", EXIT_ENGINE)
    load_check(engine, out)
    return {"tensors": len(types), "file_bytes": size, "planned_file_bytes": planned, "loads": True}


def load_check(engine: Engine, path: Path) -> None:
    """Load the model with llama.cpp (memory-mapped, CPU only) in a child process, so a crash stays there."""
    import sys

    code = ("import os,sys; os.environ['LLAMA_CPP_LIB_PATH']=sys.argv[1]; import llama_cpp as L; "
            "L.llama_backend_init(); p=L.llama_model_default_params(); p.n_gpu_layers=0; "
            "m=L.llama_model_load_from_file(sys.argv[2].encode(), p); sys.exit(0 if m else 1)")
    result = subprocess.run([sys.executable, "-c", code, str(engine.library_dir()), str(path)],
                            capture_output=True, text=True)
    if result.returncode:
        reason = next((x for x in reversed(result.stderr.splitlines()) if x.strip()), "no message")
        raise CcmoeError(f"llama.cpp cannot load {path} ({reason.strip()})", "rebuild it; the file is not usable",
                         EXIT_ENGINE)


def build(engine: Engine, model: Path, plan: dict, out: Path, imatrix: Path | None = None, force: bool = False,
          threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Quantize `model` by `plan` into `out` atomically, verify it and record what it was built from."""
    from .plan import plan_overrides, tensor_type_lines

    out = Path(out)
    key = build_key(engine, model, plan, imatrix)
    if up_to_date(out, key):
        return {"output": str(out), "skipped": True, **json.loads(_record_path(out).read_text())["verified"]}
    if out.exists() and not force:
        raise CcmoeError(f"{out} already exists", "pass --force to overwrite it or choose another -o path")
    if plan["tensors"] and any(t["type"] in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS") for t in plan["tensors"].values()) \
            and not imatrix:
        raise CcmoeError("the plan uses IQ1/IQ2 types, which need an imatrix", "pass --imatrix (from `ccmoe-run profile`)")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(out, plan["file_bytes"])
    staged = out.with_name(f".{out.name}.verify")
    try:
        quantize(engine, model, staged, BASE_TYPE, tensor_type_lines(plan), imatrix, plan_overrides(plan), threads,
                 progress)
        verified = verify(staged, plan, engine)
        staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)
    save_artifact(_record_path(out), "build", BUILD_VERSION,
                  {"key": key, "output": file_digest(out), "model": str(model), "imatrix": str(imatrix or ""),
                   "engine": engine.key, "verified": verified})
    return {"output": str(out), "skipped": False, **verified}

