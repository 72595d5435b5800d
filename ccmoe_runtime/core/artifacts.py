"""Versioned JSON artifacts passed between pipeline stages: a kind, a schema version and the payload.

A stage's result is a dataclass with `to_dict()`; `save_artifact` writes it (atomically, through
core.files) and `load_artifact` checks kind and version before a stage's `from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import CcmoeError
from .files import read_text, write_atomic

SCHEMA_PREFIX = "ccmoe-runtime"


def payload_of(obj: Any) -> dict[str, Any]:
    """A result as plain JSON data: its `to_dict()`, a dataclass's fields, or a dict as it is."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(obj)


def artifact_bytes(kind: str, version: int, payload: Any) -> bytes:
    doc = {"schema": f"{SCHEMA_PREFIX}/{kind}", "version": version, **payload_of(payload)}
    return (json.dumps(doc, indent=1, default=str) + "\n").encode()


def save_artifact(path: Path, kind: str, version: int, payload: Any, force: bool = True) -> Path:
    """Save `payload` (a result dataclass or a dict) as a JSON artifact tagged with its kind and schema version."""
    return write_atomic(path, artifact_bytes(kind, version, payload), force=force)


def load_artifact(path: Path, kind: str, max_version: int) -> dict[str, Any]:
    """Load a JSON artifact and check its kind and schema version."""
    path = Path(path)
    text = read_text(path, f"{kind} file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CcmoeError(f"{path} is not valid JSON ({e})", "recreate it with ccmoe-run") from None
    if not isinstance(doc, dict) or doc.get("schema") != f"{SCHEMA_PREFIX}/{kind}":
        schema = doc.get("schema") if isinstance(doc, dict) else None
        article = "an" if kind[:1] in "aeiou" else "a"
        raise CcmoeError(f"{path} is not {article} {kind} artifact (schema {schema!r})",
                         f"pass {article} {kind} file written by ccmoe-run")
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
