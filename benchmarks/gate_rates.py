"""False-alarm and miss rates of the regression gate (ccmoe_runtime.bench.verdict.decide) with the real llama-bench.

A verdict runs paired rounds on the bundled model (ccmoe_runtime/testmodels/bundled/ccmoe-mini-moe-f16.gguf): a round is one llama-bench
process of A (the reference) and one of B (the candidate), seconds apart, their order swapped every round; each
process is scored by its best repetition of the measure (tg: generation tokens/s, as `ccmoe-run bench` scores a
round). `verdict.decide` stops at the first conclusive look, at --max-rounds or at --time-limit.

    python benchmarks/gate_rates.py probe              # which real changes slow generation, and by how much
    python benchmarks/gate_rates.py rates              # 10 verdicts with B = A (false alarms), 10 with B slower
    python benchmarks/gate_rates.py depth              # what llama-bench -d 0,512 costs and measures
    python benchmarks/gate_rates.py baseline           # the baseline-file mode: bench --record, then --baseline
    python benchmarks/gate_rates.py serve              # the serving measure serve:tg (llama-server's timings)

  probe   paired rounds of the reference (--base) against each candidate change: B/A with its interval.
  rates   --verdicts N verdicts with B's flags equal to A's (every "regression" is a false alarm) and N with
          B = A plus --slow (a real slow-down; every verdict other than "regression" is a miss), at
          --max-regression; each verdict's decision, interval, rounds and seconds, and the counts at the end.
  depth   one process with -d 0,512 against one without -d, a few times: each test's tokens/s and wall time.
  serve   --verdicts verdicts of the gate's serve:tg measure (bench/serving.py: each round two fresh llama-servers,
          OpenAI chat requests taken in turn, each side's best of 5) with B = A, and as many with B's model the
          widened one (below); --time-limit per verdict.
  baseline  records one baseline (ccmoe_runtime.bench.baseline.record_baseline: -t 1, prompt and decode at depth 0,
          --record-rounds rounds), then --verdicts checks of the same configuration against it (false alarms: any
          measure flagged) and --verdicts checks with B's model a slower file: the bundled model with the tensors
          matching --widen (default "exps|attn": experts and attention) widened from F16 to F32, decode about
          0.77x here (misses: the gate not flagged). Each check is `check_baseline` as
          `ccmoe-run bench --baseline F [--model-b SLOW.gguf] --max-seconds 2 x --time-limit` runs it.
          --hog-checks N starts N hog processes (below) after recording, for the checks only: the machine then
          differs from the one that recorded, which the old median threshold took for a regression.

--hog N runs N background processes while measuring, each switching between a busy loop and sleep at random
(0.2-3 s phases, busy half the time): a restless machine made on purpose, when the shared one happens to be
quiet. They are stopped (by their process ids) when the command ends.

Options: --base "-t 1" (A's flags), --slow "-d 80" (added to B's for the misses), -p 64 -n 32 -r 5 (a short
llama-bench run), --measure tg|pp, --max-regression 0.10, --min-rounds 5, --max-rounds 30, --time-limit 45.
Measured on the 2-core CI VM (numbers and commands in docs/results.md, "Regression gate"), A = -t 1, B = -t 1 -d 80 (decode attending
to 80 more cached tokens: tg 0.744x in a 12-round probe; -t 1 against -t 2 gave 0.81x with the machine idle but
1.18x with the machine loaded, so threads are no fixed slow-down here): 0/10 false alarms and 0/10 misses with
the machine quiet (29 s for all 20 verdicts), the same with --hog 2 (40 s). With -t 2 (llama-bench's default)
beside one busy neighbour a round took 30-60 s and both verdicts came out inconclusive at the time limit, where
the old threshold on the same rounds' medians would have flagged both (0.833 and 0.496).

Run it from the repository root with the project's environment, e.g.
    PYTHONPATH=. .venv/bin/python benchmarks/gate_rates.py rates --verdicts 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ccmoe_runtime.bench import verdict as V  # noqa: E402
from ccmoe_runtime.engine.build import find_engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "ccmoe_runtime" / "testmodels" / "bundled" / "ccmoe-mini-moe-f16.gguf"


def llama_bench(flags: list[str], n_prompt: int, n_gen: int, reps: int, timeout: float = 300) -> dict:
    """One llama-bench process: {test: [tokens/s of each repetition]} (tests "pp", "tg", "pp@d512", ...) and
    its wall time."""
    cmd = [str(find_engine().bin_dir / "llama-bench"), "-m", str(MODEL), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(reps), "-o", "json", *flags]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        raise SystemExit(f"llama-bench {' '.join(flags)} failed: {done.stderr.strip().splitlines()[-1:]}")
    out = {"wall_s": time.monotonic() - started}
    for row in json.loads(done.stdout):
        name = "pp" if row["n_prompt"] else "tg"
        samples = row.get("samples_ts") or [row["avg_ts"]]
        out[f"{name}@d{row.get('n_depth', 0)}"] = samples
        out.setdefault(name, samples)                      # the first depth's test under its plain name
    return out


class PairedRounds:
    """next_round for verdict.decide: A's and B's llama-bench processes, order swapped every round; keeps every
    round's scores of all tests."""

    def __init__(self, a_flags: list[str], b_flags: list[str], args: argparse.Namespace):
        self.flags = {"a": a_flags, "b": b_flags}
        self.args = args
        self.log: list[dict] = []

    def __call__(self) -> tuple[float, float]:
        order = ("a", "b") if len(self.log) % 2 == 0 else ("b", "a")
        got = {}
        for who in order:
            got[who] = llama_bench(self.flags[who], self.args.n_prompt, self.args.n_gen, self.args.reps)
        self.log.append(got)
        key = self.args.measure
        return max(got["a"][key]), max(got["b"][key])

    def medians_ratio(self, key: str) -> float:
        """median(B) / median(A) over the rounds: what the old gate compared against 1 - P."""
        return float(np.median([max(r["b"][key]) for r in self.log]) / np.median([max(r["a"][key]) for r in self.log]))

    def ratio_of(self, key: str) -> float:
        """The median over rounds of B/A for another test than the one the verdict is on (for information)."""
        return float(np.median([max(r["b"][key]) / max(r["a"][key]) for r in self.log]))


