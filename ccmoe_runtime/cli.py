"""`ccmoe-run`: the command line over the pipeline stages."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from . import __version__
from .engine import CPU_FEATURE_SETS
from .errors import CcmoeError


def _print_json(data, indent: int | None = 1) -> None:
    click.echo(json.dumps(data, indent=indent, default=str))


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


class Cli(click.Group):
    """Turns CcmoeError into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CcmoeError as e:
            click.echo(f"ccmoe-run: error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed and child processes stopped."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ccmoe-run")
def main() -> None:
    """Deploy pre-pruned Mixture-of-Experts models on small machines with llama.cpp."""
    _exit_on_sigterm()


# ---------------------------------------------------------------- engine

@main.group()
def engine() -> None:
    """Build and check the llama.cpp engine (tools and the libraries the Python bindings load)."""


@engine.command("build")
@click.option("--backend", type=click.Choice(["cpu", "cuda", "metal", "vulkan", "hip"]), default=None,
              help="llama.cpp backend (default: this host's: cuda with nvidia-smi, metal on macOS, else cpu).")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel compile jobs (default: all cores).")
@click.option("--cmake-flag", "extra", multiple=True, help="Extra CMake flag, e.g. -DCMAKE_CUDA_ARCHITECTURES=90.")
@click.option("--cpu", type=click.Choice(list(CPU_FEATURE_SETS)), default=None,
              help="CPU feature set (default: native, then the next one whenever a build fails its self-test here).")
@click.option("--json", "as_json", is_flag=True, help="Print the engine as JSON.")
def engine_build(backend, jobs, extra, cpu, as_json) -> None:
    """Build llama.cpp's tools from the vendored source (or reuse the cached build with the same key) and
    self-test them on small generated models."""
    from .engine import ensure_engine

    progress = None if as_json else (lambda line: click.echo(f"\r{line[:110]:<110}", nl=False, err=True))
    say = None if as_json else (lambda msg: click.echo(f"\n{msg}", err=True))
    eng = ensure_engine(backend, jobs, tuple(extra), progress, cpu=cpu, say=say)
    if progress:
        click.echo("", err=True)
    if as_json:
        _print_json({**asdict(eng), "bin_dir": str(eng.bin_dir)})
    else:
        why = f" ({eng.cpu_features_reason})" if eng.cpu_features_reason else ""
        click.echo(f"engine {eng.key} ({eng.backend}, CPU features {eng.cpu_features}{why}) ready in {eng.bin_dir}")


@engine.command("info")
@click.option("--llama-cpp-dir", type=click.Path(path_type=Path), default=None,
              help="Use an existing llama.cpp build instead of the cached one (or set CCMOE_LLAMA_CPP_DIR).")
@click.option("--backend", default=None, help="Pick the cached engine of this backend.")
@click.option("--json", "as_json", is_flag=True)
def engine_info(llama_cpp_dir, backend, as_json) -> None:
    """Show the engine in use: tools, version, and any feature ccmoe-run needs that it lacks."""
    from .engine import TOOLS, engine_summary, find_engine

    from .selftest import run_self_test, save_self_test

    eng = find_engine(backend, llama_cpp_dir)
    info = engine_summary(eng)
    test = run_self_test(eng)
    save_self_test(eng, test)
    info["self_test"] = test.to_dict()
    if as_json:
        _print_json(info)
    else:
        click.echo(f"engine   {info['key'] or '(user build)'}  backend={info['backend']}  origin={info['origin']}")
        click.echo(f"path     {info['bin_dir']}")
        click.echo(f"version  {info['version']} (llama.cpp commit {info['commit']})")
        click.echo(f"cpu      {eng.cpu_features}" + (f" ({eng.cpu_features_reason})" if eng.cpu_features_reason else ""))
        for tool in TOOLS:
            click.echo(f"  {'ok ' if info['tools'][tool] else 'MISSING'} {tool}")
        for tool, missing in info["missing_features"].items():
            click.echo(f"  {tool} lacks: {', '.join(missing)}")
        click.echo(f"self-test {'passed' if test.ok else 'FAILED'}: {len(test.checks)} runs in {test.seconds} s")
        for c in test.failures:
            click.echo(f"  FAILED {c.tool} on {c.model}: {c.detail}")
    if info["missing_features"] or not test.ok:
        sys.exit(3)


# ---------------------------------------------------------------- devices

@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def devices(name, as_json) -> None:
    """List device profiles, or show one (NAME, or `auto` for this host)."""
    from .devices import get_profile, list_profiles

    profiles = [get_profile(name)] if name else list_profiles()
    if as_json:
        _print_json([p.to_dict() for p in profiles] if not name else profiles[0].to_dict())
        return
    if not name:
        for p in profiles:
            mem = " + ".join(f"{x.capacity_gb:g} GB {x.kind} @ {x.bandwidth_gbs:g} GB/s" for x in p.pools)
            click.echo(f"{p.name:<20} {p.backend:<7} {mem}")
        click.echo("auto                 (this host: `ccmoe-run devices auto`)")
        return
    p = profiles[0]
    click.echo(f"{p.name}: {p.description}")
    click.echo(f"  backend {p.backend}, {p.threads} threads, OS reserve {p.os_reserve_gb:g} GB"
               + (f", CPU<->GPU {p.link_bandwidth_gbs:g} GB/s" if p.link_bandwidth_gbs else ""))
    for x in p.pools:
        extra = f", GPU-visible {x.gpu_visible_gb:g} GB" if x.gpu_visible_gb else ""
        click.echo(f"  pool {x.name}: {x.kind}, {x.capacity_gb:g} GB x {x.usable_fraction:g} usable, "
                   f"{x.bandwidth_gbs:g} GB/s{extra}")
    if p.slow_types:
        click.echo(f"  slow types: {', '.join(p.slow_types)}")
    for note in p.notes:
        click.echo(f"  {note}")


# ---------------------------------------------------------------- inspect

@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--save", type=click.Path(path_type=Path), default=None, help="Also save the inventory artifact (JSON).")
@click.option("--force", is_flag=True, help="Overwrite --save's file.")
def inspect(model, as_json, save, force) -> None:
    """Show a model's MoE structure: MODEL is a .gguf (any shard), hf:owner/repo[:file], an
    inventory .json, or inventory:deepseek-v3 / inventory:deepseek-v3-pruned192."""
    from .inventory import save_inventory, summarize
    from .sources import open_inventory

    inv = open_inventory(model)
    summary = summarize(inv)
    if save:
        save_inventory(inv, save, force=force)
    if as_json:
        _print_json({"source": inv.source, "file_bytes": inv.file_bytes, **summary.to_dict()})
        return
    s = summary
    click.echo(f"model       {s.name} ({s.arch})  {inv.source}")
    click.echo(f"size        {human_size(s.total_bytes)} of tensors" + (f", {len(inv.shards)} shards" if len(inv.shards) > 1 else ""))
    if not s.is_moe:
        click.echo(f"layers      {s.n_layers}, dense model (no routed experts)")
    else:
        click.echo(f"layers      {s.n_layers}: {s.n_dense_lead} leading dense, {len(s.moe_layers)} MoE")
        click.echo(f"experts     {s.n_expert} routed, {s.n_expert_used} used per token, {s.n_expert_shared} shared")
    click.echo(f"parameters  {human_count(s.total_params)} total, {human_count(s.active_params)} active per token")
    click.echo("by class    params       bytes        types")
    for cls, n in s.params_by_class.items():
        if n:
            types = ", ".join(sorted(s.types_by_class.get(cls, {})))
            click.echo(f"  {cls:<14}{human_count(n):>9}  {human_size(s.bytes_by_class[cls]):>12}   {types}")
    click.echo("per layer   kind   params     attention    dense_ffn    shared       router       routed")
    for layer in s.layers:
        b = layer.bytes_by_class
        click.echo(f"  {layer.layer:<9} {layer.kind:<6}{human_count(layer.params):>8}" + "".join(
            f" {human_size(b[c]):>12}" for c in ("attention", "dense_ffn", "shared_expert", "router", "routed_expert")))


# ---------------------------------------------------------------- generated models

@main.group()
def generate() -> None:
    """Make models for tests: random-weight MoE GGUFs and weight-less inventories of real models."""


@generate.command("model")
@click.option("--arch", type=click.Choice(["deepseek2", "qwen3moe"]), default="qwen3moe")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--layers", type=int, default=4)
@click.option("--embd", type=int, default=256, help="Hidden size.")
@click.option("--experts", type=int, default=16)
@click.option("--experts-used", type=int, default=4)
@click.option("--expert-ff", type=int, default=256, help="Feed-forward size of one expert.")
@click.option("--skew", type=float, default=0.0, help="0 = uniform expert use; larger = a few popular experts.")
@click.option("--seed", type=int, default=0)
@click.option("--type", "qtype", default="f16", show_default=True,
              help="Weight type, written directly as random blocks (f16, q8_0, q4_k, iq2_xxs, mxfp4 ...).")
@click.option("--tensor-types", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Per-tensor types: regex=type lines, llama-quantize's --tensor-type-file format, first match wins.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def generate_model(arch, out, layers, embd, experts, experts_used, expert_ff, skew, seed, qtype, tensor_types,
                   force) -> None:
    """Write a deterministic random-weight MoE GGUF that llama.cpp loads."""
    from .synth import SYNTH_TYPES, SynthSpec, read_tensor_types, write_random_gguf

    if qtype.lower() not in SYNTH_TYPES:
        raise CcmoeError(f"cannot generate weights of type {qtype!r}", f"choose one of: {', '.join(SYNTH_TYPES)}")
    spec = SynthSpec(arch=arch, n_layer=layers, n_embd=embd, n_expert=experts, n_expert_used=experts_used,
                     n_ff_exp=expert_ff, skew=skew, seed=seed, name=f"synth-{arch}")
    rules = read_tensor_types(tensor_types) if tensor_types else None
    path = write_random_gguf(spec, out, force=force, qtype=qtype.lower(), rules=rules)
    click.echo(f"wrote {path} ({human_size(path.stat().st_size)})")


@generate.command("inventory")
@click.argument("name", type=click.Choice(["deepseek-v3", "deepseek-v3-pruned192"]))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True)
def generate_inventory(name, out, force) -> None:
    """Save the weight-less inventory of a real model (shapes and names only)."""
    from .inventory import save_inventory
    from .synth import builtin_inventory

    save_inventory(builtin_inventory(name), out, force=force)
    click.echo(f"wrote {out}")


