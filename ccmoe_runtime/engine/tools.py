"""The one module that runs llama.cpp's tools and reads what they print.

Every run goes through here, so a tool that fails says which tool, on what, and how it ended: an exit code with
the line of its output that tells most, or the signal that killed it and what that means ("the engine uses a CPU
instruction this machine refuses"), never an empty "()".
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..core.errors import EXIT_ENGINE, EXIT_RESOURCE, CcmoeError
from ..core.files import temp_beside
from ..core.units import MIB
from .build import Engine

N_PROMPT, N_GEN = 512, 128     # llama-bench's pp512 / tg128
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")   # llama-quantize's [ 12/ 345] lines


def signal_name(code: int | None) -> str | None:
    """SIGILL for a process that died by signal 4 (subprocess reports it as -4), else None."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def describe_exit(code: int) -> str:
    """A process's exit code in words: 'exit 1', or the signal's name and what it means."""
    name = signal_name(code)
    if name is None:
        return f"exit {code}"
    meaning = SIGNAL_MEANINGS.get(name, "")
    return f"killed by {name}" + (f": {meaning}" if meaning else "")


SIGNAL_MEANINGS = {
    "SIGILL": "the engine uses a CPU instruction this machine refuses",
    "SIGSEGV": "the engine crashed (invalid memory access)",
    "SIGBUS": "the engine crashed (bad memory access; a truncated or changing model file?)",
    "SIGABRT": "the engine aborted (a failed internal check)",
    "SIGFPE": "the engine crashed (arithmetic fault)",
    "SIGKILL": "the process was killed (out of memory?)",
    "SIGXFSZ": "a file grew past the file size limit (ulimit -f)",
}


_TELLING = ("GGML_ASSERT", "error", "failed", "illegal", "abort")
_NOISE = ("libthread_db", "Inferior", "__GI_", "in ?? ()", "[New LWP", "Thread debugging")


def telling_line(output: str) -> str:
    """The line of a dead tool's output that says most: an assertion or error line, else the last plain line."""
    lines = [ln.strip() for ln in output.splitlines()
             if ln.strip() and not any(n in ln for n in _NOISE) and not re.match(r"\s*#\d+\s", ln)]
    for ln in reversed(lines):
        if any(t.lower() in ln.lower() for t in _TELLING):
            return ln
    return lines[-1] if lines else ""




def tool_failure(tool: str, what: str, code: int | None, output: str, fix: str = "") -> CcmoeError:
    """The one-line error for a tool that ended badly: its exit code or signal in words and its telling line."""
    how = "timed out" if code is None else describe_exit(code)
    why = telling_line(output)
    if signal_name(code):
        fix = fix or "run `ccmoe-run engine info`: its self-test shows which tools and types fail on this host"
    return CcmoeError(f"{tool} failed on {what} ({how}" + (f"; {why[:200]}" if why else "") + ")",
                      fix or "check the model and the inputs", EXIT_ENGINE)


def run_tool(engine: Engine, tool: str, args: list[str], what: str, timeout: float | None = None,
             fix: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool to its end and return the finished process (text stdout and stderr); a failure
    raises tool_failure."""
    cmd = [str(engine.tool(tool)), *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                             env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired as e:
        raise tool_failure(tool, what, None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes)
                           else (e.stderr or ""), fix) from None
    if res.returncode:
        raise tool_failure(tool, what, res.returncode, res.stdout + "\n" + res.stderr, fix)
    return res


def run_measured(cmd: list[str], timeout: float) -> tuple[int | None, str, str, int]:
    """Run a command to its end: (exit code or None on timeout, stdout, stderr, peak resident bytes).

    The peak is the kernel's own high-water mark of the child (wait4's ru_maxrss): exact, and no sampling
    thread competes with the benchmark for the CPU."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    texts: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: texts.__setitem__(k, f.read()), daemon=True)
               for k, f in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    killed = threading.Event()
    timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:                                    # Ctrl-C: leave no llama-bench behind
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return (None if killed.is_set() else proc.returncode), texts.get("out", ""), texts.get("err", ""), peak


def llama_bench(engine: Engine, model: Path, args: list[str], reps: int = 1, n_prompt: int = N_PROMPT,
                n_gen: int = N_GEN, timeout: float = 1800) -> dict:
    """One llama-bench run: prompt and generation tokens/s samples, peak RSS, or the error that stopped it."""
    cmd = [str(engine.tool("llama-bench")), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps),
           "-o", "json", *args]
    started = time.monotonic()
    rc, out, err, rss = run_measured(cmd, timeout)
    if rc is None:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "args": args}
    result = {"ok": rc == 0, "args": args, "started_s": started, "wall_s": round(time.monotonic() - started, 2),
              "peak_rss_bytes": rss}
    if rc:
        result["error"] = describe_exit(rc) + (f"; {telling_line(err)}" if telling_line(err) else "")
        return result
    for row in json.loads(out):
        result["pp" if row["n_prompt"] else "tg"] = row.get("samples_ts") or [row["avg_ts"]]
    return result


