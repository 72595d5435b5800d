"""Baseline files: `bench --record F` keeps a configuration and its rounds; `bench --baseline F` gates now against it.

A tokens/s figure recorded last week cannot be compared with one measured now: a shared machine's own speed moves
12-37 % within one run (docs/bench.md), more between days. So the file does not only keep numbers. `--record`
freezes the configuration itself: a copy of the engine's llama-bench, llama-server and libraries (content-addressed,
in the cache), the model's digest, threads and flags. `--baseline` re-runs that frozen configuration now as A,
the current one as B, in the same paired, alternating rounds and with the same verdict as the A/B gate
(`gate.run_gate`, `verdict.decide`). Machine drift, between the sessions and within this one, falls on both alike.

What it cannot see: a change outside the frozen files (the kernel, libc, a GPU driver, the machine itself) slows A
and B alike and is no regression to the paired verdict. The recorded rounds show such a change instead: the
frozen configuration now against itself at recording time (`since_recording`, an unpaired interval that also
holds the machine's move, so it is reported, never gated). The recorded model must still be on disk unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.artifacts import SCHEMA_PREFIX, file_sha256, save_artifact
from ..core.errors import EXIT_RESOURCE, CcmoeError
from ..core.files import check_writable, read_text
from ..core.paths import cache_root
from ..engine.build import Engine
from .gate import GATE_VERSION, REPS, GateResult, Side, check_side, measures_for, model_digest, one_run, run_gate
from .history import host_id
from .serving import served_round
from .verdict import unpaired_verdict

BASELINE_KIND, BASELINE_VERSION = "bench-baseline", 1
FROZEN_TOOLS = ("llama-bench", "llama-server")


@dataclass
class Baseline:
    """A recorded configuration (frozen engine, model digest, threads, flags) and its samples per measure."""

    version: int
    recorded_at: str
    host: dict
    engine: dict
    model: dict
    threads: int
    flags: list[str]
    reps: int
    measures: dict[str, list[float]]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        lines = [f"recorded {Path(self.model['path']).name} with engine {self.engine['commit']} "
                 f"({self.engine['backend']}), -t {self.threads} {' '.join(self.flags)}".rstrip()
                 + f" on {self.host.get('hostname')}; engine frozen in {self.engine['frozen_dir']}"]
        for m, xs in self.measures.items():
            lines.append(f"  {m}: {len(xs)} rounds, tok/s {min(xs):,.1f}-{max(xs):,.1f}")
        return lines + [f"baseline: {len(self.measures)} measures ({self.seconds:.0f} s)"]


@dataclass
class BaselineCheck:
    """Now (B) against the re-run recorded configuration (A), per measure; and the recorded one now vs then."""

    version: int
    baseline: str
    recorded_at: str
    recorded_host: dict
    host: dict
    gate: dict
    since_recording: dict = field(default_factory=dict)
    decision: str = "ok"
    max_regression: float = 0.10

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        a, b = self.gate["a"], self.gate["b"]
        lines = [f"A: the recorded configuration re-run now (engine {a['engine_commit']} frozen, "
                 f"{Path(a['model']).name}, -t {a['threads']}); B: now (engine {b['engine_commit']} in "
                 f"{b['engine_dir']}, {Path(b['model']).name}, -t {b['threads']})"]
        lines += [f"{m}: {v['line']}" for m, v in self.gate["verdicts"].items()]
        moved = ", ".join(f"{m} {s['ratio']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"
                          for m, s in self.since_recording.items())
        if moved:
            lines.append(f"the recorded configuration now / at recording ({self.recorded_at}): {moved}; that is the "
                         "machine's move, which the paired verdict does not count")
        if self.recorded_host.get("hostname") != self.host.get("hostname"):
            lines.append(f"recorded on {self.recorded_host.get('hostname')}, run on {self.host.get('hostname')}: the "
                         "verdict still holds (A and B both ran here)")
        return lines + [f"gate: {self.decision} ({self.gate['seconds']:.0f} s)"]


# ---------------------------------------------------------------- identities and the frozen engine

def frozen_files(bin_dir: Path) -> list[Path]:
    """What a frozen engine keeps: llama-bench, llama-server and every shared library beside them."""
    return sorted(p for p in Path(bin_dir).iterdir()
                  if p.name in FROZEN_TOOLS or ".so" in p.name or p.suffix == ".dylib")


def engine_digest(bin_dir: Path) -> str:
    """sha256 over the frozen files' names and contents (a link by its target's name)."""
    h = hashlib.sha256()
    for p in frozen_files(bin_dir):
        h.update(p.name.encode() + b"\0")
        h.update((b"->" + os.readlink(p).encode()) if p.is_symlink() else file_sha256(p).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def outside_libraries(bin_dir: Path) -> list[str]:
    """llama.cpp's libraries (libllama*, libggml*, libmtmd*) that the frozen llama-bench would load from outside
    its folder, or not find (Linux: ldd; elsewhere nothing is checked). A build with an absolute RPATH to its build
    folder would run a later rebuild's libraries, so a copy of it is no frozen engine."""
    if not shutil.which("ldd"):
        return []
    done = subprocess.run(["ldd", str(Path(bin_dir) / "llama-bench")], capture_output=True, text=True, check=False)
    bad = []
    for line in done.stdout.splitlines():
        name, _, where = line.strip().partition(" => ")
        if name.startswith(("libllama", "libggml", "libmtmd")):
            path = where.split(" (", 1)[0].strip()
            if path == "not found" or Path(path).parent.resolve() != Path(bin_dir).resolve():
                bad.append(f"{name} ({path})")
    return bad


