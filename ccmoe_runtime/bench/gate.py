"""A/B tokens/s gate: paired, alternating llama-bench rounds of two contenders; one verdict per measure (issue 19)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import CcmoeError
from ..engine.build import Engine
from ..engine.tools import describe_exit, run_measured
from .verdict import decide, summary_line

GATE_VERSION = 1
N_PROMPT, N_GEN, REPS = 64, 32, 5


@dataclass
class Side:
    """One contender: an engine, a model and a thread count."""

    engine: Engine
    model: Path
    threads: int


@dataclass
class GateResult:
    """B against A per measure ("pp", "tg@d0", "tg@d512", ...): each a verdict's dict; `decision` the worst."""

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


def measure_args(measure: str) -> list[str]:
    """llama-bench flags that time one measure: "pp" (prompt) or "tg@dN" (decode after N cached tokens)."""
    if measure == "pp":
        return ["-p", str(N_PROMPT), "-n", "0"]
    return ["-p", "0", "-n", str(N_GEN), "-d", measure.split("@d", 1)[1]]


def one_run(side: Side, measure: str) -> float:
    """Best repetition's tokens/s of one llama-bench process (noise only ever slows a run down)."""
    cmd = [str(side.engine.tool("llama-bench")), "-m", str(side.model), "-r", str(REPS), "-o", "json",
           "-t", str(side.threads), *measure_args(measure)]
    rc, out, err, _ = run_measured(cmd, 600)
    if rc:
        raise CcmoeError(f"llama-bench failed on {side.model} ({describe_exit(rc) if rc else 'timed out'})",
                         "run `ccmoe-run engine info` to check the engine", 3)
    rows = json.loads(out)
    return max(rows[0].get("samples_ts") or [rows[0]["avg_ts"]])


def worst(decisions: list[str]) -> str:
    """regression over inconclusive over ok."""
    return next((d for d in ("regression", "inconclusive") if d in decisions), "ok")


def run_gate(a: Side, b: Side, depths: list[int], max_regression: float, max_seconds: float,
             progress=None) -> GateResult:
    """Each measure gets paired rounds (order swapped every round) until `decide` is conclusive or its share of
    `max_seconds` is spent; a regression only when the interval lies wholly below 1 - max_regression."""
    measures = ["pp"] + [f"tg@d{d}" for d in (depths or [0])]
    started = time.monotonic()
    result = GateResult(GATE_VERSION, describe(a), describe(b), max_regression)
    for m in measures:
        turn = [0]

        def next_round(m=m, turn=turn):
            turn[0] += 1
            if turn[0] % 2:
                x = one_run(a, m)
                return x, one_run(b, m)
            y = one_run(b, m)
            return one_run(a, m), y

        v = decide(next_round, max_regression, time_limit_s=max_seconds / len(measures))
        result.verdicts[m] = {**v.to_dict(), "line": summary_line(v)}
        if progress:
            progress(f"{m}: {summary_line(v)}")
    result.decision = worst([v["decision"] for v in result.verdicts.values()])
    result.seconds = round(time.monotonic() - started, 1)
    return result


def describe(side: Side) -> dict:
    """What a history line needs of a contender."""
    return {"engine": side.engine.key, "engine_dir": str(side.engine.bin_dir), "model": str(side.model),
            "threads": side.threads}
