"""`inspect`, `generate model|inventory`, `corpus`, `train-bundled`, `train-reference`."""

from __future__ import annotations

import json
from pathlib import Path

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
from ..testmodels.corpus import ensure_corpus, ensure_reference_corpus
from ..testmodels.reftrain import train_reference_model
from ..testmodels.train import train_bundled_model
from .app import main
from .output import echo_json, echo_result
from .params import COUNT, INPUT_FILE, NON_NEGATIVE, OUTPUT

SEED = click.IntRange(min=0)


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
@click.option("--skew", type=NON_NEGATIVE, default=0.0, help="0 = uniform expert use; larger = a few popular experts.")
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


@main.command("train-reference")
@click.option("-o", "--out", type=OUTPUT, default=None,
              help="Output GGUF (default: ~/.cache/ccmoe-runtime/reference/ccmoe-reference-ds2-sSEED-STEPS.gguf, reused if there).")
@click.option("--steps", type=COUNT, default=None, help="Training steps (default: the recipe's).")
@click.option("--seed", type=SEED, default=None, help="Random seed (default 1234); same seed and device, same file.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Where torch trains: auto picks CUDA when torch sees a GPU.")
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Export weights trained elsewhere (the folder of `python -m ccmoe_runtime.testmodels.reference_job`) instead of training.")
@click.option("--force", is_flag=True, help="Overwrite OUT (or retrain the cached model).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def train_reference_cmd(out, steps, seed, device, weights, force, as_json) -> None:
    """Train the deepseek2 reference model (MLA, shared expert, dense lead, 32 experts top-4) on the reference corpus."""
    info = train_reference_model(out, steps, seed, force, device, weights, find_engine(), ensure_reference_corpus(),
                                 progress=lambda r: click.echo(json.dumps(r), err=True))
    if as_json:
        echo_json({k: v for k, v in info.items() if k != "log"})
        return
    click.echo(f"{'cached' if info['cached'] else 'wrote'} {info['output']}: {info['parameters'] / 1e6:.1f}M parameters, "
               f"held-out perplexity {info['heldout_ppl']} (unigram {info['unigram_ppl']}), trained on {info['device']}; "
               f"report {info['report']}")
