"""Tokens/s regression benchmark: ccmoe's placement and llama.cpp's own placements, alternating, repeated."""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import EXIT_USAGE, CcmoeError
from ..core.units import human_size
from ..devices.detect import environment_threads
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine, tool_version
from ..engine.tools import N_GEN, N_PROMPT, llama_bench
from ..model.inventory import read_gguf, require_moe, summarize
from ..placement.costmodel import load_factors
from ..placement.layout import Settings
from ..placement.search import place
from .history import append_history, check_history

BENCH_VERSION = 7        # 3: bandwidth_share per pool, from the measured bandwidths; 4: processes_per_round;
#                          5: the contenders' processes interleaved within a round, up to 8, of 1 repetition or more;
#                          6: at least 8 repetitions per round (3 before) unless a round would last over a minute;
#                             round_drift (the rounds' move common to all contenders); 7: no `regressions` (the
#                             median threshold is gone: --baseline is the gate's paired verdict)
MIN_ROUND_S = 5.0         # measured work per contender per round: short runs are at the mercy of the machine
MIN_REPS, MAX_REPS = 8, 100     # a round's sample is its best repetition: best of 8 at least
MAX_ROUND_S = 60.0
MAX_PROCESSES = 8         # a contender that starts fast runs its round in up to 8 processes, best one counted


@dataclass
class Contender:
    """One placement's tokens/s over the rounds: median, range and spread of prompt (pp) and generation (tg)."""

    args: list[str]
    error: str | None = None
    reps_per_round: int | None = None
    processes_per_round: int | None = None
    pp: dict | None = None
    tg: dict | None = None
    round_medians: dict | None = None
    peak_rss_bytes: int | None = None
    predicted: dict | None = None          # ccmoe's own: the cost model's pp and tg
    bandwidth_share: float | None = None   # ... and the share of a token's time its bytes take at measured bandwidth

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class BenchResult:
    """A bench run: every contender's tokens/s, the machine's own speed and drift."""

    version: int
    model: str
    model_hash: str
    device: str
    backend: str
    engine: str
    engine_version: str
    runs: int
    min_round_s: float
    notes: list[str]
    host_speed: dict | None
    round_drift: dict
    n_prompt: int
    n_gen: int
    contenders: dict[str, Contender]

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "contenders"},
                "contenders": {n: c.to_dict() for n, c in self.contenders.items()}}

    def summary_lines(self) -> list[str]:
        lines = [f"{Path(self.model).name} on {self.device} ({self.backend}), {self.runs} rounds, "
                 f"pp{self.n_prompt} / tg{self.n_gen} tok/s: median (min-max, spread)"]
        for name, c in self.contenders.items():
            if c.error:
                lines.append(f"  {name:<18} failed: {c.error}")
                continue
            pp, tg = c.pp, c.tg
            line = (f"  {name:<18} pp {pp['median']:>10,.1f} ({pp['min']:,.1f}-{pp['max']:,.1f}, {pp['spread']:.1%})"
                    f"   tg {tg['median']:>9,.1f} ({tg['min']:,.1f}-{tg['max']:,.1f}, {tg['spread']:.1%})"
                    f"   peak RSS {human_size(c.peak_rss_bytes)}")
            if c.predicted:
                line += (f"   predicted pp {c.predicted['pp']:,.1f} tg {c.predicted['tg']:,.1f}; "
                         f"{c.bandwidth_share:.0%} of the bandwidth limit")
            lines.append(line)
        lines += [f"  ccmoe placement: {note}" for note in self.notes]
        machine = self.host_speed
        if machine and machine["spread"] and machine["spread"] > 0.1:
            lines.append(f"  note: this machine's own speed (a fixed CPU loop, no llama.cpp) varied "
                         f"{machine['spread']:.0%} between rounds; tokens/s spreads of that size are the machine's, "
                         "not the engine's")
        drift = {k: v["spread"] for k, v in (self.round_drift or {}).items() if v and v["spread"] > 0.05}
        if drift:
            moved = " and ".join(f"{v:.0%} ({k})" for k, v in drift.items())
            lines.append(f"  note: all contenders moved together by {moved} from round to round: the machine's speed "
                         "changed during the run; rerun on a quiet machine before reading a spread as the engine's")
        return lines


