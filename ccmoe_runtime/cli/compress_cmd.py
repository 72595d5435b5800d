"""`measure`, `plan`, `build`, `compress`."""

from __future__ import annotations

from pathlib import Path

import click

from ..compress.measure import load_measurements, measure_model
from ..compress.pipeline import (
    check_compress,
    check_plan_files,
    compress_model,
    frontier_files,
    load_plan,
    plan_frontier,
    plan_model,
    save_frontier_plan,
    save_plan,
)
from ..compress.frontier import summary_lines as frontier_lines
from ..compress.plan import summary_lines
from ..placement.summary import summary_lines as placement_lines
from ..compress.quantize import build
from ..compress.sensitivity import MAX_EXPERTS
from ..compress.stages import STOP_STAGES
from ..engine.build import find_engine
from ..testmodels.corpus import calibration_text
from .app import main
from .output import echo_json, echo_result, progress_bar, say, stage_bars
from .params import (
    CONTEXT,
    COUNT,
    DEVICE,
    FOLDER,
    INPUT_FILE,
    INVENTORY,
    MODEL,
    OUTPUT,
    POSITIVE,
)

_calib_option = click.option("--calib", type=INPUT_FILE, default=None,
                             help="Calibration text (default: the project's English corpus).")
_imatrix_option = click.option("--imatrix", "imatrix_file", type=INPUT_FILE, default=None,
                               help="Use this llama.cpp imatrix (.gguf or legacy .dat) instead of running llama-imatrix.")


@main.command()
@click.argument("model", type=MODEL)
@_calib_option
@_imatrix_option
@click.option("-o", "--out", type=FOLDER, default=Path("ccmoe-measurements"), show_default=True,
              help="Folder for the imatrix, expert statistics, sensitivity and impact artifacts.")
@click.option("--ctx", type=CONTEXT, default=512, show_default=True, help="Tokens per llama-imatrix chunk.")
@click.option("--chunks", type=COUNT, default=64, show_default=True, help="Chunks of calibration text to use.")
@click.option("--impact/--no-impact", default=None,
              help="Measure each tensor's output impact with probe builds (default: for models up to 4 GB).")
@click.option("--sample-experts", type=COUNT, default=MAX_EXPERTS, show_default=True,
              help="Experts per tensor whose errors are measured (a seeded sample when there are more).")
@click.option("--sample-rows", type=COUNT, default=16, show_default=True, help="Rows measured per sampled expert.")
@click.option("--threads", "-t", type=COUNT, default=None, help="Threads for the llama.cpp tools and the error sweep.")
@click.option("--force", is_flag=True, help="Overwrite earlier results in the folder.")
@click.option("--json", "as_json", is_flag=True)
def measure(model, calib, imatrix_file, out, ctx, chunks, impact, sample_experts, sample_rows, threads, force,
            as_json) -> None:
    """Measure expert activation frequency, the imatrix, per-tensor error per type and output impact."""
    with stage_bars() as bar:
        result = measure_model(find_engine(), model, calibration_text(calib), out, ctx=ctx, chunks=chunks,
                               impact=impact, force=force, threads=threads, progress=bar, imatrix=imatrix_file,
                               max_experts=sample_experts, rows_per_expert=sample_rows)
    echo_result(result, as_json)


main.add_command(click.Command("profile", params=measure.params, callback=measure.callback, hidden=True,
                               help="Old name of `measure`."))


def _plan_options(f):
    """Options shared by `plan` and `compress`."""
    for opt in reversed([
        click.option("--device", type=DEVICE, required=True, help="Device profile name, a .toml path, or auto."),
        click.option("--budget-gb", type=POSITIVE, default=None, help="Bytes for the weights (default: from the device)."),
        click.option("--ctx", type=CONTEXT, default=8192, show_default=True, help="Context per slot the KV cache is sized for."),
        click.option("--parallel", type=COUNT, default=1, show_default=True, help="Concurrent request slots."),
        click.option("--experts-used", type=COUNT, default=None,
                     help="Experts per token (default: scaled by kept/original experts for pruned models)."),
        click.option("--original-experts", type=COUNT, default=None,
                     help="Expert count before pruning, when the GGUF does not record it."),
    ]):
        f = opt(f)
    return f


def _target_options(f):
    """--min-tps / --max-kld: which frontier point `plan --frontier` and `compress` take."""
    f = click.option("--max-kld", type=POSITIVE, default=None,
                     help="Take the fastest frontier point predicting at most this KLD.")(f)
    return click.option("--min-tps", type=POSITIVE, default=None,
                        help="Take the frontier point of least predicted KLD at this decode tok/s or more.")(f)


@main.command()
@click.argument("model", type=INVENTORY)
@_plan_options
@click.option("--measurements", "--profile", "measured_dir", type=FOLDER, default=None,
              help="Folder written by `ccmoe-run measure` (default: prior error model, no weights needed).")
@click.option("-o", "--out", type=OUTPUT, default=Path("ccmoe-plan.json"), show_default=True)
@click.option("--png/--no-png", default=True, show_default=True, help="Also draw the plan as a PNG.")
@click.option("--frontier", "with_frontier", is_flag=True,
              help="Choose types and memory pools together: the speed/quality frontier (OUT.frontier.json, "
                   "OUT.frontier.png); OUT is the plan of its knee or of the point --min-tps/--max-kld ask for.")