# ---------------------------------------------------------------- corpus and bundled model

@main.command()
@click.option("--json", "as_json", is_flag=True)
def corpus(as_json) -> None:
    """Fetch (once) the English corpus used for training, calibration and quality tests."""
    from .corpus import ensure_corpus

    c = ensure_corpus()
    data = {"train": str(c.train), "heldout": str(c.heldout), "source": c.source, "sha256": c.sha256}
    if as_json:
        _print_json(data)
    else:
        for k, v in data.items():
            click.echo(f"{k:<8} {v}")


@main.command("train-bundled")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output GGUF (default: models/ccmoe-mini-moe-f16.gguf).")
@click.option("--steps", type=int, default=None, help="Training steps (default: the recipe's).")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def train_bundled_cmd(out, steps, force) -> None:
    """Retrain the bundled default model from the corpus (needs the `train` extra)."""
    from .corpus import ensure_corpus
    from .engine import find_engine
    from .sources import bundled_model_path
    from .train import TrainConfig, train_bundled

    out = out or bundled_model_path()
    if out.exists() and not force:
        raise CcmoeError(f"{out} already exists", "pass --force to overwrite it or -o another path")
    cfg = TrainConfig() if steps is None else TrainConfig(steps=steps)
    info = train_bundled(out, cfg, find_engine(), ensure_corpus(),
                         progress=lambda r: click.echo(json.dumps(r), err=True))
    report = out.with_suffix(".train.json")
    report.write_text(json.dumps(info, indent=1) + "\n")
    click.echo(f"wrote {out}: held-out perplexity {info['heldout_ppl']} (unigram {info['unigram_ppl']}); report {report}")


