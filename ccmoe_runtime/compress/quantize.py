"""Build: llama-quantize with a plan's per-tensor types, the imatrix and metadata overrides; then verify."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..core.artifacts import file_digest, save_artifact
from ..core.errors import EXIT_ENGINE, CcmoeError
from ..core.files import check_writable, make_parent, output_lock, temp_beside
from ..engine.build import Engine
from ..engine.tools import load_check, quantize
from ..model.inventory import is_quantized, model_digest, read_gguf
from .plan import Plan, plan_overrides, tensor_type_lines

BUILD_VERSION = 1
BASE_TYPE = "Q8_0"               # per-tensor types apply only over a quantized base; every tensor is planned anyway
DISK_MARGIN = 1.02               # free space wanted: the planned size plus 2 %
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS")


@dataclass
class BuildResult:
    """What `build` wrote (or found up to date) and what its verification saw."""

    output: str
    skipped: bool                 # True: the output was already built from the same inputs
    tensors: int
    file_bytes: int
    planned_file_bytes: int
    loads: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        if self.skipped:
            return [f"{self.output} is up to date (same model, plan, imatrix and engine); nothing to do"]
        return [f"wrote {self.output}: {self.file_bytes:,} bytes (planned {self.planned_file_bytes:,}), "
                f"{self.tensors} tensors of the planned types, loads in llama.cpp"]


def build_key(engine: Engine, model: Path, plan: Plan, imatrix: Path | None) -> str:
    """What makes a build: the engine, the model, the plan's types and overrides, the imatrix."""
    parts = [engine.key, model_digest(model), json.dumps(tensor_type_lines(plan)), json.dumps(plan_overrides(plan)),
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
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return doc.get("key") == key and doc.get("output") == file_digest(out)


def check_plan_fits_model(plan: Plan, model: Path) -> None:
    """The plan was made for this model: every planned tensor exists in it with the planned shape's size."""
    inv = read_gguf(model)
    have = {t.name: t.n_elements for t in inv.tensors}
    missing = [n for n in plan.tensors if n not in have]
    wrong = [n for n, t in plan.tensors.items() if n in have and have[n] != t.n_elements]
    if missing or wrong or inv.arch != plan.arch:
        example = (missing or wrong or [plan.arch])[0]
        raise CcmoeError(f"the plan does not belong to {model} ({len(missing)} planned tensors missing, "
                         f"{len(wrong)} of another size, e.g. {example}; plan for {Path(plan.model).name})",
                         "plan this model first: `ccmoe-run plan MODEL --device NAME`")


def verify(out: Path, plan: Plan, engine: Engine) -> dict:
    """Every tensor has its planned type, the file is within 1% of the planned size, and llama.cpp loads it."""
    inv = read_gguf(out)
    types = {t.name: t.ggml_type for t in inv.tensors}
    wrong = {n: (types.get(n), t.type) for n, t in plan.tensors.items() if types.get(n) != t.type}
    if wrong:
        n, (got, want) = next(iter(wrong.items()))
        raise CcmoeError(f"{out}: {len(wrong)} tensors differ from the plan, e.g. {n} is {got}, planned {want}",
                         "rebuild with the same engine that planned it", EXIT_ENGINE)
    size = inv.file_bytes
    planned = plan.file_bytes
    if abs(size - planned) > 0.01 * planned:
        raise CcmoeError(f"{out} is {size} bytes, {abs(size - planned) / planned:.1%} off the planned {planned}",
                         "re-plan with this engine's type sizes", EXIT_ENGINE)
    load_check(engine, out)
    return {"tensors": len(types), "file_bytes": size, "planned_file_bytes": planned, "loads": True}


def build(engine: Engine, model: Path, plan: Plan, out: Path, imatrix: Path | None = None, force: bool = False,
          threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> BuildResult:
    """Quantize `model` by `plan` into `out` atomically, verify it and record what it was built from."""
    out = Path(out)
    key = build_key(engine, model, plan, imatrix)
    if up_to_date(out, key):
        return BuildResult(str(out), True, **json.loads(_record_path(out).read_text())["verified"])
    if any(t.type in NEEDS_IMATRIX for t in plan.tensors.values()) and not imatrix:
        raise CcmoeError("the plan uses IQ1/IQ2 types, which need an imatrix", "pass --imatrix (from `ccmoe-run measure`)")
    check_plan_fits_model(plan, model)
    check_writable(out, force, int(plan.file_bytes * DISK_MARGIN), "build")
    make_parent(out)
    with output_lock(out):
        staged = temp_beside(out, "verify")
        try:
            quantize(engine, model, staged, BASE_TYPE, tensor_type_lines(plan), imatrix, plan_overrides(plan),
                     threads, progress, ("--allow-requantize",) if is_quantized(read_gguf(model)) else ())
            verified = verify(staged, plan, engine)
            os.replace(staged, out)
        finally:
            staged.unlink(missing_ok=True)
    save_artifact(_record_path(out), "build", BUILD_VERSION,
                  {"key": key, "output": file_digest(out), "model": str(model), "imatrix": str(imatrix or ""),
                   "engine": engine.key, "verified": verified})
    return BuildResult(str(out), False, **verified)