def frozen_root() -> Path:
    return cache_root() / "baselines" / "engines"


def freeze_engine(engine: Engine) -> tuple[Path, str]:
    """Copy the engine's tools and libraries into the cache under their digest (once); its bin folder and digest."""
    engine.tool("llama-bench")
    digest = engine_digest(engine.bin_dir)
    dest = frozen_root() / digest.split(":", 1)[1][:24]
    if (dest / "bin").is_dir() and engine_digest(dest / "bin") == digest:
        return dest / "bin", digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / "bin").mkdir()
        for p in frozen_files(engine.bin_dir):
            shutil.copy2(p, tmp / "bin" / p.name, follow_symlinks=False)
        outside = outside_libraries(tmp / "bin")
        if outside:
            raise CcmoeError(f"the engine's llama-bench in {engine.bin_dir} loads {', '.join(outside[:3])} from outside "
                             "its folder, so a copy of it would not stay frozen",
                             "use `ccmoe-run engine build`, or build llama.cpp with -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except CcmoeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CcmoeError(f"cannot freeze the engine into {dest.parent} ({e.strerror or e})",
                         "free space in the cache (CCMOE_CACHE_DIR) and record again", EXIT_RESOURCE) from None
    return dest / "bin", digest


def engine_info(engine: Engine, frozen: Path, digest: str) -> dict:
    return {"key": engine.key, "commit": engine.commit, "backend": engine.backend, "flags": list(engine.flags),
            "source_dir": str(engine.bin_dir), "frozen_dir": str(frozen), "digest": digest}


# ---------------------------------------------------------------- record

def record_baseline(side: Side, depths: list[int], rounds: int, out: Path, force: bool = False, serve: bool = False,
                    progress=None) -> Baseline:
    """`bench --record`: freeze the configuration and take `rounds` samples of each measure, measures in turn."""
    check_writable(Path(out), force, what="baseline")
    check_side(side, "the recorded")
    if rounds < 2:
        raise CcmoeError(f"--runs {rounds} is too few rounds to record", "pass --runs 5 or more")
    started = time.monotonic()
    frozen, digest = freeze_engine(side.engine)
    measures = measures_for(depths, serve)
    samples: dict[str, list[float]] = {m: [] for m in measures}
    for i in range(rounds):
        for m in measures:
            samples[m].append(served_round({"x": side}, m, ("x",))["x"] if m.startswith("serve:") else one_run(side, m))
        if progress:
            progress(f"round {i + 1}/{rounds}: " + ", ".join(f"{m} {v[-1]:,.1f}" for m, v in samples.items()))
    got = Baseline(BASELINE_VERSION, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), host_id(),
                   engine_info(side.engine, frozen, digest),
                   {"path": str(Path(side.model).resolve()), "digest": model_digest(side.model),
                    "bytes": Path(side.model).stat().st_size},
                   side.threads, list(side.flags), REPS, samples, round(time.monotonic() - started, 1))
    save_artifact(Path(out), BASELINE_KIND, BASELINE_VERSION, got, force=force)
    return got