# ---------------------------------------------------------------- statistics

class _Progress:
    """A click progress bar fed with (done, total) callbacks; silent when not on a terminal."""

    def __init__(self, label: str):
        self.label, self.bar, self.done = label, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar, self.done = None, 0


def _calibration(calib: Path | None) -> Path:
    from .corpus import ensure_corpus

    if calib is not None and not Path(calib).is_file():
        raise CcmoeError(f"calibration text {calib} does not exist", "pass --calib with a plain-text file")
    return calib or ensure_corpus().train


@main.command()
@click.argument("model")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text (default: the project's English corpus).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("ccmoe-profile"), show_default=True,
              help="Folder for the imatrix, expert statistics, sensitivity and impact artifacts.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per llama-imatrix chunk.")
@click.option("--chunks", type=int, default=64, show_default=True, help="Chunks of calibration text to use.")
@click.option("--impact/--no-impact", default=None,
              help="Measure each tensor's output impact with probe builds (default: for models up to 4 GB).")
@click.option("--threads", "-t", type=int, default=None, help="Threads for the llama.cpp tools.")
@click.option("--force", is_flag=True, help="Overwrite earlier results in the folder.")
@click.option("--json", "as_json", is_flag=True)
def profile(model, calib, out, ctx, chunks, impact, threads, force, as_json) -> None:
    """Measure expert activation frequency, the imatrix, per-tensor error per type and output impact."""
    import numpy as np

    from .compress import run_profile
    from .engine import find_engine
    from .sources import resolve_model_path

    path = resolve_model_path(model)
    bar = _Progress("impact probes")
    try:
        result = run_profile(find_engine(), path, _calibration(calib), out, ctx=ctx, chunks=chunks, impact=impact,
                             force=force, threads=threads, progress=bar)
    finally:
        bar.close()
    if as_json:
        _print_json(result)
        return
    click.echo(f"imatrix {result['imatrix']}\nexpert statistics {result['stats']}\nsensitivity {result['sensitivity']}")
    click.echo(f"impact {result['impact']}" if "impact" in result else "impact not measured (--impact to measure it)")
    click.echo(f"layer  entropy (max {np.log2(result['n_expert']):.2f} bits)  most used experts (share of tokens)")
    for layer, d in result["layers"].items():
        top = np.argsort(d["frequency"])[::-1][:4]
        click.echo(f"  {layer:<5} {d['entropy_bits']:>6.2f}   " + "  ".join(f"{e}:{d['frequency'][e]:.2f}" for e in top))


# ---------------------------------------------------------------- plan, build, compress

def _plan_options(f):
    """Options shared by `plan` and `compress`."""
    for opt in reversed([
        click.option("--device", required=True, help="Device profile name, a .toml path, or auto."),
        click.option("--budget-gb", type=float, default=None, help="Bytes for the weights (default: from the device)."),
        click.option("--ctx", type=int, default=8192, show_default=True, help="Context per slot the KV cache is sized for."),
        click.option("--parallel", type=int, default=1, show_default=True, help="Concurrent request slots."),
        click.option("--experts-used", type=int, default=None,
                     help="Experts per token (default: scaled by kept/original experts for pruned models)."),
        click.option("--original-experts", type=int, default=None,
                     help="Expert count before pruning, when the GGUF does not record it."),
    ]):
        f = opt(f)
    return f


def _echo_plan(plan: dict, files: dict) -> None:
    from .plan import summary_lines

    click.echo("\n".join(summary_lines(plan)))
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))


