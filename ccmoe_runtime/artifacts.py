"""Versioned JSON artifacts passed between pipeline stages, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CcmoeError

SCHEMA_PREFIX = "ccmoe-runtime"


def write_atomic(path: Path, data: bytes, force: bool = True) -> Path:
    """Write bytes to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    if path.exists() and not force:
        raise CcmoeError(f"{path} already exists", "pass --force to overwrite it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp's 0600 would make results unreadable to others
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_artifact(path: Path, kind: str, version: int, payload: dict[str, Any], force: bool = True) -> Path:
    """Save `payload` as a JSON artifact tagged with its kind and schema version."""
    doc = {"schema": f"{SCHEMA_PREFIX}/{kind}", "version": version, **payload}
    return write_atomic(path, (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode(), force=force)


def load_artifact(path: Path, kind: str, max_version: int) -> dict[str, Any]:
    """Load a JSON artifact and check its kind and schema version."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CcmoeError(f"{path} does not exist", "check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CcmoeError(f"{path} is not valid JSON ({e})", "recreate it with ccmoe-run") from None
    if doc.get("schema") != f"{SCHEMA_PREFIX}/{kind}":
        raise CcmoeError(f"{path} is not a {kind} artifact (schema {doc.get('schema')!r})",
                         f"pass a file written by ccmoe-run as a {kind}")
    if not isinstance(doc.get("version"), int) or doc["version"] > max_version:
        raise CcmoeError(f"{path} has {kind} schema version {doc.get('version')}, this ccmoe-run reads up to {max_version}",
                         "upgrade ccmoe-runtime or recreate the file")
    return doc


def file_digest(path: Path) -> str:
    """A cheap identity for a big input: resolved path, size and modification time (hashing 100 GB is too slow)."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
