"""`prune`."""

from __future__ import annotations

from pathlib import Path

import click

from ..compress.router import load_router_stats
from ..engine.build import find_engine
from ..prune.prune import DEFAULT_ALPHA, prune_model
from ..testmodels.corpus import calibration_text
from .app import main
from .output import echo_result
from .params import CONTEXT, COUNT, INPUT_FILE, MODEL, OUTPUT


@main.command()
@click.argument("model", type=MODEL)
@click.option("-o", "--out", type=OUTPUT, required=True, help="The pruned GGUF to write.")
@click.option("--keep", type=COUNT, default=None, help="Experts to keep in every MoE layer.")
@click.option("--keep-ratio", type=float, default=None, help="Share of experts to keep, rounded up (e.g. 0.75).")
@click.option("--method", default="importance", show_default=True,
              help="importance (alpha x frequency + (1 - alpha) x mean score), frequency (alpha 1) or random.")
@click.option("--alpha", type=float, default=DEFAULT_ALPHA, show_default=True,
              help="Weight of activation frequency against mean routing score, both divided by the layer maximum.")
@click.option("--calib", type=INPUT_FILE, default=None,
              help="Calibration text for the router statistics (default: the project's English corpus).")
@click.option("--stats", "stats_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Router statistics to reuse (default: measured, cached as OUT's folder/MODEL.router-stats.json).")
@click.option("--imatrix", "imatrix_file", type=INPUT_FILE, default=None,
              help="The model's imatrix (.gguf or legacy .dat): written sliced to the kept experts as OUT.imatrix.gguf.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of --method random.")
@click.option("--experts-used", type=COUNT, default=None,
              help="Experts per token (default: max(1, round(k x kept / original experts))).")
@click.option("--ctx", type=CONTEXT, default=256, show_default=True, help="Tokens per calibration chunk.")
@click.option("--chunks", type=COUNT, default=64, show_default=True, help="Calibration chunks to use.")
@click.option("--threads", "-t", type=COUNT, default=None)
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prune(model, out, keep, keep_ratio, method, alpha, calib, stats_file, imatrix_file, seed, experts_used, ctx, chunks,
          threads, force, as_json) -> None:
    """Drop the least important experts of every MoE layer by router statistics; write a smaller GGUF."""
    stats = load_router_stats(stats_file) if stats_file else None
    needs_text = stats is None and method != "random"
    result = prune_model(find_engine() if needs_text else None, model, out, keep, keep_ratio, method, alpha, seed,
                         calibration_text(calib) if needs_text else None, stats, stats_file, experts_used, ctx, chunks,
                         threads, force, imatrix_file)
    echo_result(result, as_json)
