"""`place`, `calibrate`."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from ..core.errors import CcmoeError
from ..core.files import check_writable
from ..core.units import MIB
from ..devices.detect import host_runs
from ..engine.build import find_engine
from ..placement.calibrate import calibrate as run_calibration
from ..placement.layout import Settings, save_placement
from ..placement.search import place_model
from ..placement.summary import summary_lines
from .app import main
from .output import echo_json, echo_result, say
from .params import CONTEXT, COUNT, DEVICE, INPUT_FILE, MODEL, OUTPUT

load_mode_option = click.option(
    "--load-mode", type=click.Choice(["auto", "mmap", "none"]), default=None,
    help="llama.cpp's load mode (default: what calibration measured best for weights in host memory: `none`, "
         "pinned buffers, makes prompts much faster next to a GPU; `mmap` can decode a few percent faster).")

cpu_repack_option = click.option(
    "--cpu-repack/--no-cpu-repack", default=None,
    help="Experts in host memory next to a GPU in llama.cpp's CPU buffers (its --no-host), repacked for faster CPU "
         "kernels (Q4_0/Q4_K/IQ4_NL/MXFP4 on x86) but their prompt batches stay on the CPU (default: when "
         "calibration predicts at least 5% faster decode).")


def placement_options(f):
    """Options shared by `serve` and `place`."""
    for opt in reversed([
        click.option("--device", type=DEVICE, default="auto", show_default=True,
                     help="Device profile name, a .toml path, or auto."),
        click.option("--ctx", type=CONTEXT, default=4096, show_default=True, help="Context length per slot."),
        click.option("--parallel", type=COUNT, default=1, show_default=True, help="Concurrent request slots."),
        click.option("--kv-type", type=click.Choice(["auto", "f16", "q8_0"]), default="auto", show_default=True,
                     help="KV cache type; auto picks q8_0 only when it buys at least 5% predicted decode speed."),
        click.option("--stats", "stats_file", type=INPUT_FILE, default=None,
                     help="Expert statistics from `ccmoe-run measure` (default: uniform expert use, k/E)."),
        click.option("--calibration", "--host-profile", "calibration", type=INPUT_FILE, default=None,
                     help="Calibration from `ccmoe-run calibrate` (default: this host's, if calibrated)."),
        load_mode_option,
        cpu_repack_option,
        click.option("--trial/--no-trial", default=True, show_default=True,
                     help="CUDA, weights partly in host memory: measure the GPU memory of one short run of the "
                          "placement and place again with it (a few seconds; not with --dry-run)."),
        click.option("--llama-cpp-dir", type=click.Path(path_type=Path), default=None,
                     help="Use an existing llama.cpp build."),
    ]):
        f = opt(f)
    return f


def engine_for(device, llama_cpp_dir, required: bool = True):
    """The engine for the device's backend; for planning only (`required=False`) none is needed."""
    try:
        return find_engine(None if llama_cpp_dir else device.backend, llama_cpp_dir)
    except CcmoeError:
        if required:
            why = host_runs(device)
            if why:
                raise CcmoeError(why, "plan for it with `place` or `serve --dry-run`, or run here with --device auto") \
                    from None
            raise
        return None


@main.command()
@click.argument("model", type=MODEL, required=False, default="bundled")
@placement_options
@click.option("--ubatch", type=COUNT, default=None,
              help="Physical batch (-ub; default 512, or 256 when that leaves GPU room for more weights).")
@click.option("--margin-mb", type=click.IntRange(0), default=None,
              help="Free memory left in each pool (default 256, 128 after a trial run).")
@click.option("-o", "--out", type=OUTPUT, default=None, help="Save the placement artifact (JSON).")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the placement as JSON.")
def place(model, device, ctx, parallel, kv_type, stats_file, calibration, load_mode, cpu_repack, trial,
          llama_cpp_dir, ubatch, margin_mb, out, force, as_json) -> None:
    """Choose where each tensor of MODEL lives on DEVICE (GPU or CPU memory) and predict the speed; works for any
    device profile, also without its engine (llama.cpp's dry run then gives way to an estimate)."""
    if out:
        check_writable(out, force, what="placement")
    settings = Settings(ctx=ctx, parallel=parallel, kv_type=kv_type, ubatch=ubatch or 512, ubatch_auto=ubatch is None,
                        margin_bytes=None if margin_mb is None else margin_mb * MIB, load_mode=load_mode,
                        cpu_repack=cpu_repack)
    p = place_model(engine_for(device, llama_cpp_dir, required=False), model, device, settings, stats_file,
                    calibration, trial).placement
    if out:
        save_placement(p, out, force)
    if as_json:
        echo_json(p.to_dict())
        return
    click.echo("\n".join(summary_lines(p)))
    click.echo(f"llama-server flags: {' '.join(shlex.quote(a) for a in p.launch_args())}")
    if out:
        click.echo(f"wrote {out}")


@main.command()
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Device profile name, a .toml path, or auto.")
@click.option("-o", "--out", type=OUTPUT, default=None,
              help="Calibration to write (default: the cache's, which serve and place then use).")
@click.option("--size-mb", type=COUNT, default=None,
              help="Size of each medium model (default: 1500 on GPUs; on CPUs 200 or 4x the last-level cache).")
@click.option("--types", default=None, help="Weight types to measure, comma-separated (default: q8_0,q4_0 on GPUs, "
                                            "f16,q8_0,q4_0 on CPUs; K and IQ types such as q4_k, q2_k, iq2_xxs "
                                            "are made with llama-quantize).")
@click.option("--reps", "-r", type=COUNT, default=3, show_default=True, help="llama-bench repetitions.")
@click.option("--threads", "-t", type=COUNT, default=None, help="Threads (default: llama-bench's).")
@click.option("--llama-cpp-dir", type=click.Path(path_type=Path), default=None, help="Use an existing llama.cpp build.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True)
def calibrate(device, out, size_mb, types, reps, threads, llama_cpp_dir, force, as_json) -> None:
    """Measure this host's decode efficiency, per-layer and split costs, prompt throughput and link speed with
    llama-bench on generated models; serve and place use them."""
    type_list = [t.strip().lower() for t in types.split(",") if t.strip()] if types else None
    result = run_calibration(engine_for(device, llama_cpp_dir), device, out, size_mb, type_list, reps, threads,
                             say(as_json), force)
    echo_result(result, as_json)
