"""`ccmoe-run`: the command line. Each command reads its options (validated by the types in `params`), calls one
library function and prints the result's `summary_lines()` or its JSON (`output`); `app` turns every failure into
one line `ccmoe-run: error: <problem>; <fix>` and its exit code."""

from . import (  # noqa: F401
    bench_cmd,
    compress_cmd,
    engine_cmd,
    model_cmd,
    placement_cmd,
    prune_cmd,
    serve_cmd,
)
from .app import main

__all__ = ["main"]
