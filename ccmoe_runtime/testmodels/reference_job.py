"""Train the reference model on a machine that has only torch and numpy (a bare GPU box); write weight shards.

    python -m ccmoe_runtime.testmodels.reference_job --tokens tokens.npz --out DIR [--steps N] [--seed S]

`tokens.npz` is the token cache `ccmoe-run train-reference` writes (~/.cache/ccmoe-runtime/reference/);
DIR gets weights-NN.npz shards (<16 MiB each) and config.json; `ccmoe-run train-reference --weights DIR`
turns them into the GGUF.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import numpy as np

from .reference import RefConfig, evaluate, parameter_count, pick_device, routing_stats, save_shards, train_model


def run_job(tokens: str, out: str, steps: int, seed: int, batch: int | None, max_seconds: float | None) -> dict:
    """Train from the token cache on the best device and save the shards; returns the training info."""
    with np.load(tokens) as z:
        train, held = z["train"].astype(np.int64), z["heldout"].astype(np.int64)
    cfg = replace(RefConfig(), steps=steps, seed=seed, **({"batch": batch} if batch else {}))
    device = pick_device("auto")
    started = time.monotonic()
    model, log = train_model(cfg, train, held, device, progress=lambda r: print(json.dumps(r), flush=True),
                             max_seconds=max_seconds)
    seconds = time.monotonic() - started
    loss = evaluate(model, held, cfg, device, windows=10_000)
    info = {"device": device, "steps_run": log[-1]["step"], "train_seconds": round(seconds, 1),
            "parameters": parameter_count(model), "heldout_loss_torch": round(loss, 4),
            "heldout_ppl_torch": round(math.exp(loss), 2), "log": log,
            "routing": routing_stats(model, held, cfg, device, windows=200)}
    if device == "cuda":
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
    save_shards(model, cfg, out, info)   # the planned steps: the schedule; steps_run: where a time limit stopped it
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=RefConfig.steps)
    ap.add_argument("--seed", type=int, default=RefConfig.seed)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    a = ap.parse_args()
    info = run_job(a.tokens, a.out, a.steps, a.seed, a.batch, a.max_seconds)
    print(json.dumps({k: v for k, v in info.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
