"""A placement whose tensor pools were chosen elsewhere (by `compress --device`, together with the types), and the
layout file beside a GGUF that carries it to `serve`.

`compress --device NAME -o OUT.gguf` writes OUT.layout.json: a placement artifact for that device plus the
model's digest. `serve --model OUT.gguf --device NAME` finds it, keeps its tensor pools and sizes memory and speed
for the settings asked now; a layout of another device, another file, or one that no longer fits is not used.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.artifacts import save_artifact
from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.units import GB
from ..devices.detect import environment_threads
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from ..engine.tools import fit_print
from ..model.experts import load_expert_stats
from ..model.inventory import ModelInventory, kv_bytes_per_token, model_digest, read_gguf, summarize
from .costmodel import KV_TYPES, Factors, load_factors, main_pool, predict, tensor_loads
from .layout import PLACEMENT_KIND, PLACEMENT_VERSION, Placement, Settings, load_placement
from .memory import SearchContext, fits, flash_mode, pool_capacities, pool_use
from .rules import override_rules


def layout_path(model: Path) -> Path:
    """Where a GGUF's layout lives: OUT.layout.json beside OUT.gguf."""
    model = Path(model)
    return model.with_name(model.name.removesuffix(".gguf") + ".layout.json")


def place_as(inv: ModelInventory, device: DeviceProfile, factors: Factors, settings: Settings,
             where: dict[str, str], stats: dict | None = None, engine: Engine | None = None,
             model: Path | None = None, note: str = "") -> Placement:
    """The placement with these tensor pools: -ot rules, memory per pool (llama.cpp's dry run when the engine
    has it) and predicted speed; an error when it does not fit the device."""
    main = main_pool(device)
    loads = tensor_loads(inv, stats)
    where = {ld.name: where.get(ld.name, main) for ld in loads}
    if main == "cpu":
        where = dict.fromkeys(where, "cpu")
    kv_type = settings.kv_type if settings.kv_type in KV_TYPES else "f16"
    depth = settings.depth if settings.depth is not None else min(
        settings.ctx, int(inv.key("context_length", 0) or 0) or settings.ctx)
    settings = replace(settings, kv_type=kv_type, depth=depth)
    n_layers = summarize(inv).n_layers
    cx = SearchContext(inv, device, factors, settings, loads, main, n_layers)
    cpu = [n for n, w in where.items() if w == "cpu" and not n.startswith("token_embd.")] if main == "gpu" else []
    rules = override_rules(cpu)
    hybrid = bool(rules)
    threads = settings.threads or max(1, min(factors.cpu_threads if hybrid and factors.cpu_threads else device.threads,
                                             environment_threads()))
    kv = kv_bytes_per_token(inv, KV_TYPES[kv_type])
    p = Placement(model=inv.source, device=device.name, backend=device.backend, settings=settings, kv_type=kv_type,
                  flash_attn=flash_mode(device, kv_type), n_gpu_layers=999 if main == "gpu" else 0, threads=threads,
                  tensors=where, overrides=rules, memory={},
                  predicted=predict(loads, where, device, factors, n_layers, kv, depth, settings.n_prompt,
                                    settings.ubatch, main),
                  predicted_empty=predict(loads, where, device, factors, n_layers, kv, 0, settings.n_prompt,
                                          settings.ubatch, main),
                  memory_source="estimate", factors_source=factors.source,
                  load_mode=settings.load_mode or (factors.cpu_load_mode if hybrid else "auto"),
                  notes=[note] if note else [])
    measured = None
    if engine is not None and model is not None:
        s = settings
        measured = fit_print(engine, model, ["-c", str(s.ctx * s.parallel), "-np", str(s.parallel),
                                             *p.common_args()])
    p.memory = pool_use(cx, where, kv_type, measured, pool_capacities(device))
    p.memory_source = "llama-fit-params" if measured else "estimate"
    if not fits(p.memory):
        over = "; ".join(f"{u.where} needs {u.total / GB:.2f} GB of {u.capacity / GB:.2f} GB"
                         for u in p.memory.values() if u.total > u.capacity)
        raise CcmoeError(f"the layout does not fit {device.name} at --ctx {settings.ctx} x --parallel "
                         f"{settings.parallel} ({over})", "shorten --ctx or --parallel, or compress for this device "
                         "again", EXIT_RESOURCE)
    return p


def save_layout(p: Placement, model: Path, path: Path | None = None) -> Path:
    """The layout file of `model`: the placement and the model's digest (a rebuilt file is not matched)."""
    return save_artifact(path or layout_path(model), PLACEMENT_KIND, PLACEMENT_VERSION,
                         {**p.to_dict(), "model_digest": model_digest(Path(model))})


def layout_for(model: Path, device: DeviceProfile) -> tuple[dict | None, str]:
    """The layout beside `model` when it was made for this file and device, else None; and why (a note)."""
    path = layout_path(model)
    if not path.is_file():
        return None, ""
    try:
        doc = load_placement(path)
    except CcmoeError as e:
        return None, f"{path.name} not used ({e.problem})"
    if doc.get("device") != device.name:
        return None, f"{path.name} not used: it was made for {doc.get('device')}, not {device.name}"
    if doc.get("model_digest") != model_digest(Path(model)):
        return None, f"{path.name} not used: {Path(model).name} changed since it was written"
    return doc, f"tensor pools from {path.name} (chosen with the types by `compress --device {device.name}`)"


def place_from_layout(engine: Engine | None, model: Path, device: DeviceProfile, settings: Settings,
                      stats_file: Path | None = None, calibration: Path | None = None):
    """(inventory, factors, stats, placement) from the layout beside `model`, or None (with a note) when there is
    none for this file and device or it does not fit the settings asked."""
    doc, note = layout_for(model, device)
    if doc is None:
        return None, note
    inv = read_gguf(model)
    stats = load_expert_stats(stats_file) if stats_file else None
    factors = load_factors(device, calibration)
    was = doc.get("settings", {})
    measured = str(doc.get("memory_source", "")).startswith("llama-fit-params")
    covered = measured and settings.ctx * settings.parallel <= was.get("ctx", 0) * was.get("parallel", 1)
    try:                              # llama.cpp's dry run only when asked for more context than it measured
        p = place_as(inv, device, factors, settings, doc["tensors"], stats, None if covered else engine, model, note)
    except CcmoeError as e:
        return None, f"{layout_path(model).name} not used: {e.problem}"
    if covered:
        p.memory_source = (f"estimate (llama-fit-params measured this layout at --ctx {was['ctx']} x --parallel "
                           f"{was.get('parallel', 1)} when compress wrote it)")
    return (inv, factors, stats, p), note
