"""The llama.cpp source tree of the pinned llama-cpp-python package, placed once at vendor/llama.cpp."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EXIT_ENGINE, CcmoeError
from .paths import cache_root, vendor_dir

PINNED_PACKAGE = "llama-cpp-python"
PINNED_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{PINNED_VERSION}"


@dataclass
class VendorSource:
    """The llama.cpp tree placed at vendor/llama.cpp from the pinned source package."""

    path: Path
    package_version: str
    commit: str


def sdist_path() -> Path:
    """The pinned llama-cpp-python source package, downloaded once into the cache."""
    target = cache_root() / "sdist" / f"{SDIST_NAME}.tar.gz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"{PINNED_PACKAGE}=={PINNED_VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = list(Path(tmp).glob(f"{SDIST_NAME}.tar.gz"))
        if result.returncode != 0 or not found:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CcmoeError(f"could not download {PINNED_PACKAGE}=={PINNED_VERSION} ({last[0]})",
                             f"check network access to PyPI or place the file at {target}", EXIT_ENGINE)
        os.replace(found[0], target)
    return target


def _commit_from_changelog(text: str) -> str:
    """The llama.cpp commit the package pins, from its CHANGELOG's newest 'update llama.cpp' line."""
    m = re.search(r"update llama\.cpp to \S*llama\.cpp@([0-9a-f]{7,40})", text)
    return m.group(1)[:9] if m else "unknown"


def ensure_vendor() -> VendorSource:
    """Place the llama.cpp tree of the pinned package at vendor/llama.cpp (once)."""
    dest = vendor_dir()
    stamp = dest / ".ccmoe-source.json"
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("package_version") == PINNED_VERSION:
            return VendorSource(dest, info["package_version"], info["commit"])
    archive = sdist_path()
    prefix = f"{SDIST_NAME}/vendor/llama.cpp/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp.", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            changelog = tar.extractfile(f"{SDIST_NAME}/CHANGELOG.md")
            commit = _commit_from_changelog(changelog.read().decode() if changelog else "")
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        (tmp / ".ccmoe-source.json").write_text(json.dumps(
            {"package": PINNED_PACKAGE, "package_version": PINNED_VERSION, "commit": commit}) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return VendorSource(dest, PINNED_VERSION, commit)
