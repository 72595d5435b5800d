"""The compression pipeline's glue: what `profile` leaves in its folder, `plan` from it, and the saved plan.

profile -> <stem>.imatrix.gguf, <stem>.expert-stats.json, <stem>.sensitivity.json, <stem>.impact.json,
           <stem>.router-stats.json (mean routing score per expert; models up to 4 GB, which load in memory)
plan    -> PLAN.json (versioned), PLAN.types.txt (llama-quantize --tensor-type-file), PLAN.png
build   -> OUT.gguf (+ OUT.gguf.build.json)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .artifacts import load_artifact, save_artifact, write_atomic
from .devices import DeviceProfile
from .engine import Engine
from .errors import CcmoeError
from .inventory import ModelInventory

IMPACT_MAX_BYTES = 4 * 10**9    # impact probes rebuild the model once per tensor group: small models only
IMPACT_CHUNKS = 64              # calibration chunks (of 256 tokens) each probe is scored on


@dataclass
class Profile:
    """What `ccmoe-run profile` measured for one model."""

    imatrix: Path | None
    stats: dict | None
    sensitivity: dict
    impact: dict | None


def profile_paths(folder: Path, model: Path) -> dict[str, Path]:
    stem = Path(model).name.removesuffix(".gguf")
    return {k: Path(folder) / f"{stem}.{k}.{ext}" for k, ext in
            (("imatrix", "gguf"), ("expert-stats", "json"), ("sensitivity", "json"), ("impact", "json"))}


def run_profile(engine: Engine, model: Path, calib: Path, folder: Path, ctx: int = 512, chunks: int | None = 64,
                impact: bool | None = None, force: bool = False, threads: int | None = None,
                progress=None) -> dict:
    """imatrix and expert statistics (llama-imatrix), per-type errors (ggml), and output impact (probe builds)."""
    from .impact import measure_impact, save_impact
    from .sensitivity import measure_sensitivity, save_sensitivity
    from .stats import profile_model

    paths = profile_paths(folder, model)
    if not force:
        for p in (paths["sensitivity"], paths["impact"]):
            if p.exists():
                raise CcmoeError(f"{p} already exists", "pass --force to overwrite it or choose another -o folder")
    result = profile_model(engine, model, calib, folder, ctx=ctx, chunks=chunks, threads=threads, force=force)
    small = Path(model).stat().st_size <= IMPACT_MAX_BYTES       # loads in memory; probe builds are affordable
    if small:        # mean routing score per expert (bindings' cb_eval)
        from .router import cached_router_stats, router_stats_path

        path = router_stats_path(folder, model)
        cached_router_stats(engine, model, calib, path, ctx=min(ctx, 256), chunks=chunks, threads=threads)
        result["router_stats"] = str(path)
    sens = measure_sensitivity(engine, model, paths["imatrix"], result)
    save_sensitivity(sens, paths["sensitivity"])
    result["sensitivity"] = str(paths["sensitivity"])
    if impact is None:
        impact = small
    if impact:
        work = folder / ".impact-work"
        try:
            found = measure_impact(engine, model, sens, calib, work, imatrix=paths["imatrix"], chunks=IMPACT_CHUNKS,
                                   threads=threads, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        save_impact(found, paths["impact"])
        result["impact"] = str(paths["impact"])
    else:
        paths["impact"].unlink(missing_ok=True)
    return result


def load_profile(folder: Path, model: Path) -> Profile:
    """The artifacts `run_profile` wrote for `model`, checked to be there."""
    from .impact import IMPACT_VERSION
    from .sensitivity import SENSITIVITY_VERSION
    from .stats import EXPERT_STATS_VERSION

    paths = profile_paths(folder, model)
    if not paths["sensitivity"].is_file():
        raise CcmoeError(f"{folder} holds no profile of {Path(model).name} ({paths['sensitivity'].name} is missing)",
                         f"run `ccmoe-run profile {model} -o {folder}` first, or plan without --profile")
    impact = load_artifact(paths["impact"], "impact", IMPACT_VERSION) if paths["impact"].is_file() else None
    stats = load_artifact(paths["expert-stats"], "expert-stats", EXPERT_STATS_VERSION) \
        if paths["expert-stats"].is_file() else None
    return Profile(paths["imatrix"] if paths["imatrix"].is_file() else None, stats,
                   load_artifact(paths["sensitivity"], "sensitivity", SENSITIVITY_VERSION), impact)


def plan_model(engine: Engine, inv: ModelInventory, device: DeviceProfile, ctx: int, parallel: int,
               budget_gb: float | None = None, profile: Profile | None = None, experts_used: int | None = None,
               original_experts: int | None = None) -> dict:
    """A plan from measured sensitivity and impact when profiled, else from the weight-less prior model."""
    from .inventory import require_moe, summarize
    from .plan import adjusted_experts_used, device_budget, make_plan
    from .sensitivity import prior_sensitivity

    require_moe(summarize(inv), inv.source)
    sens = profile.sensitivity if profile else prior_sensitivity(engine, inv)
    excluded = tuple(t.lower() for t in device.unsupported_types + device.slow_types)
    budget = device_budget(inv, device, ctx, parallel, budget_gb)
    plan = make_plan(inv, sens, budget, excluded, profile.impact if profile else None,
                     adjusted_experts_used(inv, experts_used, original_experts))
    plan.update({"ctx": ctx, "parallel": parallel, "engine": engine.commit,
                 "imatrix": str(profile.imatrix) if profile and profile.imatrix else None,
                 "sensitivity_source": "measured" if profile else sens.get("prior")})
    return plan


def plan_files(path: Path) -> dict[str, Path]:
    path = Path(path)
    stem = path.name.removesuffix(".json")
    return {"plan": path, "types": path.with_name(f"{stem}.types.txt"), "png": path.with_name(f"{stem}.png")}


def save_plan(plan: dict, path: Path, force: bool = False, picture: bool = True) -> dict[str, Path]:
    """The plan JSON, its llama-quantize tensor-type file and (optionally) its PNG picture."""
    from .plan import PLAN_VERSION, tensor_type_lines
    from .plot import plan_png

    files = plan_files(path)
    if files["plan"].exists() and not force:
        raise CcmoeError(f"{files['plan']} already exists", "pass --force to overwrite it or choose another -o path")
    save_artifact(files["plan"], "plan", PLAN_VERSION, plan)
    write_atomic(files["types"], ("\n".join(tensor_type_lines(plan)) + "\n").encode())
    if picture:
        plan_png(plan, files["png"])
    else:
        files.pop("png")
    return files


def load_plan(path: Path) -> dict:
    from .plan import PLAN_VERSION

    return load_artifact(path, "plan", PLAN_VERSION)
