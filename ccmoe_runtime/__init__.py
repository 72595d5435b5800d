"""ccmoe-runtime: deploy pre-pruned Mixture-of-Experts models on small machines with llama.cpp.

One subpackage per pipeline stage; a stage imports only the stages above it in this list (tests/test_layout.py
enforces it, and that no module imports another in a cycle):

  core        errors and exit codes, units, safe output files, versioned JSON artifacts, paths, pinned source
  model       GGUF inventories, generated models, tokenizers, model specs (path, shard, hf:, inventory:)
  engine      llama.cpp builds and their self-test, running the tools, ggml via ctypes, the server process
  devices     device profiles (data/*.toml) and `--device auto` (this host)
  testmodels  the English corpus and the models the project trains (bundled qwen3moe)
  placement   cost model, calibration, memory, -ot rules, placement search   -> Placement
  compress    measure, plan a type per tensor, build with llama-quantize       -> Measurements, Plan, BuildResult
  prune       drop experts by router statistics                                -> PruneResult
  serve       llama-server on a placed model, warm-up, clean stop              -> ServerPlan, ServeReady
  bench       tokens/s benchmark and regression verdict, eval, report          -> BenchResult, EvalResult
  cli         `ccmoe-run`: each command reads options, calls one function above, prints the result

Stages pass typed results (dataclasses with `to_dict()` and `summary_lines()`), saved as versioned JSON artifacts
by core.artifacts.
"""

__version__ = "0.2.0"
