"""Tokens/s gate: paired, alternating rounds of two contenders, one verdict per measure (issue 19).

A contender (`Side`) is an engine, a model, a thread count and extra llama-bench flags. A measure is "pp" (prompt),
"tg@dN" (decode after N cached tokens, llama-bench -d) or "serve:tg" / "serve:pp" (llama-server's own timings
answering an OpenAI chat request, bench/serving.py). Every measure gets paired rounds, A and B seconds apart, the
order swapped every round, until `verdict.decide` is conclusive or the measure's share of the time is spent.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.artifacts import file_sha256
from ..core.errors import EXIT_REGRESSION, CcmoeError
from ..engine.build import Engine
from ..engine.tools import run_measured, tool_failure
from ..model.inventory import read_gguf
from .bench import quick_hash
from .history import append_history, check_history
from .serving import paired_served
from .verdict import decide, summary_line

GATE_VERSION = 2         # 2: measures "serve:tg"/"serve:pp"; a side's flags; verdict lines hold only the verdict
N_PROMPT, N_GEN, REPS = 64, 32, 5
RUN_TIMEOUT_S = 600
FULL_HASH_BYTES = 1 << 30       # models up to 1 GiB get a full sha256; larger ones the size and both ends


@dataclass
class Side:
    """One contender: an engine, a model, a thread count and extra llama-bench flags."""

    engine: Engine
    model: Path
    threads: int
    flags: list[str] = field(default_factory=list)


@dataclass
class GateResult:
    """B against A per measure ("pp", "tg@d0", "serve:tg", ...): each a verdict's dict; `decision` the worst."""

    version: int
    a: dict
    b: dict
    max_regression: float
    verdicts: dict = field(default_factory=dict)
    decision: str = "ok"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        return [f"{m}: {v['line']}" for m, v in self.verdicts.items()] + [f"gate: {self.decision} ({self.seconds:.0f} s)"]


def measures_for(depths: list[int], serve: bool = False) -> list[str]:
    """The gate's measures: prompt, decode at each depth (0 when none), and with `serve` llama-server's timings."""
    return ["pp"] + [f"tg@d{d}" for d in (depths or [0])] + (["serve:tg", "serve:pp"] if serve else [])


def measure_args(measure: str) -> list[str]:
    """llama-bench flags that time one measure: "pp" (prompt) or "tg@dN" (decode after N cached tokens)."""
    if measure == "pp":
        return ["-p", str(N_PROMPT), "-n", "0"]
    if not measure.startswith("tg@d"):
        raise ValueError(f"{measure!r} is not a llama-bench measure")
    return ["-p", "0", "-n", str(N_GEN), "-d", measure.split("@d", 1)[1]]


def one_run(side: Side, measure: str) -> float:
    """Best repetition's tokens/s of one llama-bench process (noise only ever slows a run down)."""
    cmd = [str(side.engine.tool("llama-bench")), "-m", str(side.model), "-r", str(REPS), "-o", "json",
           "-t", str(side.threads), *side.flags, *measure_args(measure)]
    rc, out, err, _ = run_measured(cmd, RUN_TIMEOUT_S)
    if rc is None or rc:
        raise tool_failure("llama-bench", f"{side.model} ({measure})", rc, err + "\n" + out,
                           "check the model and flags with `ccmoe-run engine info` and a plain `ccmoe-run bench`")
    try:
        row = json.loads(out)[0]
        return float(max(row.get("samples_ts") or [row["avg_ts"]]))
    except (json.JSONDecodeError, IndexError, KeyError, TypeError, ValueError):
        raise CcmoeError(f"llama-bench printed no tokens/s for {side.model} ({measure})",
                         "run `ccmoe-run engine info` to check the engine", 3) from None


def check_side(side: Side, what: str) -> None:
    """Before any round: the model is a readable GGUF and the engine has llama-bench (one-line errors)."""
    read_gguf(side.model)
    side.engine.tool("llama-bench")
    if side.threads < 1:
        raise CcmoeError(f"{what} threads {side.threads} is not a positive count", "pass -t 1 or more")