def one_verdict(a_flags: list[str], b_flags: list[str], args: argparse.Namespace) -> tuple[V.Verdict, PairedRounds]:
    rounds = PairedRounds(a_flags, b_flags, args)
    v = V.decide(rounds, max_regression=args.max_regression, min_rounds=args.min_rounds,
                 max_rounds=args.max_rounds, time_limit_s=args.time_limit, confidence=args.confidence)
    return v, rounds


def probe(args: argparse.Namespace) -> None:
    base = shlex.split(args.base)
    candidates = args.candidates or ["-t 2", "-d 64", "-d 128", "-d 256", "-d 512", "-fa 1", "--poll 0",
                                     "-ctk q8_0 -ctv q8_0 -fa 1"]
    print(f"A = {args.base!r}; each candidate B = A + change, {args.rounds} paired rounds; B/A of {args.measure} "
          f"(Hodges-Lehmann, 90 % interval); -p {args.n_prompt} -n {args.n_gen} -r {args.reps}")
    for change in candidates:
        started = time.monotonic()
        rounds = PairedRounds(base, base + shlex.split(change), args)
        pairs = [rounds() for _ in range(args.rounds)]
        v = V.paired_verdict([p[0] for p in pairs], [p[1] for p in pairs], args.max_regression, 0.90)
        other = "pp" if args.measure == "tg" else "tg"
        print(f"{change:<28} B/A {v.ratio:.3f} [{v.low:.3f}, {v.high:.3f}]  ({other} {rounds.ratio_of(other):.3f}); "
              f"machine moved {v.machine_moved:.0%}; {time.monotonic() - started:.0f} s", flush=True)


