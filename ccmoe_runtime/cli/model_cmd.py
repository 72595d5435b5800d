"""`inspect`, `generate model|inventory`, `corpus`, `train-bundled`."""

from __future__ import annotations

import json

import click

from ..core.units import human_size
from ..engine.build import find_engine
from ..model.inventory import save_inventory
from ..model.sources import inspect_model
from ..model.synth import (
    BUILTIN_INVENTORIES,
    SYNTH_ARCHS,
    SYNTH_TYPES,
    SynthSpec,
    builtin_inventory,
    generate_model,
)
from ..testmodels.corpus import ensure_corpus
from ..testmodels.train import train_bundled_model
from .app import main
from .output import echo_result
from .params import COUNT, INPUT_FILE, OUTPUT


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--save", type=OUTPUT, default=None, help="Also save the inventory artifact (JSON).")
@click.option("--force", is_flag=True, help="Overwrite --save's file.")
def inspect(model, as_json, save, force) -> None:
    """Show a model's MoE structure: MODEL is a .gguf (any shard), hf:owner/repo[:file], an
    inventory .json, or inventory:deepseek-v3 / inventory:deepseek-v3-pruned192."""
    echo_result(inspect_model(model, save, force), as_json)


@main.group()
def generate() -> None:
    """Make models for tests: random-weight MoE GGUFs and weight-less inventories of real models."""


@generate.command("model")
@click.option("--arch", type=click.Choice(SYNTH_ARCHS), default="qwen3moe")
@click.option("-o", "--out", type=OUTPUT, required=True)
@click.option("--layers", type=COUNT, default=4)
@click.option("--embd", type=COUNT, default=256, help="Hidden size (a multiple of 32).")
@click.option("--experts", type=COUNT, default=16)
@click.option("--experts-used", type=COUNT, default=4)
@click.option("--expert-ff", type=COUNT, default=256, help="Feed-forward size of one expert.")
@click.option("--skew", type=click.FloatRange(0), default=0.0, help="0 = uniform expert use; larger = a few popular experts.")
@click.option("--seed", type=click.IntRange(0), default=0)
@click.option("--type", "qtype", type=click.Choice(SYNTH_TYPES, case_sensitive=False), default="f16", show_default=True,
              help="Weight type, written directly as random blocks.")
@click.option("--tensor-types", type=INPUT_FILE, default=None,
              help="Per-tensor types: regex=type lines, llama-quantize's --tensor-type-file format, first match wins.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def generate_model_cmd(arch, out, layers, embd, experts, experts_used, expert_ff, skew, seed, qtype, tensor_types,
                       force) -> None:
    """Write a deterministic random-weight MoE GGUF that llama.cpp loads."""
    spec = SynthSpec(arch=arch, n_layer=layers, n_embd=embd, n_expert=experts, n_expert_used=experts_used,
                     n_ff_exp=expert_ff, skew=skew, seed=seed, name=f"synth-{arch}")
    path = generate_model(spec, out, qtype, tensor_types, force)
    click.echo(f"wrote {path} ({human_size(path.stat().st_size)})")


@generate.command("inventory")
@click.argument("name", type=click.Choice(list(BUILTIN_INVENTORIES)))
@click.option("-o", "--out", type=OUTPUT, required=True)
@click.option("--force", is_flag=True)
def generate_inventory(name, out, force) -> None:
    """Save the weight-less inventory of a real model (shapes and names only)."""
    click.echo(f"wrote {save_inventory(builtin_inventory(name), out, force=force)}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def corpus(as_json) -> None:
    """Fetch (once) the English corpus used for training, calibration and quality tests."""
    echo_result(ensure_corpus(), as_json)


@main.command("train-bundled")
@click.option("-o", "--out", type=OUTPUT, default=None, help="Output GGUF (default: the bundled model's file).")
@click.option("--steps", type=COUNT, default=None, help="Training steps (default: the recipe's).")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def train_bundled_cmd(out, steps, force) -> None:
    """Retrain the bundled default model from the corpus (needs the `train` extra)."""
    info = train_bundled_model(out, steps, force, find_engine(), ensure_corpus(),
                               progress=lambda r: click.echo(json.dumps(r), err=True))
    click.echo(f"wrote {info['output']}: held-out perplexity {info['heldout_ppl']} (unigram {info['unigram_ppl']}); "
               f"report {info['report']}")
