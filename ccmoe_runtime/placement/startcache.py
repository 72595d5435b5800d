"""Start cache: a placement made once (llama.cpp's dry runs, a trial run) is kept in the cache, keyed by everything
that made it (model file, engine, device, free GPU memory, settings, calibration, expert statistics, trial), so a
second `serve` of the same model starts llama-server at once instead of measuring again."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..core.artifacts import file_digest, load_artifact, save_artifact
from ..core.errors import CcmoeError
from ..core.paths import cache_root
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from .layout import PLACEMENT_VERSION, Placement, Settings, placement_from_dict
from .memory import live_gpu_free_bytes

START_KIND, START_VERSION = "start", 1
KEPT = 50                          # newest entries kept
FREE_STEP = 256 * 1024**2          # free GPU memory counts in steps of this (another process moves it a little)


def start_key(model: Path, engine: Engine | None, device: DeviceProfile, settings: Settings,
              calibration: Path | None, stats_file: Path | None, trial: bool) -> str:
    """What a placement depends on, hashed: the same key, the same placement."""
    free = live_gpu_free_bytes(device)
    parts = {"model": file_digest(model), "engine": (engine.key or str(engine.bin_dir)) if engine else None,
             "device": {k: v for k, v in device.to_dict().items() if k != "notes"},
             "gpu_free_steps": free // FREE_STEP if free is not None else None, "settings": asdict(settings),
             "calibration": file_digest(calibration) if calibration and Path(calibration).is_file() else None,
             "stats": file_digest(stats_file) if stats_file else None, "trial": trial,
             "ccmoe": [__version__, PLACEMENT_VERSION, START_VERSION]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def entry_path(key: str) -> Path:
    return cache_root() / "starts" / f"{key}.json"


def cached_placement(key: str) -> Placement | None:
    """The placement stored under `key`, or None (none stored, or an entry this version cannot read)."""
    path = entry_path(key)
    if not path.is_file():
        return None
    try:
        return placement_from_dict(load_artifact(path, START_KIND, START_VERSION)["placement"])
    except (CcmoeError, KeyError, TypeError, ValueError):
        return None


def remember(key: str, placement: Placement) -> Path | None:
    """Store the placement under `key` and keep the newest KEPT entries; a cache that cannot be written is skipped
    (the next start places again)."""
    path = entry_path(key)
    try:
        save_artifact(path, START_KIND, START_VERSION, {"key": key, "placement": placement.to_dict()})
    except (CcmoeError, OSError):
        return None
    entries = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEPT:]:
        old.unlink(missing_ok=True)
    return path


def forget(key: str) -> None:
    """Drop the entry under `key` (its placement did not start: the next start places again)."""
    entry_path(key).unlink(missing_ok=True)