def rates(args: argparse.Namespace) -> None:
    base, slow = shlex.split(args.base), shlex.split(args.base) + shlex.split(args.slow)
    print(f"gate: decide(max_regression={args.max_regression}, min_rounds={args.min_rounds}, "
          f"max_rounds={args.max_rounds}, time_limit_s={args.time_limit}, confidence={args.confidence}); "
          f"measure {args.measure}; llama-bench -p {args.n_prompt} -n {args.n_gen} -r {args.reps}")
    started = time.monotonic()
    tally = {}
    for label, b_flags, wrong in (("same", base, lambda d: d == "regression"),
                                  ("slower", slow, lambda d: d != "regression")):
        print(f"\n{label}: A = {' '.join(base)!r}, B = {' '.join(b_flags)!r}", flush=True)
        counts = {"regression": 0, "ok": 0, "inconclusive": 0}
        errors = old_errors = 0
        for i in range(args.verdicts):
            v, rounds = one_verdict(base, b_flags, args)
            counts[v.decision] += 1
            errors += wrong(v.decision)
            old = rounds.medians_ratio(args.measure)
            old_errors += wrong("regression" if old < 1 - args.max_regression else "ok")
            other = "pp" if args.measure == "tg" else "tg"
            print(f"  {i + 1:2d} {v.decision:<12} B/A {v.ratio:.3f} [{v.low:.3f}, {v.high:.3f}] "
                  f"({v.confidence:.1%}); {v.rounds} rounds, {v.looks} looks, {v.elapsed_s:.0f} s, stopped by "
                  f"{v.stopped_by}; machine moved {v.machine_moved:.0%}; medians' ratio {old:.3f}; {other} B/A "
                  f"{rounds.ratio_of(other):.3f}",
                  flush=True)
        tally[label] = (counts, errors)
        what = "false alarms" if label == "same" else "misses"
        print(f"  {what}: {errors}/{args.verdicts}  ({counts}); the old threshold on the same rounds' medians: "
              f"{old_errors}/{args.verdicts}", flush=True)
    print(f"\nfalse alarms {tally['same'][1]}/{args.verdicts}, misses {tally['slower'][1]}/{args.verdicts}; "
          f"{time.monotonic() - started:.0f} s in all")


def depth(args: argparse.Namespace) -> None:
    base = shlex.split(args.base)
    print(f"A = {args.base!r} -p {args.n_prompt} -n {args.n_gen} -r {args.reps}, with and without -d 0,512")
    for i in range(args.rounds):
        for flags in (base, base + ["-d", "0,512"]):
            r = llama_bench(flags, args.n_prompt, args.n_gen, args.reps)
            cells = ", ".join(f"{k} {max(v):.0f}" for k, v in r.items() if k != "wall_s")
            print(f"  {i + 1} {' '.join(flags):<16} {r['wall_s']:5.2f} s: best tok/s {cells}", flush=True)


def baseline(args: argparse.Namespace) -> None:
    from ccmoe_runtime.bench.baseline import check_baseline, load_baseline, record_baseline
    from ccmoe_runtime.bench.gate import Side

    engine = find_engine()
    work = Path(tempfile.mkdtemp(prefix="gate-rates-"))
    hogs = []
    try:
        slow_model = widened(MODEL, work / "bundled-widened.gguf", args.widen)
        started = time.monotonic()
        got = record_baseline(Side(engine, MODEL, 1), [0], args.record_rounds, work / "base.json")
        print(f"recorded {args.record_rounds} rounds in {time.monotonic() - started:.0f} s: " +
              ", ".join(f"{m} median {np.median(v):,.0f}" for m, v in got.measures.items()), flush=True)
        hogs = start_hogs(args.hog_checks)
        recorded = load_baseline(work / "base.json")["measures"]
        tally = {}
        for label, model, wrong in (("same", MODEL, lambda d: d == "regression"),
                                    ("slower", slow_model, lambda d: d != "regression")):
            print(f"\n{label}: B = {model.name}, -t 1, the current engine; A = the recorded configuration re-run",
                  flush=True)
            errors = old_errors = 0
            for i in range(args.verdicts):
                c = check_baseline(work / "base.json", Side(engine, model, 1), args.max_regression,
                                   2 * args.time_limit)
                errors += wrong(c.decision)
                vs = c.gate["verdicts"]
                old = min(np.median(v["samples"]["b"]) / np.median(recorded[m]) for m, v in vs.items())
                old_errors += wrong("regression" if old < 1 - args.max_regression else "ok")
                cells = "; ".join(f"{m} {v['decision']} {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}] "
                                  f"{v['rounds']} rounds" for m, v in vs.items())
                moved = ", ".join(f"{m} {s['ratio']:.2f}" for m, s in c.since_recording.items())
                print(f"  {i + 1:2d} {c.decision:<12} {cells}; {c.gate['seconds']:.0f} s; recorded config now/then "
                      f"{moved}; old threshold's worst ratio {old:.3f}", flush=True)
            tally[label] = errors
            what = "false alarms" if label == "same" else "misses"
            print(f"  {what}: {errors}/{args.verdicts}; the old median threshold against the recorded rounds: "
                  f"{old_errors}/{args.verdicts}", flush=True)
        print(f"\nfalse alarms {tally['same']}/{args.verdicts}, misses {tally['slower']}/{args.verdicts}; "
              f"{time.monotonic() - started:.0f} s in all")
    finally:
        stop_hogs(hogs)
        shutil.rmtree(work, ignore_errors=True)


