"""The compression pipeline: a plan for a device (from measurements or the weight-less prior), its files, and
`compress` = measure -> plan -> build in one call.

plan  -> PLAN.json (versioned), PLAN.types.txt (llama-quantize --tensor-type-file), PLAN.png
build -> OUT.gguf (+ OUT.gguf.build.json)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.artifacts import artifact_bytes, load_artifact
from ..core.errors import CcmoeError
from ..core.files import check_writable, write_atomic
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from ..placement.costmodel import load_factors
from ..placement.layout import Placement, Settings
from ..placement.pinned import layout_path, place_as, save_layout
from ..placement.search import place
from ..model.inventory import ModelInventory, read_gguf, require_moe, summarize
from .checks import CheckResult, preflight
from .frontier import FRONTIER_KIND, FRONTIER_VERSION, Frontier, check_targets, frontier_model, point_plan
from .measure import Measurements, load_measurements, measure_model
from .plan import (
    PLAN_KIND,
    PLAN_VERSION,
    Plan,
    adjusted_experts_used,
    device_budget,
    make_plan,
    tensor_type_lines,
)
from .plot import frontier_png, plan_png
from .quantize import BuildResult, build
from .sensitivity import prior_sensitivity
from .stages import StageLog


def plan_model(engine: Engine, inv: ModelInventory, device: DeviceProfile, ctx: int, parallel: int,
               budget_gb: float | None = None, measured: Measurements | None = None, experts_used: int | None = None,
               original_experts: int | None = None) -> Plan:
    """A plan from measured sensitivity and impact when measured, else from the weight-less prior model."""
    require_moe(summarize(inv), inv.source)
    sens = measured.sensitivity if measured else prior_sensitivity(engine, inv)
    excluded = tuple(t.lower() for t in device.unsupported_types + device.slow_types)
    budget = device_budget(inv, device, ctx, parallel, budget_gb)
    plan = make_plan(inv, sens, budget, excluded, measured.impact if measured else None,
                     adjusted_experts_used(inv, experts_used, original_experts))
    plan.ctx, plan.parallel, plan.engine = ctx, parallel, engine.commit
    plan.imatrix = str(measured.imatrix) if measured and measured.imatrix else None
    plan.sensitivity_source = "measured" if measured else sens.get("prior")
    return plan


def plan_files(path: Path) -> dict[str, Path]:
    path = Path(path)
    stem = path.name.removesuffix(".json")
    return {"plan": path, "types": path.with_name(f"{stem}.types.txt"), "png": path.with_name(f"{stem}.png")}


def check_plan_files(path: Path, force: bool, picture: bool = True) -> None:
    """Before planning: every file the plan writes can be written."""
    for kind, p in plan_files(path).items():
        if kind != "png" or picture:
            check_writable(p, force, what="plan")


def save_plan(plan: Plan, path: Path, force: bool = False, picture: bool = True) -> dict[str, Path]:
    """The plan JSON, its llama-quantize tensor-type file and (optionally) its PNG picture."""
    files = plan_files(path)
    check_plan_files(path, force, picture)
    write_atomic(files["plan"], artifact_bytes(PLAN_KIND, PLAN_VERSION, plan), force=force)
    write_atomic(files["types"], ("\n".join(tensor_type_lines(plan)) + "\n").encode(), force=True)
    if picture:
        plan_png(plan, files["png"])
    else:
        files.pop("png")
    return files


def plan_frontier(engine: Engine, inv: ModelInventory, device: DeviceProfile, ctx: int, parallel: int,
                  budget_gb: float | None = None, measured: Measurements | None = None,
                  experts_used: int | None = None, original_experts: int | None = None,
                  min_tps: float | None = None, max_kld: float | None = None) -> tuple[Frontier, Plan]:
    """The device's frontier and the plan of its chosen point (the knee, or the one --min-tps/--max-kld ask for)."""
    f, sens = frontier_model(engine, inv, device, ctx, parallel, budget_gb, measured, experts_used, original_experts,
                             min_tps, max_kld)
    return f, point_plan(f, sens, measured.impact if measured else None)