# ---------------------------------------------------------------- check

def load_baseline(path: Path) -> dict:
    """A baseline written by `bench --record`, its kind, version and fields checked."""
    try:
        doc = json.loads(read_text(Path(path), "baseline"))
    except json.JSONDecodeError:
        doc = None
    fix = "record one with `ccmoe-run bench --record FILE`"
    if not isinstance(doc, dict) or doc.get("schema") != f"{SCHEMA_PREFIX}/{BASELINE_KIND}":
        raise CcmoeError(f"{path} holds no bench result recorded by `bench --record`", fix)
    if not isinstance(doc.get("version"), int) or doc["version"] > BASELINE_VERSION:
        raise CcmoeError(f"{path} has baseline version {doc.get('version')}, this ccmoe-run reads up to "
                         f"{BASELINE_VERSION}", "upgrade ccmoe-runtime or record it again")
    e, m, xs = doc.get("engine"), doc.get("model"), doc.get("measures")
    if not (isinstance(e, dict) and {"frozen_dir", "digest", "backend", "key", "commit", "flags"} <= set(e)
            and isinstance(m, dict) and {"path", "digest", "bytes"} <= set(m)
            and isinstance(doc.get("threads"), int) and doc["threads"] > 0 and isinstance(xs, dict) and xs
            and all(isinstance(k, str) and isinstance(v, list) for k, v in xs.items())):
        raise CcmoeError(f"{path} is a damaged bench baseline (engine, model, threads or measures missing)", fix)
    return doc


def recorded_side(doc: dict, path: Path) -> Side:
    """The recorded configuration, runnable now: the frozen engine (digest checked) and the unchanged model."""
    e, m = doc["engine"], doc["model"]
    frozen = Path(e["frozen_dir"])
    redo = f"record the baseline again on this machine (`ccmoe-run bench --record {path} --force`)"
    if not (frozen / "llama-bench").is_file():
        raise CcmoeError(f"the engine frozen for {path} is gone ({frozen})", redo)
    if engine_digest(frozen) != e["digest"] or outside_libraries(frozen):
        raise CcmoeError(f"the engine frozen for {path} changed since recording ({frozen})", redo)
    model = Path(m["path"])
    if not model.is_file():
        raise CcmoeError(f"the recorded model {model} is gone", f"restore it, or {redo}")
    if model.stat().st_size != m["bytes"] or model_digest(model) != m["digest"]:
        raise CcmoeError(f"the recorded model {model} changed since recording (its digest differs)",
                         f"keep the recorded file and gate a new one with --model-b, or {redo}")
    engine = Engine(bin_dir=frozen, backend=e["backend"], key=e["key"], commit=e["commit"], flags=e["flags"],
                    origin="baseline")
    return Side(engine, model, int(doc["threads"]), list(doc.get("flags") or []))


def check_baseline(path: Path, current: Side, max_regression: float, max_seconds: float,
                   progress=None, history: Path | None = None) -> BaselineCheck:
    """`bench --baseline`: paired rounds of the recorded configuration re-run now (A) and `current` (B), one verdict
    per measure; beside it, the recorded configuration now against its recorded rounds (`since_recording`)."""
    doc = load_baseline(path)
    a = recorded_side(doc, Path(path))
    measures = list(doc["measures"])
    depths = [int(m.split("@d", 1)[1]) for m in measures if m.startswith("tg@d") and m[4:].isdigit()]
    gate = run_gate(a, current, depths, max_regression, max_seconds, progress,
                    serve=any(m.startswith("serve:") for m in measures), history=history)
    since = {}
    for m, v in gate.verdicts.items():
        then = doc["measures"].get(m) or []
        if len(then) >= 2 and len(v["samples"]["a"]) >= 2:
            u = unpaired_verdict(then, v["samples"]["a"], max_regression)
            since[m] = {"ratio": round(u.ratio, 4), "low": round(u.low, 4), "high": round(u.high, 4),
                        "confidence": u.confidence}
    return BaselineCheck(GATE_VERSION, str(path), doc.get("recorded_at", "?"), doc.get("host") or {}, host_id(),
                         gate.to_dict(), since, gate.decision, max_regression)


def gate_of(check: BaselineCheck) -> GateResult:
    """The check's gate result, for `raise_on_regression`."""
    g = dict(check.gate)
    return GateResult(**g)

