"""Hugging Face safetensors folders as model input: converted to a BF16 GGUF by llama.cpp's own converter.

The vendored `convert_hf_to_gguf.py` runs in a child process (`sys.executable`, lazy/streaming by default)
with its own vendored gguf-py, writing to a temporary file beside the output that is renamed on success.
A sidecar `<out>.source.json` records the inputs (names, sizes, mtimes), the out type and the converter's
llama.cpp commit, so an unchanged folder is converted once. Needs the optional `convert` extra.

One addition to the converter: for a folder whose tokenizer is SentencePiece only (tokenizer.model and no
tokenizer.json), model classes that would take the byte-level BPE path (qwen2moe, qwen3moe, ...) and fail
on the unknown pre-tokenizer hash read the SentencePiece model instead, as llama.cpp's Qwen2 class does.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.files import write_atomic
from ..core.paths import cache_root, vendor_dir
from ..core.units import gib_text
from ..core.vendor import ensure_vendor

SCRIPT = "convert_hf_to_gguf.py"
OUTTYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "auto": 2.0, "q8_0": 34 / 32}
REQUIRED_MODULES = ("torch", "transformers", "numpy")  # imported by the script before it reads the folder
INSTALL_FIX = "pip install 'ccmoe-runtime[convert]'"
DISK_MARGIN = 64 << 20

Progress = Callable[[str], None]


def is_hf_folder(path: str | Path) -> bool:
    """True for a directory holding config.json and at least one *.safetensors file."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def input_files(hf_dir: Path) -> list[Path]:
    """The folder's top-level files (weights, config, tokenizer), sorted; hidden files are left out."""
    return sorted(p for p in Path(hf_dir).iterdir() if p.is_file() and not p.name.startswith("."))


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files the converter reads: the index's parts, else model*.safetensors, else all."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        parts = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [hf_dir / p for p in parts]
    return sorted(hf_dir.glob("model*.safetensors")) or sorted(hf_dir.glob("*.safetensors"))


def _inputs_record(hf_dir: Path) -> list[dict]:
    return [{"name": p.name, "size": (s := p.stat()).st_size, "mtime_ns": s.st_mtime_ns} for p in input_files(hf_dir)]