def frontier_files(path: Path) -> dict[str, Path]:
    """A frontier's files beside the plan's: PLAN.frontier.json and PLAN.frontier.png."""
    stem = Path(path).name.removesuffix(".json")
    return {"frontier": Path(path).with_name(f"{stem}.frontier.json"),
            "frontier_png": Path(path).with_name(f"{stem}.frontier.png")}


def save_frontier_plan(f: Frontier, plan: Plan, path: Path, force: bool = False,
                       picture: bool = True) -> dict[str, Path]:
    """The chosen point's plan files (save_plan) and the frontier's JSON and picture."""
    extra = frontier_files(path)
    for kind, p in extra.items():
        if kind == "frontier" or picture:
            check_writable(p, force, what="frontier")
    files = save_plan(plan, path, force, picture)
    write_atomic(extra["frontier"], artifact_bytes(FRONTIER_KIND, FRONTIER_VERSION, f), force=True)
    if picture:
        frontier_png(f, extra["frontier_png"])
    else:
        extra.pop("frontier_png")
    return {**files, **extra}


def load_frontier(path: Path) -> Frontier:
    return Frontier.from_dict(load_artifact(path, FRONTIER_KIND, FRONTIER_VERSION))


def load_plan(path: Path) -> Plan:
    return Plan.from_dict(load_artifact(path, PLAN_KIND, PLAN_VERSION))


@dataclass
class CompressResult:
    """What `compress` left: the measurements' folder, the plan and its files, the build, and the frontier point's
    files beside the GGUF (tensor types, -ot rules, layout) with the layout's placement."""

    work: str
    plan: Plan | None
    files: dict[str, Path]
    build: BuildResult | None
    stopped_after: str | None = None      # --stop-after: the last stage run
    frontier: Frontier | None = None
    placement: Placement | None = None    # the layout written beside the GGUF

    def to_dict(self) -> dict:
        d = {"work": self.work, "stopped_after": self.stopped_after,
             "plan": {k: v for k, v in self.plan.to_dict().items() if k != "tensors"} if self.plan else None,
             "files": {k: str(p) for k, p in self.files.items()},
             "build": self.build.to_dict() if self.build else None}
        if self.frontier:
            f = self.frontier
            d["frontier"] = {"chosen": f.chosen, "knee": f.knee, "chosen_why": f.chosen_why,
                             "points": [{k: v for k, v in q.to_dict().items() if k not in ("types", "where")}
                                        for q in f.points]}
        if self.placement:
            d["placement"] = {"server_args": self.placement.launch_args(),
                              "predicted": self.placement.predicted_empty.to_dict(), "notes": self.placement.notes}
        return d