def run_perplexity(engine: Engine, args: list[str], what: str, last_line: str = "", attempts: int = 3) -> str:
    """Run llama-perplexity and return its report (stdout and stderr); rerun when the report lacks `last_line`.

    llama.cpp's logger is an unjoined background thread (common/log.cpp, issue 22142), so the last lines
    of a report are sometimes lost at exit, more often on a busy machine.
    """
    cmd = [str(engine.tool("llama-perplexity")), *args]
    for attempt in range(attempts):
        time.sleep(attempt)          # a busy machine starves the logger; give it a moment
        result = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if result.returncode:
            raise tool_failure("llama-perplexity", what, result.returncode, result.stdout + "\n" + result.stderr,
                               "check the model and the text")
        if last_line in result.stdout + result.stderr:
            break
    return result.stdout + result.stderr


def run_imatrix(engine: Engine, model: Path, text: Path, out: Path, ctx: int = 512, chunks: int | None = None,
                threads: int | None = None, output_format: str = "gguf", sequences: int = 1) -> Path:
    """Run llama-imatrix on `text`, writing its imatrix to `out` (GGUF, or the legacy `dat` layout).

    `sequences` > 1 evaluates that many chunks in one batch (-b = -ub = sequences x ctx): each weight is read
    once per batch, so a model that streams from disk is read chunks/sequences times instead of once per chunk."""
    cmd = [str(engine.tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
           "--output-format", output_format]
    if sequences > 1:
        cmd += ["-b", str(sequences * ctx), "-ub", str(sequences * ctx)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if threads:
        cmd += ["-t", str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if result.returncode != 0 or not out.is_file():
        raise tool_failure("llama-imatrix", str(model), result.returncode, result.stdout + "\n" + result.stderr,
                           "check the model and the calibration text")
    return out


def quantize(engine: Engine, model: Path, out: Path, base_type: str, type_lines: list[str],
             imatrix: Path | None = None, overrides: list[str] = (), threads: int | None = None,
             progress: Callable[[int, int], None] | None = None, flags: tuple[str, ...] = ()) -> Path:
    """Run llama-quantize into a fresh temporary file beside `out` (created exclusively, random name) and rename
    it over `out` on success; nothing is left on failure. The disk filling up is exit 4 and says so.
    `flags`: more llama-quantize options (`--pure`, `--allow-requantize`)."""
    out = Path(out)
    tmp = temp_beside(out)
    types_file = temp_beside(out, "types") if type_lines else None
    cmd = [str(engine.tool("llama-quantize"))]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    if types_file:
        types_file.write_text("\n".join(type_lines) + "\n")
        cmd += ["--tensor-type-file", str(types_file)]
    for kv in overrides:
        cmd += ["--override-kv", kv]
    cmd += [*flags, str(model), str(tmp), base_type] + ([str(threads)] if threads else [])
    tail: collections.deque[str] = collections.deque(maxlen=12)
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc:
            try:
                for line in proc.stdout:
                    tail.append(line.rstrip())
                    m = _PROGRESS.match(line)
                    if m and progress:
                        progress(int(m.group(1)), int(m.group(2)))
            except BaseException:          # Ctrl-C or SIGTERM: stop the child before its file is removed
                proc.kill()
                raise
        if proc.returncode:
            if proc.returncode == -signal.SIGXFSZ:
                raise CcmoeError(f"llama-quantize hit the file size limit (ulimit -f) writing into {out.parent} (the "
                                 "partial file is removed)", "raise the limit or free space there", EXIT_RESOURCE)
            if disk_filled(out.parent, "\n".join(tail)):
                raise CcmoeError(f"the disk filled while llama-quantize wrote into {out.parent} (the partial file is "
                                 "removed)", "free space there or write the output to another disk", EXIT_RESOURCE)
            raise tool_failure("llama-quantize", str(model), proc.returncode, "\n".join(tail),
                               "check the model, the plan's types and the imatrix")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        if types_file:
            types_file.unlink(missing_ok=True)
    return out


def disk_filled(folder: Path, output: str) -> bool:
    """Whether a tool's failure was a full disk: its own words, or (almost) no space left where it wrote."""
    if any(w in output.lower() for w in ("no space left", "enospc", "file too large", "disk quota")):
        return True
    try:
        return shutil.disk_usage(folder).free < 16 * MIB
    except OSError:
        return False


def load_check(engine: Engine, path: Path) -> None:
    """Load the model with llama.cpp (memory-mapped, CPU only) in a child process, so a crash stays there."""
    code = ("import os,sys; os.environ['LLAMA_CPP_LIB_PATH']=sys.argv[1]; import llama_cpp as L; "
            "L.llama_backend_init(); p=L.llama_model_default_params(); p.n_gpu_layers=0; "
            "m=L.llama_model_load_from_file(sys.argv[2].encode(), p); sys.exit(0 if m else 1)")
    result = subprocess.run([sys.executable, "-c", code, str(engine.library_dir()), str(path)],
                            capture_output=True, text=True)
    if result.returncode:
        raise tool_failure("llama.cpp (bindings)", f"loading {path}", result.returncode, result.stderr,
                           "rebuild it; the file is not usable")


def fit_print(engine: Engine, model: Path, args: list[str]) -> dict[str, dict[str, int]] | None:
    """llama.cpp's own dry-run memory estimate (bytes of model, context and compute per device), or None when
    the engine has no llama-fit-params."""
    if not engine.has_tool("llama-fit-params"):
        return None
    cmd = [str(engine.tool("llama-fit-params")), "-m", str(model), "--fit-print", "on", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            found[parts[0]] = {k: int(v) * MIB + MIB for k, v in zip(("model", "context", "compute"), parts[1:])}
    return found if out.returncode == 0 and found else None


