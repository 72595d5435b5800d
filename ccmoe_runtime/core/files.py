"""Outputs that are never half-written, never overwritten by surprise, and cannot be redirected.

Every file a command writes goes through `output()`: it checks the target BEFORE the work starts (folder
writable, room on the disk, no existing file without --force), holds a lock per output (two runs writing the
same file: the second stops at once), stages the bytes in a temporary file created exclusively (O_EXCL, a random
name) beside the target, and renames it over the target only when the work succeeded. Temporary files left by a
killed run are removed by the next run that holds the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import EXIT_RESOURCE, EXIT_USAGE, CcmoeError

PART_SUFFIX = ".part"


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_writable(path: Path, force: bool = False, need_bytes: int = 0, what: str = "output") -> Path:
    """Fail now, with one line, if `path` cannot be written later: an existing file without `force`, a folder in
    the way, a parent that is missing or read-only, or too little free disk for `need_bytes`."""
    path = Path(path)
    if path.is_dir():
        raise CcmoeError(f"{what} {path} is a folder", "pass a file path")
    if path.exists() and not force:
        raise CcmoeError(f"{path} already exists", "pass --force to overwrite it or choose another path")
    parent = path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())   # missing folders are made later
    if not existing.is_dir():
        raise CcmoeError(f"{existing} is not a folder", f"choose another place for the {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CcmoeError(f"the folder {existing} is not writable", f"choose a writable place for the {what}")
    parent = existing
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise CcmoeError(f"{parent} has {_size(free)} free but the {what} needs {_size(need_bytes)}",
                             "free space there or write to another disk", EXIT_RESOURCE)
    return path


def make_parent(path: Path) -> None:
    """Create the folders above `path` (mkdir -p), with one line on failure."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_full_error(Path(path).parent, e) from None


def disk_full_error(path: Path, e: OSError) -> CcmoeError:
    """The one-line error for a write that failed (ENOSPC, EFBIG or a short write: exit 4; anything else: exit 2)."""
    short_write = e.errno is None and "written" in str(e)       # numpy's tofile: "N requested and M written"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or short_write:
        return CcmoeError(f"the disk filled while writing {path}", "free space there or write to another disk",
                          EXIT_RESOURCE)
    return CcmoeError(f"cannot write {path} ({e.strerror or e})", "check the path and its permissions", EXIT_USAGE)


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `path` while writing it: a second writer of the same output stops at once. The
    lock file is opened without following a symlink (a planted link cannot redirect it) and removed on release."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    fd = _locked(lock, path)
    try:
        remove_stale_parts(path)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _locked(lock: Path, path: Path) -> int:
    """An fd holding the lock on `lock`; retried when another writer removed the file between open and lock."""
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CcmoeError(f"{lock} is a symbolic link", "remove it; ccmoe-run does not follow links there") from None
            raise disk_full_error(lock, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CcmoeError(f"another ccmoe-run is writing {path} right now",
                             "wait for it to finish or choose another output") from None
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise CcmoeError(f"could not lock {lock}", "retry; another ccmoe-run may be writing the same output")


def remove_stale_parts(path: Path) -> list[Path]:
    """Temporary files a killed run left beside `path` (call with the output's lock held)."""
    gone = []
    for p in Path(path).parent.glob(f".{Path(path).name}.*{PART_SUFFIX}"):
        if p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def temp_beside(path: Path, tag: str = "") -> Path:
    """A new empty file beside `path`, created exclusively with an unpredictable name (removed by the caller)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{tag + '.' if tag else ''}", suffix=PART_SUFFIX, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)          # mkstemp's 0600 would make results unreadable to others
    return Path(name)


@contextlib.contextmanager
def staged_output(path: Path, force: bool = False, need_bytes: int = 0, what: str = "output") -> Iterator[Path]:
    """Check `path`, lock it, and yield a fresh temporary file beside it; on success the temporary file replaces
    `path`, on any failure (Ctrl-C included) it is removed and `path` is left as it was."""
    path = check_writable(Path(path), force, need_bytes, what)
    make_parent(path)
    with output_lock(path):
        tmp = temp_beside(path)
        try:
            yield tmp
            if path.exists() and not force:      # appeared while we worked
                raise CcmoeError(f"{path} already exists", "pass --force to overwrite it or choose another path")
            os.replace(tmp, path)
        except OSError as e:
            raise disk_full_error(path, e) from None
        finally:
            tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, force: bool = True) -> Path:
    """Write bytes to `path` through `staged_output` (never half-written)."""
    with staged_output(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's content, or one line saying why it cannot be read (missing, a folder, binary)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CcmoeError(f"{what} {path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise CcmoeError(f"{what} {path} is a folder", "pass a file") from None
    except OSError as e:
        raise CcmoeError(f"cannot read {what} {path} ({e.strerror or e})", "check the path and its permissions") from None
    if b"\0" in data[:65536]:
        raise CcmoeError(f"{what} {path} is a binary file, not text", "pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CcmoeError(f"{what} {path} is not UTF-8 text (byte {e.start})", "convert it to UTF-8") from None