def work_folder(out: Path) -> Path:
    """Where compress keeps its measurements and plan: OUT.ccmoe/ beside OUT.gguf."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".gguf") + ".ccmoe")


def weights_path(inv: ModelInventory, command: str) -> Path:
    """The GGUF behind an inventory; a weight-less inventory (`inventory:NAME`, a saved .json) has none."""
    if not inv.shards or not Path(inv.source).is_file():
        raise CcmoeError(f"{inv.source} is a weight-less inventory (shapes only); `{command}` needs the model's "
                         "weights", f"pass the GGUF file, or run `ccmoe-run {command} --check` or `plan` on the inventory")
    return Path(inv.source)


def check_compress(engine: Engine, inv: ModelInventory, device: DeviceProfile, out: Path, ctx: int = 8192,
                   parallel: int = 1, budget_gb: float | None = None, impact: bool | None = None,
                   threads: int | None = None) -> CheckResult:
    """Only the checks `compress` runs first (fit, disk, RAM), from the inventory."""
    return preflight(engine, inv, device, out, ctx, parallel, budget_gb, impact, threads=threads)


def compress_model(engine: Engine, model: Path | ModelInventory, device: DeviceProfile, out: Path, calib: Path, ctx: int = 8192,
                   parallel: int = 1, budget_gb: float | None = None, experts_used: int | None = None,
                   original_experts: int | None = None, impact: bool | None = None, threads: int | None = None,
                   force: bool = False, progress=None, imatrix: Path | None = None, stop_after: str | None = None,
                   say=None, min_tps: float | None = None, max_kld: float | None = None) -> CompressResult:
    """measure -> frontier of types and pools -> build its chosen point (knee, --min-tps or --max-kld); the
    artifacts stay in OUT.ccmoe/, and a stage that finished there from the same inputs is skipped (a killed run
    resumes); `stop_after` ends after that stage (STOP_STAGES). Once the GGUF is built and verified, its
    tensor-type file, -ot rules and layout are written beside it."""
    check_targets(min_tps, max_kld)
    inv = model if isinstance(model, ModelInventory) else read_gguf(model)
    check_writable(out, force, what="compressed model")
    for p in device_files(out).values():          # they belong to OUT: replaced whenever OUT may be written
        check_writable(p, True, what="compressed model's side file")
    preflight(engine, inv, device, out, ctx, parallel, budget_gb, impact, threads=threads)
    model = weights_path(inv, "compress")
    work = work_folder(out)
    log = StageLog.open(work, fresh=force, say=say)
    measure_model(engine, model, calib, work, impact=impact, force=True, threads=threads, progress=progress,
                  imatrix=imatrix, log=log, stop_after=stop_after)
    if stop_after in ("statistics", "sensitivity", "impact"):
        return CompressResult(str(work), None, {}, None, stop_after)
    key = log.key("plan", log.outputs_of("impact"), log.outputs_of("sensitivity"), device, ctx, parallel, budget_gb,
                  experts_used, original_experts, min_tps, max_kld)
    log.start("plan")                        # seconds at any size: always planned again, but timed and recorded
    measured = load_measurements(work, model)
    f, plan = plan_frontier(engine, inv, device, ctx, parallel, budget_gb, measured, experts_used, original_experts,
                            min_tps, max_kld)
    files = save_frontier_plan(f, plan, work / "plan.json", force=True)
    log.finish("plan", key, list(files.values()))
    if stop_after == "plan":
        return CompressResult(str(work), plan, files, None, stop_after, f)
    log.start("build")                       # build's own record (OUT.gguf.build.json) skips an unchanged build
    built = build(engine, model, plan, out, Path(plan.imatrix) if plan.imatrix else None, force, threads,
                  progress("quantizing") if progress else None)
    placement = layout_of(engine, f, out, device, ctx, parallel, measured.expert_stats)
    files.update(save_device_files(plan, placement, out))
    log.finish("build", "", [out])
    return CompressResult(str(work), plan, files, built, None, f, placement)


def device_files(out: Path) -> dict[str, Path]:
    """What `compress --device` writes beside OUT.gguf: OUT.types.txt, OUT.ot.txt (-ot rules) and OUT.layout.json."""
    out = Path(out)
    stem = out.name.removesuffix(".gguf")
    return {"types": out.with_name(f"{stem}.types.txt"), "rules": out.with_name(f"{stem}.ot.txt"),
            "layout": layout_path(out)}


def layout_of(engine: Engine, f: Frontier, out: Path, device: DeviceProfile, ctx: int, parallel: int,
              stats: dict | None) -> Placement:
    """The placement of the built GGUF with the chosen point's pools (memory from llama.cpp's dry run); when
    llama.cpp measures more than the point's estimate, the placement search's on that file instead."""
    inv = read_gguf(out)
    factors = load_factors(device)
    settings = Settings(ctx=ctx, parallel=parallel)
    note = f"tensor pools chosen with the types by `compress --device {device.name}` (frontier point #{f.chosen})"
    try:
        return place_as(inv, device, factors, settings, f.point.where, stats, engine, out, note)
    except CcmoeError as e:
        p = place(inv, device, factors, settings, engine, out, stats)
        p.notes.append(f"the frontier point's pools did not fit ({e.problem}); placed by the search instead")
        return p


def save_device_files(plan: Plan, placement: Placement, out: Path) -> dict[str, Path]:
    """The tensor-type file, the -ot rules (one a line) and the layout that `serve --model OUT.gguf` uses."""
    files = device_files(out)
    write_atomic(files["types"], ("\n".join(tensor_type_lines(plan)) + "\n").encode(), force=True)
    rules = placement.overrides or ["# no -ot rules: every tensor on the device's main backend"]
    write_atomic(files["rules"], ("\n".join(rules) + "\n").encode(), force=True)
    save_layout(placement, out, files["layout"])
    return files