@main.command()
@click.argument("model")
@_plan_options
@click.option("--profile", "profile_dir", type=click.Path(path_type=Path), default=None,
              help="Folder written by `ccmoe-run profile` (default: prior error model, no weights needed).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("ccmoe-plan.json"), show_default=True)
@click.option("--png/--no-png", default=True, show_default=True, help="Also draw the plan as a PNG.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan's totals as JSON.")
def plan(model, device, budget_gb, ctx, parallel, experts_used, original_experts, profile_dir, out, png, force,
         as_json) -> None:
    """Choose a GGUF type for every tensor that fits the device and loses least."""
    from .compress import load_profile, plan_model, save_plan
    from .devices import get_profile
    from .engine import find_engine
    from .sources import open_inventory, resolve_model_path

    dev = get_profile(device)
    inv = open_inventory(model)
    prof = load_profile(profile_dir, resolve_model_path(model)) if profile_dir else None
    result = plan_model(find_engine(), inv, dev, ctx, parallel, budget_gb, prof, experts_used, original_experts)
    files = save_plan(result, out, force=force, picture=png)
    if as_json:
        _print_json({k: v for k, v in result.items() if k != "tensors"} | {"files": {k: str(p) for k, p in files.items()}})
    else:
        _echo_plan(result, files)


def _build(model_path: Path, plan_doc: dict, out: Path, imatrix: Path | None, force: bool, threads: int | None) -> dict:
    from .build import build
    from .engine import find_engine

    bar = _Progress("quantizing")
    try:
        return build(find_engine(), model_path, plan_doc, out, imatrix=imatrix, force=force, threads=threads,
                     progress=bar)
    finally:
        bar.close()


def _echo_build(result: dict) -> None:
    if result["skipped"]:
        click.echo(f"{result['output']} is up to date (same model, plan, imatrix and engine); nothing to do")
    else:
        click.echo(f"wrote {result['output']}: {result['file_bytes']:,} bytes (planned {result['planned_file_bytes']:,}), "
                   f"{result['tensors']} tensors of the planned types, loads in llama.cpp")


@main.command("build")
@click.argument("model")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="A plan from `ccmoe-run plan`.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The GGUF to write.")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None, help="Default: the plan's profile imatrix.")
@click.option("--threads", "-t", type=int, default=None)
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True)
def build_cmd(model, plan_path, out, imatrix, threads, force, as_json) -> None:
    """Quantize MODEL by a plan with llama-quantize, atomically, and verify the result."""
    from .compress import load_plan
    from .sources import resolve_model_path

    plan_doc = load_plan(plan_path)
    imatrix = imatrix or (Path(plan_doc["imatrix"]) if plan_doc.get("imatrix") else None)
    result = _build(resolve_model_path(model), plan_doc, out, imatrix, force, threads)
    _print_json(result) if as_json else _echo_build(result)


@main.command()
@click.argument("model")
@_plan_options
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The GGUF to write.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text (default: the project's English corpus).")
@click.option("--impact/--no-impact", default=None, help="Measure output impact (default: models up to 4 GB).")
@click.option("--threads", "-t", type=int, default=None)
@click.option("--force", is_flag=True, help="Overwrite OUT and earlier profile results.")
def compress(model, device, budget_gb, ctx, parallel, experts_used, original_experts, out, calib, impact, threads,
             force) -> None:
    """profile -> plan -> build in one go; the artifacts stay in OUT's folder (OUT.ccmoe/)."""
    from .compress import load_profile, plan_model, profile_paths, run_profile, save_plan
    from .devices import get_profile
    from .engine import find_engine
    from .inventory import read_gguf
    from .sources import resolve_model_path

    out = Path(out)
    if out.exists() and not force:
        raise CcmoeError(f"{out} already exists", "pass --force to overwrite it or choose another -o path")
    dev = get_profile(device)
    path = resolve_model_path(model)
    engine = find_engine()
    work = out.with_name(out.name.removesuffix(".gguf") + ".ccmoe")
    if not profile_paths(work, path)["sensitivity"].is_file() or force:
        bar = _Progress("impact probes")
        try:
            run_profile(engine, path, _calibration(calib), work, impact=impact, force=True, threads=threads, progress=bar)
        finally:
            bar.close()
    result = plan_model(engine, read_gguf(path), dev, ctx, parallel, budget_gb, load_profile(work, path),
                        experts_used, original_experts)
    _echo_plan(result, save_plan(result, work / "plan.json", force=True))
    _echo_build(_build(path, result, out, Path(result["imatrix"]) if result["imatrix"] else None, force, threads))


# ---------------------------------------------------------------- bench

_load_mode_option = click.option(
    "--load-mode", type=click.Choice(["auto", "mmap", "none"]), default=None,
    help="llama.cpp's load mode (default: what calibration measured best for weights in host memory: `none`, "
         "pinned buffers, makes prompts much faster next to a GPU; `mmap` can decode a few percent faster).")

_cpu_repack_option = click.option(
    "--cpu-repack/--no-cpu-repack", default=None,
    help="Experts in host memory next to a GPU in llama.cpp's CPU buffers (its --no-host), repacked for faster CPU "
         "kernels (Q4_0/Q4_K/IQ4_NL/MXFP4 on x86) but their prompt batches stay on the CPU (default: when "
         "calibration predicts at least 5% faster decode).")


@main.command()
@click.option("--device", default="auto", show_default=True, help="Device profile name, a .toml path, or auto.")
@click.option("--model", default=None, help="GGUF path or any model spec (default: the bundled model).")
@click.option("--runs", type=int, default=5, show_default=True, help="Rounds; each runs every contender once.")
@click.option("--threads", "-t", type=int, default=None)
@click.option("--history", type=click.Path(path_type=Path), default=Path("ccmoe-results/history.jsonl"),
              show_default=True, help="Append the result here (JSON lines); --no-history to skip.")
@click.option("--no-history", is_flag=True)
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A bench result (bench --json output, or a history file: its last bench line).")
@click.option("--max-regression", type=float, default=10.0, show_default=True,
              help="Percent tokens/s may fall below the baseline before the exit is non-zero (6).")
@click.option("--min-round-s", type=float, default=5.0, show_default=True,
              help="Seconds of measured work per contender per round (more repetitions for fast models).")
@_load_mode_option
@_cpu_repack_option
@click.option("--json", "as_json", is_flag=True)
def bench(device, model, runs, threads, history, no_history, baseline, max_regression, min_round_s, load_mode,
          cpu_repack, as_json) -> None:
    """Prompt and generation tokens/s of ccmoe's placement and llama.cpp's own, alternating, repeated."""
    from .bench import load_baseline, regressions, run_bench
    from .errors import EXIT_REGRESSION
    from .devices import get_profile
    from .engine import find_engine
    from .sources import resolve_model_path

    profile = get_profile(device)
    base = load_baseline(baseline) if baseline else None
    say = (lambda line: click.echo(line, err=True)) if not as_json else None
    result = run_bench(find_engine(profile.backend if device != "auto" else None), resolve_model_path(model),
                       profile, runs=runs, threads=threads, progress=say, min_round_s=min_round_s,
                       load_mode=load_mode, cpu_repack=cpu_repack)
    if not no_history:
        from .report import append_history

        append_history(history, "bench", result)
    fell = regressions(result, base, max_regression) if base else []
    result["regressions"] = fell
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{Path(result['model']).name} on {result['device']} ({result['backend']}), {runs} rounds, "
                   f"pp{result['n_prompt']} / tg{result['n_gen']} tok/s: median (min-max, spread)")
        for name, c in result["contenders"].items():
            if "error" in c:
                click.echo(f"  {name:<18} failed: {c['error']}")
                continue
            pp, tg = c["pp"], c["tg"]
            line = (f"  {name:<18} pp {pp['median']:>10,.1f} ({pp['min']:,.1f}-{pp['max']:,.1f}, {pp['spread']:.1%})"
                    f"   tg {tg['median']:>9,.1f} ({tg['min']:,.1f}-{tg['max']:,.1f}, {tg['spread']:.1%})"
                    f"   peak RSS {human_size(c['peak_rss_bytes'])}")
            if "predicted" in c:
                line += (f"   predicted pp {c['predicted']['pp']:,.1f} tg {c['predicted']['tg']:,.1f}; "
                         f"{c['bandwidth_share']:.0%} of the bandwidth limit")
            click.echo(line)
        for note in result.get("notes", []):
            click.echo(f"  ccmoe placement: {note}")
        machine = result.get("host_speed")
        if machine and machine["spread"] and machine["spread"] > 0.1:
            click.echo(f"  note: this machine's own speed (a fixed CPU loop, no llama.cpp) varied {machine['spread']:.0%} "
                       f"between rounds; tokens/s spreads of that size are the machine's, not the engine's")
        drift = {k: v["spread"] for k, v in (result.get("round_drift") or {}).items() if v and v["spread"] > 0.05}
        if drift:
            moved = " and ".join(f"{v:.0%} ({k})" for k, v in drift.items())
            click.echo(f"  note: all contenders moved together by {moved} from round to round: the machine's speed "
                       f"changed during the run; rerun on a quiet machine before reading a spread as the engine's")
    if fell:
        click.echo(f"ccmoe-run: error: tokens/s regressed against {baseline}: " + "; ".join(fell), err=True)
        sys.exit(EXIT_REGRESSION)