def serve(args: argparse.Namespace) -> None:
    from ccmoe_runtime.bench.gate import Side
    from ccmoe_runtime.bench.serving import paired_served

    engine = find_engine()
    work = Path(tempfile.mkdtemp(prefix="gate-rates-"))
    started = time.monotonic()
    try:
        slow_model = widened(MODEL, work / "bundled-widened.gguf", args.widen)
        for label, model, wrong in (("same", MODEL, lambda d: d == "regression"),
                                    ("slower", slow_model, lambda d: d != "regression")):
            print(f"\n{label}: A = {MODEL.name}, B = {model.name}, -t 1, serve:tg", flush=True)
            errors = 0
            for i in range(args.verdicts):
                v = V.decide(paired_served(Side(engine, MODEL, 1), Side(engine, model, 1), "serve:tg"),
                             args.max_regression, args.min_rounds, args.max_rounds, args.time_limit,
                             confidence=args.confidence)
                errors += wrong(v.decision)
                print(f"  {i + 1:2d} {V.summary_line(v)}", flush=True)
            print(f"  {'false alarms' if label == 'same' else 'misses'}: {errors}/{args.verdicts}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{time.monotonic() - started:.0f} s in all")


def widened(src: Path, out: Path, pattern: str) -> Path:
    """A copy of the F16 model with the tensors whose names match `pattern` widened to F32: the same model, more
    bytes to read per token (a real, repeatable slow-down of the file, not of the machine)."""
    import gguf

    from ccmoe_runtime.prune.prune import _copy_kv

    r = gguf.GGUFReader(str(src), "r")
    w = gguf.GGUFWriter(str(out), str(r.get_field(gguf.Keys.General.ARCHITECTURE).contents()))
    _copy_kv(r, w, {"general.file_type": (0, gguf.GGUFValueType.UINT32)})
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F16 and re.search(pattern, t.name):
            data = data.astype(np.float32)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def start_hogs(n: int) -> list:
    hogs = [multiprocessing.Process(target=hog, args=(i,), daemon=True) for i in range(n)]
    for h in hogs:
        h.start()
    if hogs:
        print(f"{len(hogs)} hog process(es): {', '.join(str(h.pid) for h in hogs)}", flush=True)
    return hogs


def stop_hogs(hogs: list) -> None:
    """Stop our own hog processes, by their process objects."""
    for h in hogs:
        h.terminate()
        h.join()


def hog(seed: int) -> None:
    """Busy half the time, in phases of 0.2-3 s: a neighbour on a shared VM."""
    rng = random.Random(seed)
    while True:
        end = time.monotonic() + rng.uniform(0.2, 3.0)
        if rng.random() < 0.5:
            x = 0
            while time.monotonic() < end:
                x += 1
        else:
            time.sleep(max(0.0, end - time.monotonic()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("probe", "rates", "depth", "baseline", "serve"))
    p.add_argument("--base", default="-t 1", help="A's llama-bench flags")
    p.add_argument("--slow", default="-d 80", help="added to B's flags for the misses: a real slow-down")
    p.add_argument("--candidates", nargs="*", help="probe: changes to try")
    p.add_argument("--rounds", type=int, default=8, help="probe/depth: rounds")
    p.add_argument("--verdicts", type=int, default=10)
    p.add_argument("-p", "--n-prompt", type=int, default=64)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--reps", type=int, default=5)
    p.add_argument("--measure", choices=("tg", "pp"), default="tg")
    p.add_argument("--max-regression", type=float, default=0.10)
    p.add_argument("--confidence", type=float, default=V.DEFAULT_CONFIDENCE)
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--time-limit", type=float, default=45.0)
    p.add_argument("--record-rounds", type=int, default=10, help="baseline: rounds recorded per measure")
    p.add_argument("--widen", default="exps|attn", help="baseline: tensors widened to F32 in B's slower model")
    p.add_argument("--hog-checks", type=int, default=0, help="baseline: hog processes during the checks only")
    p.add_argument("--hog", type=int, default=0, help="background processes that make the machine restless")
    args = p.parse_args()
    started = time.monotonic()
    hogs = start_hogs(args.hog)
    try:
        {"probe": probe, "rates": rates, "depth": depth, "baseline": baseline,
         "serve": serve}[args.what](args)
    finally:
        stop_hogs(hogs)
    print(f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