@_target_options
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan's totals as JSON.")
def plan(model, device, budget_gb, ctx, parallel, experts_used, original_experts, measured_dir, out, png,
         with_frontier, min_tps, max_kld, force, as_json) -> None:
    """Choose a GGUF type for every tensor that fits the device and loses least (--frontier: and its pool,
    trading predicted tok/s against predicted KLD)."""
    check_plan_files(out, force, png)
    measured = load_measurements(measured_dir, Path(model.source)) if measured_dir else None
    if with_frontier or min_tps is not None or max_kld is not None:
        _plan_frontier(model, device, budget_gb, ctx, parallel, experts_used, original_experts, measured, out, png,
                       min_tps, max_kld, force, as_json)
        return
    result = plan_model(find_engine(), model, device, ctx, parallel, budget_gb, measured, experts_used,
                        original_experts)
    files = save_plan(result, out, force=force, picture=png)
    if as_json:
        echo_json({k: v for k, v in result.to_dict().items() if k != "tensors"}
                  | {"files": {k: str(p) for k, p in files.items()}})
    else:
        click.echo("\n".join(summary_lines(result)))
        click.echo("wrote " + ", ".join(str(p) for p in files.values()))


def _plan_frontier(model, device, budget_gb, ctx, parallel, experts_used, original_experts, measured, out, png,
                   min_tps, max_kld, force, as_json) -> None:
    for p in frontier_files(out).values():
        check_plan_files(p, force, False)
    f, result = plan_frontier(find_engine(), model, device, ctx, parallel, budget_gb, measured, experts_used,
                              original_experts, min_tps, max_kld)
    files = save_frontier_plan(f, result, out, force=force, picture=png)
    if as_json:
        echo_json({k: v for k, v in f.to_dict().items() if k not in ("points", "fixed")}
                  | {"points": [{k: v for k, v in q.to_dict().items() if k not in ("types", "where")}
                                for q in f.points]}
                  | {"files": {k: str(p) for k, p in files.items()}})
    else:
        click.echo("\n".join(frontier_lines(f)))
        click.echo("wrote " + ", ".join(str(p) for p in files.values()))


@main.command("build")
@click.argument("model", type=MODEL)
@click.option("--plan", "plan_path", type=INPUT_FILE, required=True, help="A plan from `ccmoe-run plan`.")
@click.option("-o", "--out", type=OUTPUT, required=True, help="The GGUF to write.")
@click.option("--imatrix", type=INPUT_FILE, default=None, help="Default: the plan's measured imatrix.")
@click.option("--threads", "-t", type=COUNT, default=None)
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True)
def build_cmd(model, plan_path, out, imatrix, threads, force, as_json) -> None:
    """Quantize MODEL by a plan with llama-quantize, atomically, and verify the result."""
    p = load_plan(plan_path)
    with progress_bar("quantizing") as bar:
        result = build(find_engine(), model, p, out, imatrix or (Path(p.imatrix) if p.imatrix else None), force,
                       threads, bar)
    echo_result(result, as_json)


@main.command()
@click.argument("model", type=INVENTORY)
@_plan_options
@click.option("-o", "--out", type=OUTPUT, required=True, help="The GGUF to write.")
@_target_options
@click.option("--check", "check_only", is_flag=True,
              help="Only run the checks compress starts with (fit, disk, RAM); works on an inventory.")
@_calib_option
@_imatrix_option
@click.option("--impact/--no-impact", default=None, help="Measure output impact (default: models up to 4 GB).")
@click.option("--stop-after", type=click.Choice(STOP_STAGES), default=None,
              help="End after this stage; run again without it to go on from there.")
@click.option("--threads", "-t", type=COUNT, default=None)
@click.option("--force", is_flag=True, help="Overwrite OUT and redo every stage.")
@click.option("--json", "as_json", is_flag=True)
def compress(model, device, budget_gb, ctx, parallel, experts_used, original_experts, out, min_tps, max_kld, check_only,
             calib, imatrix_file, impact, stop_after, threads, force, as_json) -> None:
    """Check fit, disk and RAM, then measure -> frontier of types and pools -> build its knee (or the point
    --min-tps/--max-kld ask for); beside OUT: OUT.types.txt, OUT.ot.txt and OUT.layout.json, which `serve` uses.
    The measurements and the frontier stay in OUT's folder (OUT.ccmoe/), and a run that was stopped or killed
    resumes from its last finished stage."""
    if check_only:
        echo_result(check_compress(find_engine(), model, device, out, ctx, parallel, budget_gb, impact, threads),
                    as_json)
        return
    with stage_bars() as bars:
        result = compress_model(find_engine(), model, device, out, calibration_text(calib), ctx, parallel, budget_gb,
                                experts_used, original_experts, impact, threads, force, bars, imatrix_file, stop_after,
                                say(as_json), min_tps, max_kld)
    if as_json:
        echo_json(result.to_dict())
        return
    if result.plan is None or result.build is None:
        click.echo(f"stopped after {result.stopped_after}; artifacts in {result.work}; run again without --stop-after "
                   "to go on from there")
        if result.plan is None:
            return
    click.echo("\n".join(frontier_lines(result.frontier) if result.frontier else summary_lines(result.plan)))
    click.echo("wrote " + ", ".join(str(p) for p in result.files.values()))
    if result.build:
        click.echo("\n".join(result.build.summary_lines()))
    if result.placement:
        click.echo("\n".join(placement_lines(result.placement)))
