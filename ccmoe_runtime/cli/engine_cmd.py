"""`engine build`, `engine info`, `devices`."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import EXIT_ENGINE, CcmoeError
from ..devices.profiles import list_lines, list_profiles, profile_lines
from ..engine.build import BACKENDS, CPU_FEATURE_SETS, find_engine
from ..engine.selftest import ensure_engine, inspect_engine
from .app import main
from .output import echo_json, echo_result
from .params import COUNT, DEVICE


@main.group()
def engine() -> None:
    """Build and check the llama.cpp engine (tools and the libraries the Python bindings load)."""


@engine.command("build")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="llama.cpp backend (default: this host's: cuda with nvidia-smi, metal on macOS, else cpu).")
@click.option("--jobs", "-j", type=COUNT, default=None, help="Parallel compile jobs (default: all cores).")
@click.option("--cmake-flag", "extra", multiple=True, help="Extra CMake flag, e.g. -DCMAKE_CUDA_ARCHITECTURES=90.")
@click.option("--cpu", type=click.Choice(list(CPU_FEATURE_SETS)), default=None,
              help="CPU feature set (default: native, then the next one whenever a build fails its self-test here).")
@click.option("--json", "as_json", is_flag=True, help="Print the engine as JSON.")
def engine_build(backend, jobs, extra, cpu, as_json) -> None:
    """Build llama.cpp's tools from the vendored source (or reuse the cached build with the same key) and
    self-test them on small generated models."""
    progress = None if as_json else (lambda line: click.echo(f"\r{line[:110]:<110}", nl=False, err=True))
    say = None if as_json else (lambda msg: click.echo(f"\n{msg}", err=True))
    eng = ensure_engine(backend, jobs, tuple(extra), progress, cpu=cpu, say=say)
    if as_json:
        echo_json({**eng.__dict__, "bin_dir": str(eng.bin_dir)})
        return
    click.echo("", err=True)
    why = f" ({eng.cpu_features_reason})" if eng.cpu_features_reason else ""
    click.echo(f"engine {eng.key} ({eng.backend}, CPU features {eng.cpu_features}{why}) ready in {eng.bin_dir}")


@engine.command("info")
@click.option("--llama-cpp-dir", type=click.Path(path_type=Path), default=None,
              help="Use an existing llama.cpp build instead of the cached one (or set CCMOE_LLAMA_CPP_DIR).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Pick the cached engine of this backend.")
@click.option("--json", "as_json", is_flag=True)
def engine_info(llama_cpp_dir, backend, as_json) -> None:
    """Show the engine in use, what ccmoe-run needs that it lacks, and a fresh self-test on small models."""
    info = inspect_engine(find_engine(backend, llama_cpp_dir))
    echo_result(info, as_json)
    if not info.ok:
        raise CcmoeError("the engine lacks features or failed its self-test (above)",
                         "rebuild it with `ccmoe-run engine build`", EXIT_ENGINE)


@main.command()
@click.argument("device", type=DEVICE, required=False)
@click.option("--json", "as_json", is_flag=True)
def devices(device, as_json) -> None:
    """List device profiles, or show one (DEVICE: a name, a .toml path, or `auto` for this host)."""
    if as_json:
        echo_json(device.to_dict() if device else [p.to_dict() for p in list_profiles()])
    else:
        click.echo("\n".join(profile_lines(device) if device else list_lines(list_profiles())))
