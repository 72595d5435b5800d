"""Click parameter types that validate at the boundary: a bad value is refused before any work starts."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..devices import get_profile
from ..devices.profiles import DeviceProfile
from ..model.inventory import ModelInventory
from ..model.sources import open_inventory, resolve_model_path


class DeviceType(click.ParamType):
    """A device profile: a built-in name, a .toml path, or `auto` (this host)."""

    name = "DEVICE"

    def convert(self, value, param, ctx) -> DeviceProfile:
        return value if isinstance(value, DeviceProfile) else get_profile(str(value))


class ModelType(click.ParamType):
    """A model the engine can run, resolved to a local GGUF: a path, any shard, hf:owner/repo[:file], a Hugging
    Face safetensors folder (converted once), or `bundled`."""

    name = "MODEL"

    def convert(self, value, param, ctx) -> Path:
        return resolve_model_path(value)


class InventoryType(click.ParamType):
    """Any MODEL, or a weight-less inventory: inventory:deepseek-v3, inventory:deepseek-v3-pruned192, or a saved .json."""

    name = "MODEL"

    def convert(self, value, param, ctx) -> ModelInventory:
        return value if isinstance(value, ModelInventory) else open_inventory(value)


class PositiveFloat(click.ParamType):
    """A finite number above zero (no nan, no inf)."""

    name = "NUMBER"

    def convert(self, value, param, ctx) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x) or x <= 0:
            self.fail(f"{value!r} must be a finite number above 0", param, ctx)
        return x


class FiniteRange(click.FloatRange):
    """click's FloatRange without nan (which passes every comparison) and without inf."""

    def convert(self, value, param, ctx) -> float:
        x = super().convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return x


DEVICE = DeviceType()
MODEL = ModelType()
INVENTORY = InventoryType()
POSITIVE = PositiveFloat()
COUNT = click.IntRange(min=1)               # repetitions, rounds, slots, threads, layers
CONTEXT = click.IntRange(min=16)            # llama.cpp's smallest context
PORT = click.IntRange(0, 65535)             # 0: any free port
RATIO = FiniteRange(0, 1, min_open=True)
PERCENT = FiniteRange(0, 100, min_open=True, max_open=True)
NON_NEGATIVE = FiniteRange(0)
OUTPUT = click.Path(dir_okay=False, path_type=Path)          # writability is checked before the work starts
INPUT_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)