def converted_path(hf_dir: str | Path) -> Path:
    """Where the BF16 conversion of a folder is cached: keyed by its resolved path and its files' sizes and mtimes."""

    hf_dir = Path(hf_dir).resolve()
    key = json.dumps({"folder": str(hf_dir), "files": _inputs_record(hf_dir)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "converted" / digest / f"{hf_dir.name}-bf16.gguf"


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".source.json")


def _converter_id() -> str:
    """The vendored llama.cpp commit (or the script's hash when the tree carries no stamp)."""

    stamp = vendor_dir() / ".ccmoe-source.json"
    if stamp.is_file():
        return "llama.cpp@" + json.loads(stamp.read_text()).get("commit", "unknown")
    return "sha256:" + hashlib.sha256((vendor_dir() / SCRIPT).read_bytes()).hexdigest()[:16]


def source_record(hf_dir: Path, outtype: str) -> dict:
    """What a conversion was made from: the sidecar's content."""
    return {"folder": str(Path(hf_dir).resolve()), "outtype": outtype, "converter": _converter_id(),
            "files": _inputs_record(hf_dir)}


def is_current(out: Path, record: dict) -> bool:
    """True when `out` exists and its sidecar records exactly these inputs."""
    try:
        return out.is_file() and json.loads(sidecar_path(out).read_text()) == record
    except (OSError, ValueError):
        return False


def _safetensors_elements(path: Path) -> int:
    """Number of tensor elements in a safetensors file, from its JSON header (whatever the source dtype)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for dim in info["shape"]:
                n *= dim
            total += n
    return total


def estimate_output_bytes(hf_dir: Path, outtype: str = "bf16") -> int:
    """Bytes the GGUF will take: every element at the out type's size, plus a margin for metadata."""
    try:
        elements = sum(_safetensors_elements(p) for p in weight_files(hf_dir))
    except (OSError, ValueError, KeyError) as e:
        raise CcmoeError(f"cannot read the safetensors headers in {hf_dir} ({e})",
                         "check that the download is complete") from None
    return int(elements * OUTTYPE_BYTES.get(outtype, 2.0)) + DISK_MARGIN


def check_disk(hf_dir: Path, out: Path, outtype: str) -> int:
    """Raise when the output's file system lacks room for the converted GGUF; returns the estimate."""
    needed = estimate_output_bytes(hf_dir, outtype)
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise CcmoeError(f"converting {hf_dir.name} needs about {gib_text(needed)} free in {out.parent}, "
                         f"only {gib_text(free)} is free",
                         "free some space or set CCMOE_CACHE_DIR to a larger disk", EXIT_RESOURCE)
    return needed


def missing_requirements(hf_dir: Path) -> list[str]:
    """Python packages the conversion script needs and this interpreter lacks."""
    needed = list(REQUIRED_MODULES)
    if (Path(hf_dir) / "tokenizer.model").is_file():
        needed.append("sentencepiece")
    return [m for m in needed if importlib.util.find_spec(m) is None]


def needs_sentencepiece_shim(hf_dir: Path) -> bool:
    """A SentencePiece-only tokenizer (tokenizer.model, no tokenizer.json): see the module docstring."""
    return (Path(hf_dir) / "tokenizer.model").is_file() and not (Path(hf_dir) / "tokenizer.json").is_file()


def script_command(hf_dir: Path, outfile: Path, outtype: str) -> list[str]:
    """The argument list that runs the vendored converter (through the SentencePiece shim when needed)."""

    script = vendor_dir() / SCRIPT
    args = [str(hf_dir), "--outtype", outtype, "--outfile", str(outfile)]
    if needs_sentencepiece_shim(hf_dir):
        return [sys.executable, "-m", "ccmoe_runtime.model.convert", str(script), *args]
    return [sys.executable, str(script), *args]


_ERROR_LINE = re.compile(r"^(ERROR:[\w-]+:|[\w.]*(Error|Exception)\b:?)")
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")


def failure_line(lines: list[str]) -> str:
    """The last meaningful line of the converter's output: its exception or ERROR log line, else the last line."""
    text = [ln.strip() for ln in lines if ln.strip() and not set(ln.strip()) <= set("*-=^~ ")]
    for ln in reversed(text):
        if _ERROR_LINE.match(ln):
            return re.sub(r"^ERROR:[\w-]+:", "", ln).strip()
    return text[-1] if text else "no output"


def _env() -> dict[str, str]:
    """The child's environment: NO_LOCAL_GGUF removed, so the script uses its own vendored gguf-py."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    return env


def _run_converter(cmd: list[str], log_path: Path, progress: Progress | None) -> list[str]:
    """Run the converter, logging all output; returns the last lines, or raises with the failure line."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)   # no planted link
    with open(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=_env())
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if progress and "gguf: indexing model part" in line:
                    progress(line.strip().split(":", 2)[-1])
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if code != 0:
        _raise_failure(list(tail), log_path)
    return list(tail)


def _stop(proc: subprocess.Popen) -> None:
    """End the child (on Ctrl-C it has usually been interrupted already)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raise_failure(lines: list[str], log_path: Path) -> None:
    line = failure_line(lines)
    missing = _MISSING_MODULE.search(line)
    if missing or line.startswith("ImportError"):
        what = missing.group(1).split(".")[0] if missing else line
        raise CcmoeError(f"the Hugging Face converter needs Python package {what!r}, which is not installed",
                         INSTALL_FIX)
    raise CcmoeError(f"converting the Hugging Face folder failed: {line}", f"see the full log at {log_path}")


def convert_hf(hf_dir: str | Path, out: str | Path, outtype: str = "bf16", force: bool = False,
               progress: Progress | None = None) -> Path:
    """Convert a Hugging Face safetensors folder to a GGUF at `out` (reused when its sidecar matches)."""

    hf_dir, out = Path(hf_dir), Path(out)
    if not is_hf_folder(hf_dir):
        raise CcmoeError(f"{hf_dir} is not a Hugging Face model folder (config.json and *.safetensors)",
                         "pass a folder as published on the hub, or a GGUF")
    if outtype not in OUTTYPE_BYTES:
        raise CcmoeError(f"unknown out type {outtype!r}", f"use one of {', '.join(OUTTYPE_BYTES)}")
    ensure_vendor()
    record = source_record(hf_dir, outtype)
    if is_current(out, record):
        return out
    if out.exists() and not force:
        raise CcmoeError(f"{out} already exists and is not a conversion of {hf_dir}",
                         "overwrite it with force=True or choose another path")
    if missing := missing_requirements(hf_dir):
        raise CcmoeError(f"converting Hugging Face folders needs {', '.join(missing)}, which is not installed",
                         INSTALL_FIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    needed = check_disk(hf_dir, out, outtype)
    if progress:
        progress(f"converting {hf_dir} to {outtype.upper()} GGUF {out} (about {gib_text(needed)})")
    _convert_atomically(hf_dir, out, outtype, progress)
    write_atomic(sidecar_path(out), (json.dumps(record, indent=1) + "\n").encode())
    if progress:
        progress(f"wrote {out}")
    return out


def _convert_atomically(hf_dir: Path, out: Path, outtype: str, progress: Progress | None) -> None:
    """Run the converter into a temporary file beside `out` and rename it over `out` on success."""
    sidecar_path(out).unlink(missing_ok=True)
    log_path = out.with_name(out.name + ".convert.log")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run_converter(script_command(hf_dir, tmp, outtype), log_path, progress)
        if tmp.stat().st_size == 0:
            raise CcmoeError(f"the converter wrote nothing for {hf_dir}", f"see the full log at {log_path}")
        tmp.chmod(0o644)  # mkstemp made it private
        os.replace(tmp, out)
    except CcmoeError:
        raise  # the log stays: the error names it
    except BaseException:
        log_path.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)


def convert_cached(hf_dir: str | Path, progress: Progress | None = None) -> Path:
    """The cached BF16 GGUF of a folder (converted on first use); older conversions of the folder are removed."""
    out = converted_path(hf_dir)
    drop_stale_conversions(Path(hf_dir), keep=out)
    return convert_hf(hf_dir, out, "bf16", force=True, progress=progress)


def drop_stale_conversions(hf_dir: Path, keep: Path) -> list[Path]:
    """Delete cached conversions of the same folder made from files that have since changed."""
    folder = str(Path(hf_dir).resolve())
    dropped = []
    for sidecar in keep.parent.parent.glob("*/*.source.json"):
        gguf = sidecar.with_name(sidecar.name.removesuffix(".source.json"))
        if gguf == keep:
            continue
        try:
            if json.loads(sidecar.read_text()).get("folder") != folder:
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(sidecar.parent, ignore_errors=True)
        dropped.append(gguf)
    return dropped


# ---------------------------------------------------------------- the SentencePiece shim (child process)

def _run_script_with_sentencepiece_vocab(script: Path, argv: list[str]) -> None:
    """Run the vendored script as `python script ...` would, after letting default-vocab classes read tokenizer.model."""
    import runpy

    sys.argv = [str(script), *argv]
    sys.path[0] = str(script.parent)
    if "NO_LOCAL_GGUF" not in os.environ:
        sys.path.insert(1, str(script.parent / "gguf-py"))
    from conversion.base import TextModel  # type: ignore[import-not-found]

    default = TextModel.set_vocab

    def set_vocab(self) -> None:
        try:
            self._set_vocab_sentencepiece()
        except FileNotFoundError:
            default(self)

    TextModel.set_vocab = set_vocab
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    _run_script_with_sentencepiece_vocab(Path(sys.argv[1]), sys.argv[2:])
