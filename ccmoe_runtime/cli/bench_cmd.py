"""`bench`, `eval`, `report`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from ..bench.bench import MIN_ROUND_S, bench_model
from ..bench.evaluate import evaluate
from ..bench.baseline import check_baseline, gate_of, load_baseline, record_baseline
from ..bench.gate import Side, raise_on_regression, run_gate
from ..bench.report import write_report
from ..core.errors import CcmoeError
from ..core.files import read_text
from ..engine.build import find_engine
from ..testmodels.corpus import ensure_corpus
from .app import main
from .output import echo_result, say
from .params import CONTEXT, COUNT, DEVICE, FOLDER, INPUT_FILE, MODEL, OUTPUT, PERCENT, POSITIVE
from .placement_cmd import cpu_repack_option, engine_for, load_mode_option

DEFAULT_HISTORY = Path("ccmoe-results/history.jsonl")


@main.command()
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Device profile name, a .toml path, or auto.")
@click.option("--model", type=MODEL, default="bundled", help="GGUF path or any model spec (default: the bundled model).")
@click.option("--runs", type=COUNT, default=5, show_default=True,
              help="Rounds; each runs every contender once (with --record: rounds recorded per measure).")
@click.option("--threads", "-t", type=COUNT, default=None)
@click.option("--history", type=OUTPUT, default=DEFAULT_HISTORY, show_default=True,
              help="Append the result here (JSON lines); --no-history to skip.")
@click.option("--no-history", is_flag=True)
@click.option("--record", type=OUTPUT, default=None,
              help="Record a baseline: freeze this engine, model digest and threads, and their rounds, into this file.")
@click.option("--force", is_flag=True, help="With --record: overwrite the file.")
@click.option("--baseline", type=INPUT_FILE, default=None,
              help="Gate against a --record file: its frozen configuration re-run now (A) against now (B).")
@click.option("--max-regression", type=PERCENT, default=10.0, show_default=True,
              help="Gate: percent B may be slower than A; exit 6 only when the whole interval lies beyond it.")
@click.option("--min-round-s", type=POSITIVE, default=MIN_ROUND_S, show_default=True,
              help="Seconds of measured work per contender per round (more repetitions for fast models).")
@click.option("--engine-b", type=FOLDER, default=None, help="Gate: B's llama.cpp build (default: A's; with --baseline: the current one).")
@click.option("--model-b", type=MODEL, default=None, help="Gate: B's model (default: A's).")
@click.option("--threads-b", type=COUNT, default=None, help="Gate: B's threads (default: A's).")
@click.option("--depth", type=click.IntRange(min=0), multiple=True,
              help="Gate or --record: decode after this many cached tokens (repeatable; default 0).")
@click.option("--serve", is_flag=True, help="Gate or --record: llama-server's own timings of OpenAI chat requests too.")
@click.option("--max-seconds", type=POSITIVE, default=180.0, show_default=True, help="Gate: time for all its rounds.")
@load_mode_option
@cpu_repack_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def bench(ctx, device, model, runs, threads, history, no_history, record, force, baseline, max_regression, min_round_s,
          engine_b, model_b, threads_b, depth, serve, max_seconds, load_mode, cpu_repack, as_json) -> None:
    """Prompt and generation tokens/s of ccmoe's placement and llama.cpp's own, alternating, repeated.

    With --engine-b, --model-b or --threads-b: an A/B gate instead (paired rounds, a verdict per measure with its
    interval; exit 6 on a regression, 0 on pass or inconclusive). --record FILE keeps a baseline; --baseline FILE
    gates the current engine against it the same way."""
    hist = None if no_history else history
    gate_opts = engine_b or model_b or threads_b
    given = [n for n in ("model", "threads") if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if record and (baseline or gate_opts):
        raise CcmoeError("--record writes a baseline; it does not take --baseline or -b options",
                         "record first, then gate with --baseline FILE")
    if baseline and (depth or serve):
        raise CcmoeError("with --baseline the recorded measures are gated; --depth and --serve apply to --record",
                         "record a baseline with the measures you want gated")
    if baseline and given:
        raise CcmoeError(f"with --baseline, A is the recorded configuration; --{given[0]} does not apply",
                         "pass --model-b / --threads-b for what runs now")
    if (depth or serve) and not (record or baseline or gate_opts):
        raise CcmoeError("--depth and --serve are gate options", "add --record FILE, --baseline FILE or a -b option")
    say_ = say(as_json)
    if record:
        echo_result(record_baseline(Side(engine_for(device, None), model, threads or 1), list(depth), runs, record,
                                    force, serve, say_), as_json)
        return
    if baseline:
        doc = load_baseline(baseline)
        b = Side(engine_for(device, engine_b), model_b or Path(doc["model"]["path"]), threads_b or int(doc["threads"]),
                 list(doc.get("flags") or []))
        got = check_baseline(baseline, b, max_regression / 100, max_seconds, say_, hist)
        echo_result(got, as_json)
        raise_on_regression(gate_of(got), "the baseline's configuration")
        return
    if gate_opts:
        a = Side(engine_for(device, None), model, threads or 1)
        b = Side(engine_for(device, engine_b) if engine_b else a.engine, model_b or model, threads_b or a.threads)
        got = run_gate(a, b, list(depth), max_regression / 100, max_seconds, say_, serve, hist)
        echo_result(got, as_json)
        raise_on_regression(got)
        return
    echo_result(bench_model(engine_for(device, None), model, device, runs, threads, say_, min_round_s, load_mode,
                            cpu_repack, hist), as_json)


@main.command("eval")
@click.option("--model", type=MODEL, required=True, help="The quantized model (GGUF path or any model spec).")
@click.option("--reference", type=MODEL, required=True, help="The unquantized model it was made from.")
@click.option("--text", type=INPUT_FILE, default=None, help="Evaluation text (default: the corpus's held-out part).")
@click.option("--ctx", type=CONTEXT, default=256, show_default=True, help="Tokens per llama-perplexity chunk.")
@click.option("--threads", "-t", type=COUNT, default=None)
@click.option("--history", type=OUTPUT, default=None,
              help="Append the result to this history file (JSON lines) for `ccmoe-run report`.")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(model, reference, text, ctx, threads, history, as_json) -> None:
    """Perplexity, KL-divergence (mean, p99) and top-token agreement against the reference (llama-perplexity)."""
    echo_result(evaluate(find_engine(), model, reference, text or ensure_corpus().heldout, ctx, threads, history),
                as_json)


@main.command()
@click.option("--history", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_HISTORY,
              show_default=True, help="History written by `bench` and `eval --history`.")
@click.option("--placement", type=INPUT_FILE, default=None, help="A placement JSON to draw.")
@click.option("-o", "--out", type=OUTPUT, default=Path("ccmoe-results/report.html"), show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def report(history, placement, out, force) -> None:
    """One HTML page with charts: tokens/s over time, size vs quality, placement per layer."""
    doc = None
    if placement:
        try:
            doc = json.loads(read_text(placement, "placement"))
        except json.JSONDecodeError as e:
            raise CcmoeError(f"cannot read placement {placement} ({e})", "pass a placement JSON from ccmoe-run") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict):
            raise CcmoeError(f"{placement} has no per-tensor placement", "pass a placement JSON from ccmoe-run")
    click.echo(f"wrote {write_report(history, out, doc, force)}")
