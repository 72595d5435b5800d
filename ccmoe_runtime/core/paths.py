"""Where things live: the source checkout (when there is one) and the cache outside the work tree."""

from __future__ import annotations

import os
from pathlib import Path


def package_dir() -> Path:
    """The installed ccmoe_runtime package folder (its data files live under it)."""
    return Path(__file__).resolve().parent.parent


def project_root() -> Path | None:
    """The source checkout holding the package (pyproject.toml beside it), or None for a wheel install."""
    root = package_dir().parent
    return root if (root / "pyproject.toml").is_file() else None


def cache_root() -> Path:
    """Where engine builds, downloads and corpora are cached, outside the work tree."""
    if os.environ.get("CCMOE_CACHE_DIR"):
        return Path(os.environ["CCMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ccmoe-runtime"


def vendor_dir() -> Path:
    """The llama.cpp source tree: vendor/llama.cpp in a checkout, else in the cache."""
    if os.environ.get("CCMOE_VENDOR_DIR"):
        return Path(os.environ["CCMOE_VENDOR_DIR"])
    root = project_root()
    return (root / "vendor" if root else cache_root() / "vendor") / "llama.cpp"