# ---------------------------------------------------------------- eval

@main.command("eval")
@click.option("--model", required=True, help="The quantized model (GGUF path or any model spec).")
@click.option("--reference", required=True, help="The unquantized model it was made from.")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (default: the corpus's held-out part).")
@click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per llama-perplexity chunk.")
@click.option("--threads", "-t", type=int, default=None)
@click.option("--history", type=click.Path(path_type=Path), default=None,
              help="Append the result to this history file (JSON lines) for `ccmoe-run report`.")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(model, reference, text, ctx, threads, history, as_json) -> None:
    """Perplexity, KL-divergence (mean, p99) and top-token agreement against the reference (llama-perplexity)."""
    from .corpus import ensure_corpus
    from .engine import find_engine
    from .evaluate import evaluate
    from .sources import resolve_model_path

    result = evaluate(find_engine(), resolve_model_path(model), resolve_model_path(reference),
                      text or ensure_corpus().heldout, ctx=ctx, threads=threads)
    if history:
        from .report import append_history

        append_history(history, "eval", result)
    if as_json:
        _print_json(result)
        return
    p99 = f"{result['p99_kld']:.5f}" if result["p99_kld"] is not None else "n/a (lost from llama.cpp's log)"
    click.echo(f"model       {result['model']} ({human_size(result['model_bytes'])})\n"
               f"reference   {result['reference']} ({human_size(result['reference_bytes'])})\n"
               f"text        {result['text']} ({result['chunks']} chunks of {ctx} tokens)\n"
               f"perplexity  {result['ppl']:.4f} (reference {result['ppl_base']:.4f})\n"
               f"mean KLD    {result['mean_kld']:.5f} ± {result['mean_kld_se']:.5f}\n"
               f"p99 KLD     {p99}\n"
               f"same top    {100 * result['same_top']:.2f} % of tokens")


@main.command()
@click.option("--history", type=click.Path(path_type=Path), default=Path("ccmoe-results/history.jsonl"),
              show_default=True, help="History written by `bench` and `eval --history`.")
@click.option("--placement", type=click.Path(path_type=Path), default=None, help="A placement JSON to draw.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("ccmoe-results/report.html"),
              show_default=True)
def report(history, placement, out) -> None:
    """One HTML page with charts: tokens/s over time, size vs quality, placement per layer."""
    from .report import write_report

    doc = None
    if placement:
        try:
            doc = json.loads(Path(placement).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CcmoeError(f"cannot read placement {placement} ({e})", "pass a placement JSON from ccmoe-run") from None
        if not isinstance(doc.get("tensors"), dict):
            raise CcmoeError(f"{placement} has no per-tensor placement", "pass a placement JSON from ccmoe-run")
    click.echo(f"wrote {write_report(history, out, doc)}")


# ---------------------------------------------------------------- serve

def _placement_for(eng, path: Path, profile, settings, stats_file: Path | None, host_profile: Path | None,
                   trial: bool = False):
    """The placement of `path` on `profile` (memory measured with the engine's dry run when it can, and with a
    trial run on CUDA when `trial`)."""
    from .artifacts import load_artifact
    from .costmodel import load_factors
    from .inventory import read_gguf, require_moe, summarize
    from .placement import place
    from .stats import EXPERT_STATS_VERSION

    inv = read_gguf(path)
    require_moe(summarize(inv), str(path))
    stats = load_artifact(stats_file, "expert-stats", EXPERT_STATS_VERSION) if stats_file else None
    factors = load_factors(profile, host_profile)
    return inv, factors, stats, place(inv, profile, factors, settings, eng, path, stats, trial=trial)


def _placement_options(f):
    """Options shared by `serve` and `place`."""
    for opt in reversed([
        click.option("--kv-type", type=click.Choice(["auto", "f16", "q8_0"]), default="auto", show_default=True,
                     help="KV cache type; auto picks q8_0 only when it buys at least 5% predicted decode speed."),
        click.option("--stats", "stats_file", type=click.Path(path_type=Path), default=None,
                     help="Expert statistics from `ccmoe-run profile` (default: uniform expert use, k/E)."),
        click.option("--host-profile", type=click.Path(path_type=Path), default=None,
                     help="Calibration from `ccmoe-run calibrate` (default: this host's, if calibrated)."),
        _load_mode_option,
        _cpu_repack_option,
        click.option("--trial/--no-trial", default=True, show_default=True,
                     help="CUDA, weights partly in host memory: measure the GPU memory of one short run of the "
                          "placement and place again with it (a few seconds; not with --dry-run)."),
    ]):
        f = opt(f)
    return f


def _quote(args: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in args)


@main.command()
@click.option("--device", default="auto", show_default=True, help="Device profile name, a .toml path, or auto.")
@click.option("--model", default=None, help="GGUF path or hf:owner/repo[:file] (default: the bundled model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the server.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None, help="Require this key from clients.")
@click.option("--parallel", type=int, default=1, show_default=True, help="Concurrent request slots.")
@click.option("--ctx", type=int, default=4096, show_default=True, help="Context length per slot.")
@_placement_options
@click.option("--llama-cpp-dir", type=click.Path(path_type=Path), default=None, help="Use an existing llama.cpp build.")
@click.option("--dry-run", is_flag=True, help="Print the llama-server command line, predicted memory and speed; exit.")
@click.option("--warmup/--no-warmup", default=True, help="Send one streamed chat request and report tokens/s.")
@click.option("--json", "as_json", is_flag=True, help="Print the ready message as JSON.")
def serve(device, model, host, port, api_key, parallel, ctx, kv_type, stats_file, host_profile, load_mode, cpu_repack,
          trial, llama_cpp_dir, dry_run, warmup, as_json) -> None:
    """Start llama-server with an OpenAI-compatible API on MODEL, placed for DEVICE; Ctrl-C stops it."""
    from .devices import get_profile
    from .engine import find_engine
    from .placement import Settings, summary_lines
    from .serve import LlamaServer, ServerConfig, serve_forever, server_command
    from .sources import resolve_model_path

    profile = get_profile(device)
    eng = find_engine(None if llama_cpp_dir else profile.backend, llama_cpp_dir)
    path = resolve_model_path(model)
    if ctx < 16 or parallel < 1:
        raise CcmoeError("--ctx must be at least 16 and --parallel at least 1", "fix the values")
    settings = Settings(ctx=ctx, parallel=parallel, kv_type=kv_type, load_mode=load_mode, cpu_repack=cpu_repack)
    inv, factors, stats, placement = _placement_for(eng, path, profile, settings, stats_file, host_profile,
                                                    trial and not dry_run)
    cfg = ServerConfig(model=path, host=host, port=port, ctx=ctx, parallel=parallel, threads=placement.threads,
                       api_key=api_key,
                       extra_args=placement.server_args())
    if dry_run:
        if as_json:
            _print_json({"command": server_command(eng, cfg), "placement": placement.to_dict()})
        else:
            click.echo(_quote(server_command(eng, cfg)))
            click.echo("\n".join(summary_lines(placement)))
        return
    server = LlamaServer(eng, cfg)
    server.start()

    def ready() -> None:
        data = _ready_data(server, eng, profile, path, placement)
        if warmup:
            data.update(_warmup(server, api_key, placement, inv, profile, factors, stats))
        if as_json:
            _print_json(data, indent=None)   # one line: scripts read it as soon as the server is ready
        else:
            _echo_ready(data, placement, warmup)
        sys.stdout.flush()

    sys.exit(serve_forever(server, ready))


def _ready_data(server, eng, profile, path: Path, placement) -> dict:
    return {"base_url": server.base_url + "/v1", "model": str(path), "device": profile.name,
            "engine": eng.key or str(eng.bin_dir), "pid": server.proc.pid, "log": str(server.log_path),
            "kv_type": placement.kv_type, "overrides": placement.overrides,
            "predicted_memory_bytes": {k: u.total for k, u in placement.memory.items()},
            "predicted_prompt_tokens_per_s": placement.predicted_empty.prompt_tps,
            "predicted_generation_tokens_per_s": placement.predicted_empty.decode_tps}


_WARMUP_TEXT = ("Once upon a time a small machine served a very large model to everyone who asked, one token after "
                "another, and nobody noticed that most of the experts slept in the slow memory while the busy ones "
                "worked fast. ")


def warmup_prompt(ctx: int, ctx_train: int) -> str:
    """A prompt long enough for its speed to mean something (up to a few hundred tokens) that still fits the
    slot's context with the 48-token answer (at least 2 characters a token, to be safe)."""
    chars = max(16, 2 * (min(ctx, ctx_train or ctx) - 64))
    text = _WARMUP_TEXT * 4
    return text[:chars].rsplit(" ", 1)[0]


def _warmup(server, api_key, placement, inv, profile, factors, stats) -> dict:
    """One streamed chat request: measured prompt and generation tok/s beside the predicted ones for its lengths."""
    import psutil

    from .placement import repredict
    from .serve import streamed_chat

    try:
        prompt = warmup_prompt(placement.settings.ctx, int(inv.key("context_length", 0) or 0))
        text, timings = streamed_chat(server.base_url, prompt, 48, api_key)
    except OSError as e:   # URLError, HTTPError, timeouts
        raise CcmoeError(f"the warm-up request to {server.base_url} failed ({e})",
                         f"see the server log {server.log_path}", 5) from None
    n_prompt, n_gen = int(timings.get("prompt_n", 1) or 1), int(timings.get("predicted_n", 1) or 1)
    pred = repredict(placement, inv, profile, factors, n_prompt, n_prompt + n_gen // 2, stats)
    return {"warmup_text": text, "prompt_tokens_per_s": round(timings.get("prompt_per_second", 0.0), 1),
            "generation_tokens_per_s": round(timings.get("predicted_per_second", 0.0), 1),
            "warmup_prompt_tokens": n_prompt, "warmup_generated_tokens": n_gen,
            "warmup_predicted_prompt_tokens_per_s": round(pred.prompt_tps, 1),
            "warmup_predicted_generation_tokens_per_s": round(pred.decode_tps, 1),
            "server_rss_bytes": psutil.Process(server.proc.pid).memory_info().rss}


def _echo_ready(data: dict, placement, warmup: bool) -> None:
    from .placement import summary_lines

    click.echo(f"serving {Path(data['model']).name} on {data['device']}; OpenAI base URL: {data['base_url']}")
    click.echo("\n".join(summary_lines(placement)))
    if warmup:
        click.echo(f"warm-up ({data['warmup_prompt_tokens']}-token prompt, {data['warmup_generated_tokens']} tokens): "
                   f"prompt {data['prompt_tokens_per_s']} tok/s (predicted {data['warmup_predicted_prompt_tokens_per_s']}), "
                   f"generation {data['generation_tokens_per_s']} tok/s (predicted "
                   f"{data['warmup_predicted_generation_tokens_per_s']}); llama-server RSS "
                   f"{data['server_rss_bytes'] / 1e6:.0f} MB: {data['warmup_text'][:60]!r}")
    click.echo("Ctrl-C stops the server.")


@main.command()
@click.argument("model", required=False)
@click.option("--device", default="auto", show_default=True, help="Device profile name, a .toml path, or auto.")
@click.option("--ctx", type=int, default=4096, show_default=True, help="Context length per slot.")
@click.option("--parallel", type=int, default=1, show_default=True, help="Concurrent request slots.")
@_placement_options
@click.option("--ubatch", type=int, default=None,
              help="Physical batch (-ub; default 512, or 256 when that leaves GPU room for more weights).")
@click.option("--margin-mb", type=int, default=None,
              help="Free memory left in each pool (default 256, 128 after a trial run).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Save the placement artifact (JSON).")
@click.option("--llama-cpp-dir", type=click.Path(path_type=Path), default=None, help="Use an existing llama.cpp build.")
@click.option("--json", "as_json", is_flag=True, help="Print the placement as JSON.")
def place(model, device, ctx, parallel, kv_type, stats_file, host_profile, load_mode, cpu_repack, trial, ubatch,
          margin_mb, out, llama_cpp_dir, as_json) -> None:
    """Choose where each tensor of MODEL lives on DEVICE (GPU or CPU memory) and predict the speed."""
    from .devices import get_profile
    from .engine import find_engine
    from .placement import MIB, Settings, save_placement, summary_lines
    from .sources import resolve_model_path

    profile = get_profile(device)
    try:   # llama.cpp's dry run measures memory where this host has the device's backend; else it is estimated
        eng = find_engine(None if llama_cpp_dir else profile.backend, llama_cpp_dir)
    except CcmoeError:
        eng = None
    path = resolve_model_path(model)
    settings = Settings(ctx=ctx, parallel=parallel, kv_type=kv_type, ubatch=ubatch or 512, ubatch_auto=ubatch is None,
                        margin_bytes=None if margin_mb is None else margin_mb * MIB, load_mode=load_mode,
                        cpu_repack=cpu_repack)
    placement = _placement_for(eng, path, profile, settings, stats_file, host_profile, trial)[3]
    if out:
        save_placement(placement, out)
    if as_json:
        _print_json(placement.to_dict())
    else:
        click.echo("\n".join(summary_lines(placement)))
        click.echo(f"llama-server flags: {_quote(placement.launch_args())}")
        if out:
            click.echo(f"wrote {out}")


@main.command()
@click.option("--device", default="auto", show_default=True, help="Device profile name, a .toml path, or auto.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Host profile to write (default: the cache's, which serve and place then use).")
@click.option("--size-mb", type=int, default=None, help="Size of each medium model (default: 1500 on GPUs, 200 on CPUs).")
@click.option("--types", default=None, help="Weight types to measure, comma-separated (default: q8_0,q4_0 on GPUs, "
                                            "f16,q8_0,q4_0 on CPUs; K and IQ types such as q4_k, q2_k, iq2_xxs "
                                            "are made with llama-quantize).")
@click.option("--reps", "-r", type=int, default=3, show_default=True, help="llama-bench repetitions.")
@click.option("--threads", "-t", type=int, default=None, help="Threads (default: llama-bench's).")
@click.option("--llama-cpp-dir", type=click.Path(path_type=Path), default=None, help="Use an existing llama.cpp build.")
@click.option("--json", "as_json", is_flag=True)
def calibrate(device, out, size_mb, types, reps, threads, llama_cpp_dir, as_json) -> None:
    """Measure this host's decode efficiency, per-layer and split costs, prompt throughput and link speed with
    llama-bench on generated models; serve and place use them."""
    from .calibrate import QUANTIZED_TYPES, calibrate as run_calibration
    from .costmodel import host_profile_path
    from .devices import get_profile
    from .engine import find_engine
    from .synth import SYNTH_TYPES

    type_list = [t.strip().lower() for t in types.split(",")] if types else None
    for t in type_list or []:
        if t not in SYNTH_TYPES + tuple(QUANTIZED_TYPES):
            raise CcmoeError(f"cannot calibrate type {t!r}",
                             f"choose from {', '.join(SYNTH_TYPES + tuple(QUANTIZED_TYPES))}")
    profile = get_profile(device)
    eng = find_engine(None if llama_cpp_dir else profile.backend, llama_cpp_dir)
    out = out or host_profile_path(profile, eng.backend)
    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    result = run_calibration(eng, profile, out, size_mb, type_list, reps, threads, say)
    if as_json:
        _print_json(result)
        return
    f = result["factors"]
    click.echo(f"host profile {out} ({result['seconds']} s)")
    wide = f" ({f['layer_s_wide'] * 1e6:.1f} us if 2048 wide)" if f.get("layer_s_wide") is not None else ""
    click.echo(f"  per token {f['token_s'] * 1e6:.0f} us + {f['layer_s'] * 1e6:.1f} us per layer{wide}; "
               f"split {f['split_s'] * 1e6:.0f} us; prompt {f['pp_flops'].get('gpu' if profile.backend != 'cpu' else 'cpu', 0) / 1e12:.2f} TFLOP/s"
               + (f"; link {f['link_gbs']} GB/s" if f.get("link_gbs") else ""))
    click.echo("  decode efficiency: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(f["efficiency"].items())))
    for run, r in result["fit"].items():
        click.echo(f"  {run:<18} tg {r['measured_tg']:>9.1f} (model {r['predicted_tg']:>9.1f})  "
                   f"pp {r['measured_pp']:>9.1f} (model {r['predicted_pp']:>9.1f})")


# ---------------------------------------------------------------- prune

@main.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The pruned GGUF to write.")
@click.option("--keep", type=int, default=None, help="Experts to keep in every MoE layer.")
@click.option("--keep-ratio", type=float, default=None, help="Share of experts to keep, rounded up (e.g. 0.75).")
@click.option("--method", default="importance", show_default=True,
              help="importance (alpha x frequency + (1 - alpha) x mean score), frequency (alpha 1) or random.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of activation frequency against mean routing score, both divided by the layer maximum.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text for the router statistics (default: the project's English corpus).")
@click.option("--stats", "stats_file", type=click.Path(path_type=Path), default=None,
              help="Router statistics to reuse (default: measured, cached as OUT's folder/MODEL.router-stats.json).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --method random.")
@click.option("--experts-used", type=int, default=None,
              help="Experts per token (default: max(1, round(k x kept / original experts))).")
@click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per calibration chunk.")
@click.option("--chunks", type=int, default=64, show_default=True, help="Calibration chunks to use.")
@click.option("--threads", "-t", type=int, default=None)
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prune(model, out, keep, keep_ratio, method, alpha, calib, stats_file, seed, experts_used, ctx, chunks, threads,
          force, as_json) -> None:
    """Drop the least important experts of every MoE layer by router statistics; write a smaller GGUF."""
    from .engine import find_engine
    from .prune import prune_model
    from .router import load_router_stats
    from .sources import resolve_model_path

    path = resolve_model_path(model)
    stats = load_router_stats(stats_file) if stats_file else None
    needs_text = stats is None and method != "random"
    result = prune_model(find_engine() if needs_text else None, path, out, keep, keep_ratio, method, alpha, seed,
                         _calibration(calib) if needs_text else None, stats, stats_file, experts_used, ctx, chunks,
                         threads, force)
    if as_json:
        _print_json(result)
        return
    c = result["counts"]
    how = f"alpha {result['alpha']:g}" if result["alpha"] is not None else f"seed {result['seed']}"
    click.echo(f"pruned {path.name} ({result['arch']}): {c['n_expert']} -> {c['n_keep']} experts in "
               f"{len(result['kept'])} MoE layers by {result['method']} ({how})")
    if result["tokens"]:
        click.echo(f"router statistics: {result['tokens']} tokens of {result['calibration']}, score "
                   f"{result['score_node']} ({result['stats']})")
    click.echo(f"experts used per token {c['experts_used']} -> {c['experts_used_new']}"
               + ("" if experts_used else f" (max(1, round({c['original_expert_used_count']} x {c['n_keep']} / "
                                           f"{c['original_expert_count']})))"))
    for note in c["notes"]:
        click.echo(f"note: {note}")
    click.echo("layer  kept experts" + " " * 20 + "share of calibration routings kept")
    for layer, ids in result["kept"].items():
        share = result["kept_share"][layer]
        click.echo(f"  {layer:<5}{' '.join(map(str, ids)):<32}{'-' if share is None else f'{100 * share:.1f}%'}")
    click.echo(f"size {human_size(result['bytes_before'])} -> {human_size(result['bytes_after'])}; wrote {result['output']}")


if __name__ == "__main__":
    main()
