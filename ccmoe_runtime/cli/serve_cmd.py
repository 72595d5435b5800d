"""`serve`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..core.errors import CcmoeError
from ..core.files import read_text
from ..placement.layout import Settings
from ..serve.serve import plan_server, serve_model
from .app import main
from .output import echo_result
from .params import MODEL, PORT
from .placement_cmd import engine_for, placement_options


def read_api_key(key_file: Path | None) -> str | None:
    """The API key from --api-key-file (first line) or CCMOE_API_KEY: never from the command line, where `ps`
    would show it."""
    if key_file:
        text = read_text(key_file, "API key file").strip()
        if not text:
            raise CcmoeError(f"{key_file} is empty", "write the API key on its first line")
        return text.splitlines()[0].strip()
    return os.environ.get("CCMOE_API_KEY") or None


@main.command()
@click.option("--model", type=MODEL, default="bundled", help="GGUF path or hf:owner/repo[:file] (default: the bundled model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the server.")
@click.option("--port", type=PORT, default=8080, show_default=True)
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Require the key on this file's first line from clients (or set CCMOE_API_KEY; never on the "
                   "command line, where `ps` shows it).")
@click.option("--cors-origins", default="localhost", show_default=True,
              help="Web origins allowed to call the server: localhost, a comma-separated list, or '*' (any page).")
@placement_options
@click.option("--dry-run", is_flag=True, help="Print the llama-server command line, predicted memory and speed; exit.")
@click.option("--warmup/--no-warmup", default=True, help="Send one streamed chat request and report tokens/s.")
@click.option("--start-cache/--no-start-cache", default=True, show_default=True,
              help="Reuse the placement of an earlier start with the same model, engine, device and settings (no "
                   "dry run or trial run); --no-start-cache places again.")
@click.option("--json", "as_json", is_flag=True, help="Print the ready message as JSON.")
def serve(model, host, port, api_key_file, cors_origins, device, ctx, parallel, kv_type, stats_file, calibration,
          load_mode, cpu_repack, trial, llama_cpp_dir, dry_run, warmup, start_cache, as_json) -> None:
    """Start llama-server with an OpenAI-compatible API on MODEL, placed for DEVICE; Ctrl-C stops it."""
    settings = Settings(ctx=ctx, parallel=parallel, kv_type=kv_type, load_mode=load_mode, cpu_repack=cpu_repack)
    eng = engine_for(device, llama_cpp_dir, required=not dry_run)
    plan = plan_server(eng, model, device, settings, host, port, read_api_key(api_key_file), cors_origins,
                       stats_file, calibration, trial and not dry_run, start_cache)
    for warning in plan.warnings:
        click.echo(f"ccmoe-run: warning: {warning}", err=True)
    if dry_run:
        echo_result(plan, as_json)
        return

    def ready(report) -> None:
        if as_json:
            echo_result(report, True, indent=None)   # one line: scripts read it as soon as the server is ready
        else:
            click.echo("\n".join(report.summary_lines(plan.placed)))
        sys.stdout.flush()

    sys.exit(serve_model(eng, plan, device, warmup, ready))