def bench_model(engine: Engine, model: Path, device: DeviceProfile, runs: int = 5, threads: int | None = None,
                progress=None, min_round_s: float = MIN_ROUND_S, load_mode: str | None = None,
                cpu_repack: bool | None = None, history: Path | None = None) -> BenchResult:
    """`ccmoe-run bench`: the history is checked first, then the rounds run; the result is appended to `history`.
    Regressions are the gate's business (bench/gate.py, bench/baseline.py: one verdict, with its interval)."""
    if runs < 1:
        raise CcmoeError(f"--runs {runs} is not a positive count", "pass --runs 3 or more", EXIT_USAGE)
    if history:
        check_history(history)
    require_moe(summarize(read_gguf(model)), str(model))
    result = run_bench(engine, model, device, runs, threads, progress, min_round_s, load_mode, cpu_repack)
    if history:
        append_history(history, "bench", result.to_dict())
    return result


def quick_hash(path: Path, edge: int = 16 << 20) -> str:
    """sha256 of the size, the first and the last 16 MiB: identifies a 100 GB model in a second."""
    size = Path(path).stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if size > 2 * edge:
            f.seek(size - edge)
            h.update(f.read(edge))
    return "quick-sha256:" + h.hexdigest()


def spread(samples: list[float], digits: int = 2) -> dict:
    """Median, range, relative spread ((max - min) / median) and coefficient of variation of repeated runs."""
    med = statistics.median(samples)
    cv = statistics.stdev(samples) / statistics.mean(samples) if len(samples) > 1 and statistics.mean(samples) else 0.0
    return {"median": round(med, digits), "min": round(min(samples), digits), "max": round(max(samples), digits),
            "spread": round((max(samples) - min(samples)) / med, 4) if med else None, "cv": round(cv, 4),
            "samples": [round(s, digits) for s in samples]}


def round_drift(samples: dict[str, list[float]]) -> dict | None:
    """How far all contenders moved together from round to round: per round, the geometric mean over contenders of
    each one's sample relative to its own median, and the spread of that. A shared move is the machine's speed
    (the contenders alternate within a round), not one placement's; None with fewer than 2 complete contenders."""
    rows = [v for v in samples.values() if v and all(x > 0 for x in v)]
    rounds = {len(v) for v in rows}
    if len(rows) < 2 or len(rounds) != 1:
        return None
    common = [math.exp(statistics.fmean(math.log(v[i] / statistics.median(v)) for v in rows))
              for i in range(rounds.pop())]
    return spread(common, digits=4)


def host_speed(loops: int = 40_000, tries: int = 5) -> float:
    """Iterations per second of a fixed pure-Python loop, best of `tries` (about 25 ms in all): this machine's own
    speed at that moment, measured without llama.cpp and with the same best-of estimator as the rounds, to tell a
    noisy machine from a noisy engine."""
    best = 0.0
    for _ in range(tries):
        started, x = time.perf_counter(), 0
        for i in range(loops):
            x += i * i
        best = max(best, loops / (time.perf_counter() - started))
    return best


def seconds_per_rep(warm: dict) -> float:
    """Measured work of one repetition (a prompt and a generation) at the warm-up's median speeds."""
    return N_PROMPT / statistics.median(warm["pp"]) + N_GEN / statistics.median(warm["tg"])


def reps_for(warm: dict, min_round_s: float) -> int:
    """Repetitions per round: enough for `min_round_s` seconds of measured work, and at least MIN_REPS unless
    that makes a round last over a minute (a huge model). Repetitions of seconds each (experts in host memory
    behind a GPU) are few draws of a VM's vCPU phases: if half the moments are slow, all of 3 are slow one round
    in 8, all of 8 one round in 256."""
    per_rep = seconds_per_rep(warm)
    floor = max(1, min(MIN_REPS, int(MAX_ROUND_S / per_rep)))
    return max(floor, min(MAX_REPS, math.ceil(min_round_s / per_rep)))


def processes_for(warm: dict, reps: int) -> int:
    """Processes a round's repetitions are split over: as many as cost no more start-up time than the round's work,
    one repetition each at least (up to MAX_PROCESSES). A VM's vCPUs change speed from second to second, and
    repetitions back to back in one process share a phase: the best of several processes seconds apart
    (`interleaved_round`) is steady where one is a draw. A large model's load time keeps it at one."""
    per_rep = seconds_per_rep(warm)
    start_up = max(warm["wall_s"] - len(warm["tg"]) * per_rep, 0.05)
    return max(1, min(MAX_PROCESSES, reps, int(reps * per_rep / start_up)))


