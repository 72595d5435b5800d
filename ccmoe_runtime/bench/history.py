"""The results history: one JSON line per bench or eval run, with its time and host, for `report` and baselines."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import platform
import shutil
from pathlib import Path

import psutil

from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.files import disk_full_error, make_parent, read_text

DEFAULT_HISTORY = Path("ccmoe-results") / "history.jsonl"
HISTORY_ROOM = 1 << 20          # free bytes a record needs, checked before the measuring starts


def host_id() -> dict:
    """Which machine a record was measured on."""
    return {"hostname": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": psutil.cpu_count(logical=False), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)}


def append_history(path: Path, kind: str, record: dict) -> dict:
    """Add one record (bench or eval) with its time and host to the history file."""
    entry = {"kind": kind, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "host": host_id(), **record}
    path = Path(path)
    make_parent(path)
    data = (json.dumps(entry, default=str) + "\n").encode()
    try:
        _append_whole(path, data)
    except OSError as e:
        raise disk_full_error(path, e) from None
    return entry


def _append_whole(path: Path, data: bytes) -> None:
    """Append `data` entirely or not at all (a failed write is cut back off: no half line)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise CcmoeError(f"history file {path} is a symbolic link",
                         "pass the file it points to, or remove the link; ccmoe-run does not append through links") from None
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_history(path: Path) -> list[dict]:
    """Every record of a history file; a line that is not JSON is a clear error naming its number."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(read_text(path, "history").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise CcmoeError(f"{path} line {i} is not JSON", "remove or fix that line") from None
    return records


def check_history(path: Path) -> Path:
    """Before minutes of measuring: the history file can be appended to (or created)."""
    path = Path(path)
    if path.is_dir():
        raise CcmoeError(f"history {path} is a folder", "pass a file path to --history")
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    if not existing.is_dir() and existing != path:
        raise CcmoeError(f"{existing} is not a folder", "choose another --history path")
    if not os.access(existing, os.W_OK):
        raise CcmoeError(f"{existing} is not writable", "choose a writable --history path, or pass --no-history")
    folder = existing if existing.is_dir() else existing.parent
    if shutil.disk_usage(folder).free < HISTORY_ROOM:
        raise CcmoeError(f"{folder} has no room for the history record", "free space there or pass --no-history",
                         EXIT_RESOURCE)
    if path.is_file():
        read_history(path)       # a damaged history is reported now, not after the run
    return path
