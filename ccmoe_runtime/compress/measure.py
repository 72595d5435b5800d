"""Measurements of one model (`ccmoe-run measure`), kept in a folder for `plan --measurements` and `compress`.

measure -> <stem>.imatrix.gguf, <stem>.expert-stats.json, <stem>.sensitivity.json, <stem>.impact.json,
           <stem>.router-stats.json (mean routing score per expert; models up to 4 GB, which load in memory)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.artifacts import file_digest, file_sha256, load_artifact
from ..core.errors import CcmoeError
from ..core.files import read_text
from ..engine.build import Engine
from ..model.experts import load_expert_stats
from ..model.inventory import model_digest, read_gguf
from .impact import IMPACT_MAX_BYTES, IMPACT_VERSION, measure_impact, save_impact
from .router import cached_router_stats, router_stats_path
from .sensitivity import MAX_EXPERTS, SENSITIVITY_VERSION, measure_sensitivity, prior_impact_artifact, save_sensitivity
from .stages import StageLog
from .stats import measure_expert_stats

IMPACT_CHUNKS = 64              # calibration chunks (of 256 tokens) each probe is scored on


@dataclass
class Measurements:
    """What was measured of one model: the imatrix, expert usage, per-type errors and output impact."""

    model: str
    folder: str
    imatrix: Path | None
    expert_stats: dict | None
    sensitivity: dict | None          # None: stopped after the statistics (--stop-after)
    impact: dict | None
    router_stats: Path | None = None

    def to_dict(self) -> dict:
        paths = measurement_paths(Path(self.folder), Path(self.model))
        stats = {k: v for k, v in (self.expert_stats or {}).items() if k not in ("schema", "version")}
        return {**stats, "model": self.model, "folder": self.folder,
                "imatrix": str(self.imatrix) if self.imatrix else None,
                "stats": str(paths["expert-stats"]) if self.expert_stats else None,
                "sensitivity": str(paths["sensitivity"]), "impact": str(paths["impact"]) if self.impact else None,
                "router_stats": str(self.router_stats) if self.router_stats else None}

    def summary_lines(self) -> list[str]:
        d = self.to_dict()
        lines = [f"imatrix {d['imatrix']}", f"expert statistics {d['stats']}", f"sensitivity {d['sensitivity']}",
                 (f"impact {d['impact']}" + (" (class priors, no probe builds)" if (self.impact or {}).get("prior")
                                             else "")) if d["impact"] else "impact not measured (--impact to measure it)"]
        if self.expert_stats:
            n = self.expert_stats["n_expert"]
            lines.append(f"layer  entropy (max {np.log2(n):.2f} bits)  most used experts (share of tokens)")
            for layer, s in self.expert_stats["layers"].items():
                top = np.argsort(s["frequency"])[::-1][:4]
                lines.append(f"  {layer:<5} {s['entropy_bits']:>6.2f}   "
                             + "  ".join(f"{e}:{s['frequency'][e]:.2f}" for e in top))
        return lines


def measurement_paths(folder: Path, model: Path) -> dict[str, Path]:
    stem = Path(model).name.removesuffix(".gguf")
    return {k: Path(folder) / f"{stem}.{k}.{ext}" for k, ext in
            (("imatrix", "gguf"), ("expert-stats", "json"), ("sensitivity", "json"), ("impact", "json"))}


def measure_model(engine: Engine, model: Path, calib: Path, folder: Path, ctx: int = 512, chunks: int | None = 64,
                  impact: bool | None = None, force: bool = False, threads: int | None = None,
                  progress=None, imatrix: Path | None = None, max_experts: int = MAX_EXPERTS,
                  rows_per_expert: int = 16, log: StageLog | None = None, stop_after: str | None = None,
                  types: tuple[str, ...] | None = None) -> Measurements:
    """imatrix and expert statistics (llama-imatrix, or from the user's `imatrix`), per-type errors (ggml), and
    output impact (probe builds). With a stage `log`, stages that finished from the same inputs are skipped;
    `progress(stage)` gives a (done, total) callback for the long ones; `types`: the candidates (default: the
    planner's ladder)."""
    read_text(Path(calib), "calibration text")        # binary or not UTF-8: one line before any tool runs
    paths = measurement_paths(folder, model)
    if not force and log is None:
        for p in (paths["sensitivity"], paths["impact"]):
            if p.exists():
                raise CcmoeError(f"{p} already exists", "pass --force to overwrite it or choose another -o folder")
    log = log or StageLog(None)
    inv = read_gguf(model)
    small = inv.file_bytes <= IMPACT_MAX_BYTES     # every shard; loads in memory, probes affordable
    router = router_stats_path(folder, model) if small else None     # mean routing score per expert (cb_eval)
    key = log.key("statistics", engine.key, model_digest(model), file_sha256(Path(calib)), ctx, chunks,
                  file_digest(Path(imatrix)) if imatrix else None)
    if log.done("statistics", key):
        stats = load_expert_stats(paths["expert-stats"]) if paths["expert-stats"].is_file() else None
    else:
        stats = measure_expert_stats(engine, model, calib, folder, ctx=ctx, chunks=chunks, threads=threads,
                                     force=force or log.path is not None, imatrix=imatrix)
        if router:
            cached_router_stats(engine, model, calib, router, ctx=min(ctx, 256), chunks=chunks, threads=threads)
        log.finish("statistics", key, [p for p in (paths["imatrix"], paths["expert-stats"], router) if p])
    if stop_after == "statistics":
        return Measurements(str(model), str(folder), paths["imatrix"], stats, None, None, router)
    key = log.key("sensitivity", log.outputs_of("statistics"), max_experts, rows_per_expert, SENSITIVITY_VERSION,
                  model_digest(model), *(types or ()))
    if log.done("sensitivity", key):
        sens = load_artifact(paths["sensitivity"], "sensitivity", SENSITIVITY_VERSION)
    else:
        sens = measure_sensitivity(engine, model, paths["imatrix"], stats, rows_per_expert=rows_per_expert,
                                   max_experts=max_experts, threads=threads, **({"types": types} if types else {}),
                                   progress=progress("sensitivity") if progress else None)
        save_sensitivity(sens, paths["sensitivity"])
        log.finish("sensitivity", key, [paths["sensitivity"]])
    if stop_after == "sensitivity":
        return Measurements(str(model), str(folder), paths["imatrix"], stats, sens, None, router)
    probes = impact if impact is not None else small
    key = log.key("impact", log.outputs_of("sensitivity"), probes, file_sha256(Path(calib)), engine.key, IMPACT_VERSION)
    if log.done("impact", key):
        found = load_artifact(paths["impact"], "impact", IMPACT_VERSION) if paths["impact"].is_file() else None
        return Measurements(str(model), str(folder), paths["imatrix"], stats, sens, found, router)
    if probes:
        work = folder / ".impact-work"
        try:
            found = measure_impact(engine, model, sens, calib, work, imatrix=paths["imatrix"], chunks=IMPACT_CHUNKS,
                                   threads=threads, progress=progress("impact probes") if progress else None)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        save_impact(found, paths["impact"])
    else:                 # no probes: the measured class priors of the model's family, where there are some
        found = prior_impact_artifact(inv, sens)
        if found:
            save_impact(found, paths["impact"])
        else:
            paths["impact"].unlink(missing_ok=True)
    log.finish("impact", key, [paths["impact"]])
    return Measurements(str(model), str(folder), paths["imatrix"], stats, sens, found, router)


def load_measurements(folder: Path, model: Path) -> Measurements:
    """The artifacts `measure_model` wrote for `model`, checked to be there."""
    paths = measurement_paths(folder, model)
    if not paths["sensitivity"].is_file():
        raise CcmoeError(f"{folder} holds no measurements of {Path(model).name} ({paths['sensitivity'].name} is "
                         "missing)", f"run `ccmoe-run measure {model} -o {folder}` first, or plan without --measurements")
    impact = load_artifact(paths["impact"], "impact", IMPACT_VERSION) if paths["impact"].is_file() else None
    stats = load_expert_stats(paths["expert-stats"]) if paths["expert-stats"].is_file() else None
    router = router_stats_path(folder, model)
    return Measurements(str(model), str(folder), paths["imatrix"] if paths["imatrix"].is_file() else None, stats,
                        load_artifact(paths["sensitivity"], "sensitivity", SENSITIVITY_VERSION), impact,
                        router if router.is_file() else None)