def pooled(runs: list[dict]) -> dict:
    """A contender's processes of one round as one result: all repetitions, the highest peak RSS; the first failure."""
    failed = next((r for r in runs if not r["ok"]), None)
    if failed:
        return failed
    return {"ok": True, "args": runs[0]["args"], "pp": [x for r in runs for x in r["pp"]],
            "tg": [x for r in runs for x in r["tg"]], "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "wall_s": sum(r["wall_s"] for r in runs), "process_starts": [r["started_s"] for r in runs]}


def interleaved_round(engine: Engine, model: Path, args: dict[str, list[str]], reps: dict[str, int],
                      processes: dict[str, int], machine: list[float]) -> dict[str, dict]:
    """One round of every contender, their processes taken in turn (a's 1st, b's 1st, ..., a's 2nd, ...), so that
    one contender's processes lie seconds apart. A VM's vCPUs change speed every second or so (a busy hyperthread
    sibling on the host; on the H200 a process ran 1,000 prompt repetitions at 250k tok/s, then 2,000 at 350k),
    and processes run back to back would share one slow phase. The machine's own speed is read before each
    contender's first process and appended to `machine`."""
    runs: dict[str, list[dict]] = {name: [] for name in args}
    for slot in range(max((processes[name] for name in args), default=0)):
        for name, flags in args.items():
            if slot >= processes[name] or (runs[name] and not runs[name][-1]["ok"]):
                continue
            if slot == 0:
                machine.append(host_speed())
            runs[name].append(llama_bench(engine, model, flags, reps=math.ceil(reps[name] / processes[name])))
    return {name: pooled(r) for name, r in runs.items()}


def contenders(engine: Engine, model: Path, device: DeviceProfile, threads: int | None = None,
               load_mode: str | None = None, cpu_repack: bool | None = None) -> dict:
    """Name -> llama-bench flags: ccmoe's placement and, on a GPU, llama.cpp's --fit, exps=CPU and all-on-GPU."""

    base_threads = threads or min(device.threads, environment_threads())   # a profile's count may exceed this host's
    inv = read_gguf(model)
    p = place(inv, device, load_factors(device), Settings(ctx=N_PROMPT, kv_type="f16", depth=N_GEN // 2,
                                                          n_prompt=N_PROMPT, threads=threads, load_mode=load_mode,
                                                          cpu_repack=cpu_repack),
              engine, model,
              trial=device.backend == "cuda")
    reads = {k: v for k, v in p.predicted_empty.seconds_per_token.items() if k not in ("fixed", "splits")}
    found = {"ccmoe": {"args": p.bench_args() + ["-t", str(p.threads)], "predicted": p.predicted_empty.to_dict(),
                       "read_s": sum(reads.values()),     # a token's bytes at each pool's measured bandwidth
                       "cpu_expert_layers": p.cpu_expert_layers, "notes": p.notes}}
    threads_args = ["-t", str(base_threads)]             # llama.cpp's placements: the user's or the profile's threads
    if device.backend == "cpu":
        found["llama.cpp default"] = {"args": []}
    else:
        found["fit"] = {"args": ["-fitt", "1024"] + threads_args}
        found["exps=CPU"] = {"args": ["-ngl", "999", "-ot", "exps=CPU"] + threads_args}
        if not p.has_host_weights:                       # everything (but token_embd, as llama.cpp does) on the GPU
            found["all-gpu"] = {"args": ["-ngl", "999"] + threads_args}
    return found


def best_n_cpu_moe(engine: Engine, model: Path, n_moe_layers: int, start: int, threads: int) -> int | None:
    """The fewest --n-cpu-moe layers that run the measured work, searched down from `start` (one short llama-bench
    each, with the full prompt: a prompt's compute buffer is larger than a decode's, so a decode-only probe passes
    counts whose pp512 then runs out of memory)."""
    found = None
    for n in range(max(start, 0), -1, -1):
        r = llama_bench(engine, model, ["-ncmoe", str(n), "-t", str(threads)], n_prompt=N_PROMPT, n_gen=8)
        if not r["ok"]:
            break
        found = n
    if found is None:
        for n in range(start + 1, n_moe_layers + 1):
            if llama_bench(engine, model, ["-ncmoe", str(n), "-t", str(threads)], n_prompt=N_PROMPT, n_gen=8)["ok"]:
                return n
    return found


def run_bench(engine: Engine, model: Path, device: DeviceProfile, runs: int = 5, threads: int | None = None,
              progress=None, min_round_s: float = MIN_ROUND_S, load_mode: str | None = None,
              cpu_repack: bool | None = None) -> BenchResult:
    """Every contender `runs` times, alternating (each round runs all of them once), with medians and spread.

    A warm-up round (not counted) times each contender and sets its repetitions per round, so that a round's
    measured work lasts at least `min_round_s`; a round's sample is its best repetition (the machine's noise only
    ever slows a run down, as Python's timeit argues), and its median repetition is kept beside it. A contender
    that starts fast splits its round over several processes (`processes_for`), taken in turn with the other
    contenders' (`interleaved_round`), and the best process counts."""

    if runs < 1:
        raise CcmoeError(f"--runs {runs} is not a positive count", "pass --runs 3 or more", EXIT_USAGE)
    say = progress or (lambda _msg: None)
    found = contenders(engine, model, device, threads, load_mode, cpu_repack)
    if device.backend != "cpu":
        s = summarize(read_gguf(model))
        start = found["ccmoe"]["cpu_expert_layers"]          # search llama.cpp's layer count from ccmoe's
        t = found["fit"]["args"][found["fit"]["args"].index("-t") + 1]
        n = best_n_cpu_moe(engine, model, len(s.moe_layers), start, int(t))
        if n is not None:
            found[f"n-cpu-moe={n}"] = {"args": ["-ncmoe", str(n), "-t", t]}
    samples = {name: {"pp": [], "tg": [], "pp_median": [], "tg_median": [], "rss": []} for name in found}
    errors, reps, processes = {}, {}, {}
    for name, c in found.items():
        warm = llama_bench(engine, model, c["args"], reps=3)
        if not warm["ok"]:
            errors[name] = warm["error"]
            continue
        reps[name] = reps_for(warm, min_round_s)
        processes[name] = processes_for(warm, reps[name])
        if reps[name] > 3:                          # a short probe: warm up for a whole round as well
            warm = interleaved_round(engine, model, {name: c["args"]}, reps, processes, [])[name]
            if not warm["ok"]:
                errors[name] = warm["error"]
                continue
        samples[name]["rss"].append(warm["peak_rss_bytes"])
        say(f"warm-up {name}: pp {statistics.median(warm['pp']):.1f} tg {statistics.median(warm['tg']):.1f} tok/s; "
            f"{reps[name]} repetitions per round in {processes[name]} process(es)")
    machine = []
    for i in range(runs):
        active = {name: c["args"] for name, c in found.items() if name not in errors}
        for name, r in interleaved_round(engine, model, active, reps, processes, machine).items():
            if not r["ok"]:
                errors[name] = r["error"]
                continue
            for key in ("pp", "tg"):            # one sample per round: its best repetition in its best process
                samples[name][key].append(max(r[key]))
                samples[name][key + "_median"].append(statistics.median(r[key]))
            samples[name]["rss"].append(r["peak_rss_bytes"])
            say(f"round {i + 1}/{runs} {name}: pp {samples[name]['pp'][-1]:.1f} tg {samples[name]['tg'][-1]:.1f} tok/s")
    counted = {name: samples[name] for name in found if name not in errors}
    drift = {key: round_drift({name: got[key] for name, got in counted.items()}) for key in ("pp", "tg")}
    result = {}
    for name, c in found.items():
        if name in errors:
            result[name] = Contender(c["args"], error=errors[name])
            continue
        tg = spread(samples[name]["tg"])
        entry = Contender(c["args"], reps_per_round=reps[name], processes_per_round=processes[name],
                          pp=spread(samples[name]["pp"]), tg=tg,
                          round_medians={k: spread(samples[name][k + "_median"]) for k in ("pp", "tg")},
                          peak_rss_bytes=max(samples[name]["rss"]))
        if "read_s" in c:           # the share of a generated token's time its bytes take at measured bandwidth
            entry.predicted = {"pp": c["predicted"]["prompt_tps"], "tg": c["predicted"]["decode_tps"]}
            entry.bandwidth_share = round(c["read_s"] * tg["median"], 4)
        result[name] = entry
    return BenchResult(version=BENCH_VERSION, model=str(model), model_hash=quick_hash(model), device=device.name,
                       backend=device.backend, engine=engine.key, engine_version=tool_version(engine), runs=runs,
                       min_round_s=min_round_s, notes=found["ccmoe"].get("notes", []),
                       host_speed=spread(machine) if machine else None, round_drift=drift, n_prompt=N_PROMPT,
                       n_gen=N_GEN, contenders=result)
