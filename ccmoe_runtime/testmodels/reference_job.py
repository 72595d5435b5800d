"""Train the reference model on a machine that has only torch and numpy (a bare GPU box); write weight shards.

    python -m ccmoe_runtime.testmodels.reference_job --tokens tokens.npz --out DIR [--steps N] [--seed S]
        [--check-determinism STEPS] [--budget SECONDS]

`tokens.npz` is the token cache `ccmoe-run train-reference` writes (~/.cache/ccmoe-runtime/reference/);
DIR gets weights-NN.npz shards (<16 MiB each, ~55 MiB for the GPU recipe: 7-bit integers per 256 with F16
scales, zlib) and config.json; `ccmoe-run train-reference --weights DIR` turns them into the GGUF. The rounded
weights are the reference: the held-out loss and routing reported here are measured on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import warnings
from dataclasses import replace

import numpy as np

from .reference import (
    RefConfig,
    build_model,
    compact_state,
    evaluate,
    expand_state,
    load_state,
    parameter_count,
    pick_device,
    routing_stats,
    save_shards,
    state_arrays,
    train_model,
)


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(state_arrays(model).items()):
        h.update(k.encode() + v.tobytes())
    return h.hexdigest()[:16]


def determinism_check(cfg: RefConfig, train, held, device: str, steps: int) -> dict:
    """Train `steps` steps twice from the same seed; the two weight digests must be equal."""
    short = replace(cfg, steps=steps, keep_best=False)
    a, b = (_digest(train_model(short, train, held, device)[0]) for _ in range(2))
    return {"steps": steps, "digest_a": a, "digest_b": b, "same": a == b}


def steps_for_budget(cfg: RefConfig, train, held, device: str, seconds: float, probe: int = 30) -> int:
    """The most steps (a multiple of 100, at most cfg.steps) that fit `seconds`, timed on a throwaway run."""
    t0 = time.monotonic()
    train_model(replace(cfg, steps=probe // 3, keep_best=False), train, held, device)   # warm-up: kernels, allocator
    t1 = time.monotonic()
    train_model(replace(cfg, steps=probe, keep_best=False), train, held, device)
    per_step = (time.monotonic() - t1) / probe
    print(json.dumps({"probe_seconds_per_step": round(per_step, 4), "warmup_seconds": round(t1 - t0, 1)}), flush=True)
    return max(100, min(cfg.steps, int(seconds / per_step) // 100 * 100))


def run_job(tokens: str, out: str, cfg: RefConfig, max_seconds: float | None = None, check_steps: int = 0,
            budget: float | None = None) -> dict:
    """Train from the token cache on the best device and save the shards; returns the training info."""
    with np.load(tokens) as z:
        train, held = z["train"].astype(np.int64), z["heldout"].astype(np.int64)
    device = pick_device("auto")
    if budget:
        cfg = replace(cfg, steps=steps_for_budget(cfg, train, held, device, budget))
        print(json.dumps({"steps": cfg.steps}), flush=True)
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, log = train_model(cfg, train, held, device, progress=lambda r: print(json.dumps(r), flush=True),
                                 max_seconds=max_seconds)
    seconds = time.monotonic() - started
    loss_trained = evaluate(model, held, cfg, device, windows=10_000)
    rounded = build_model(cfg).to(device)                 # the reference: the weights as the shards store them
    load_state(rounded, expand_state(compact_state(state_arrays(model), 63)))
    rounded.eval()
    loss = evaluate(rounded, held, cfg, device, windows=10_000)
    steps_run = max(r["step"] for r in log if "step" in r)
    info = {"device": device, "steps_run": steps_run, "train_seconds": round(seconds, 1),
            "parameters": parameter_count(model), "heldout_loss_torch": round(loss, 4),
            "heldout_ppl_torch": round(math.exp(loss), 2), "heldout_loss_before_rounding": round(loss_trained, 4),
            "log": log, "routing": routing_stats(rounded, held, cfg, device, windows=200),
            "nondeterminism_warnings": sorted({str(w.message)[:200] for w in caught
                                               if "deterministic" in str(w.message)})}
    if device == "cuda":
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch"] = torch.__version__
    if check_steps:
        info["determinism"] = determinism_check(cfg, train, held, device, check_steps)
    info["job_seconds"] = round(time.monotonic() - started, 1)
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
    ap.add_argument("--check-determinism", type=int, default=0, metavar="STEPS",
                    help="also train STEPS steps twice and compare the weights")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="fewer steps (multiples of 100) where --steps would not fit SECONDS of training")
    a = ap.parse_args()
    cfg = replace(RefConfig(), steps=a.steps, seed=a.seed, **({"batch": a.batch} if a.batch else {}))
    info = run_job(a.tokens, a.out, cfg, a.max_seconds, a.check_determinism, a.budget)
    print(json.dumps({k: v for k, v in info.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