def worst(decisions: list[str]) -> str:
    """regression over inconclusive over ok."""
    return next((d for d in ("regression", "inconclusive") if d in decisions), "ok")


def paired_rounds(run_a, run_b):
    """next_round for `decide`: A then B on odd rounds, B then A on even ones."""
    turn = [0]

    def next_round():
        turn[0] += 1
        if turn[0] % 2:
            x = run_a()
            return x, run_b()
        y = run_b()
        return run_a(), y

    return next_round


def run_gate(a: Side, b: Side, depths: list[int], max_regression: float, max_seconds: float,
             progress=None, serve: bool = False, history: Path | None = None) -> GateResult:
    """Each measure gets paired rounds until `decide` is conclusive or its share of `max_seconds` is spent; a
    regression only when the interval lies wholly below 1 - max_regression. `progress` gets one line per look;
    the result is appended to `history` (checked before the first round)."""
    check_side(a, "A's")
    check_side(b, "B's")
    if history:
        check_history(history)
    measures = measures_for(depths, serve)
    started = time.monotonic()
    result = GateResult(GATE_VERSION, describe(a), describe(b), max_regression)
    for m in measures:
        rounds = paired_served(a, b, m) if m.startswith("serve:") else \
            paired_rounds(lambda m=m: one_run(a, m), lambda m=m: one_run(b, m))
        look = (lambda v, m=m: progress(f"  {m}: look at {v.rounds} rounds: B/A {v.ratio:.3f} "
                                        f"[{v.low:.3f}, {v.high:.3f}]")) if progress else None
        v = decide(rounds, max_regression, time_limit_s=max_seconds / len(measures), progress=look)
        result.verdicts[m] = {**v.to_dict(), "line": summary_line(v)}
    result.decision = worst([v["decision"] for v in result.verdicts.values()])
    result.seconds = round(time.monotonic() - started, 1)
    if history:
        append_history(history, "gate", history_record(result))
    return result


def history_record(result: GateResult) -> dict:
    """A history line of a gate: both contenders (engine, model digest, threads), each measure's interval."""
    keep = ("decision", "ratio", "low", "high", "confidence", "overall_confidence", "rounds", "machine_moved",
            "elapsed_s")
    return {"a": result.a, "b": result.b, "max_regression": result.max_regression, "decision": result.decision,
            "seconds": result.seconds,
            "measures": {m: {k: _finite(v[k]) for k in keep} for m, v in result.verdicts.items()}}


def _finite(x):
    """inf (an interval no rounds could bound) as None: JSON has no inf."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


def raise_on_regression(result: GateResult, against: str = "A") -> None:
    """Exit 6 with one line naming the measures that regressed, when any did."""
    if result.decision == "regression":
        bad = [f"{m} {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for m, v in result.verdicts.items()
               if v["decision"] == "regression"]
        raise CcmoeError(f"tokens/s regressed against {against} beyond the interval: " + ", ".join(bad),
                         f"limit {1 - result.max_regression:.3f}", EXIT_REGRESSION)


def model_digest(path: Path) -> str:
    """sha256 of the model's content up to 1 GiB; beyond that quick-sha256 (size, first and last 16 MiB)."""
    path = Path(path)
    if path.stat().st_size <= FULL_HASH_BYTES:
        return "sha256:" + file_sha256(path)
    return quick_hash(path)


def describe(side: Side) -> dict:
    """What a history line needs of a contender: engine (key, commit, backend), model and its digest, threads."""
    return {"engine": side.engine.key, "engine_commit": side.engine.commit, "backend": side.engine.backend,
            "engine_dir": str(side.engine.bin_dir), "model": str(side.model), "model_digest": model_digest(side.model),
            "threads": side.threads, "flags": list(side.flags)}
